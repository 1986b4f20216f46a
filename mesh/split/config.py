"""`[split]` configuration: every timeout and limit of the offload and split paths. Frozen; validated on
creation (`ValueError` naming the key). Environment overrides (`SHOAL_SPLIT_<KEY>`) are read with every other
section's by `mesh.node.config.load_config`; nothing in this package reads the environment."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class SplitConfig:
    """`[split]`: how this node runs requests over peers (offload, split) and hosts stages for them."""

    direct_tensors: bool = True
    """Carry a split's tensors over a sealed TCP link (`split.tensor_link`) to a stage whose API address is
    reachable, instead of the `tensors` data channel (much slower per call: aiortc's SCTP is pure Python).
    Off: this node neither listens for nor opens direct links."""
    offload_link: bool = True
    """With `direct_tensors`: an offload's tokens come back over a sealed TCP link to the serving peer
    (`split.offload_link`) when its API address is reachable, instead of the control data channel (whose
    every frame costs both nodes' event loops aiortc's DTLS and SCTP). Off: this node's offloads keep their
    tokens on the channel (it still serves peers' offloads over links they make)."""
    stage_timeout_s: float = 30.0
    """Wait for one tensor call of a remote stage (plus `per_token_timeout_s` per input row)."""
    per_token_timeout_s: float = 0.05
    """Extra wait per input row of a tensor call (a long prefill takes longer)."""
    open_timeout_s: float = 300.0
    """Wait for a peer to open a stage: its first open of a span may load, fetch or compile it."""
    control_timeout_s: float = 5.0
    """Wait for a short control reply: a tensor link grant, a `stage.close`."""
    rebuild_timeout_s: float = 330.0
    """Longest a re-plan after a lost stage may take to open its new stages."""
    span_fetch_timeout_s: float = 600.0
    """Longest this node may take to fetch a span it does not hold (over IPFS) for a peer."""
    header_timeout_s: float = 120.0
    """Longest wait for the GGUF header (tokenizer and tensor index, a few MiB) of a model this node does not
    hold but plans over the mesh (`split.span_model`)."""
    link_handshake_timeout_s: float = 2.0
    """Connect plus token exchange of a direct tensor link."""
    link_record_timeout_s: float = 5.0
    """Once a tensor link record's first bytes arrived, the rest must follow within this."""
    link_token_ttl_s: float = 10.0
    """How long a tensor link grant's one-use token stays valid."""
    link_alive_poll_s: float = 0.25
    """While a call waits on a direct tensor link, how often the origin checks that the peer is linked."""
    chain_stages: bool = True
    """With `direct_tensors`: a split's decode steps pass from one remote stage straight to the next over a
    direct tensor link of their own (b → c → this node: `split.stage_chain`) instead of coming back to this
    node between them — one hop and this node's relay fewer per remote stage after the first. A peer that
    cannot reach the next one directly leaves that step to this node. Off: every step goes through here."""
    native_lane: bool = True
    """A stage node takes a split's steady decode steps on direct links in one native call each way (read,
    open, check; seal, send: `split.step_lane`), built from C on the node at its first start (~1 s; a node
    without a C compiler or OpenSSL's headers runs the same steps in Python and says so once). Off: always
    Python."""
    link_spin_us: int = 0
    """During a split's decode, how long (µs) each end of a direct tensor link may poll for the next record
    around when it is due instead of sleeping (`split.arrival`): a sleeping core is woken late by the record.
    At most this much CPU per hop (0-5000). Off by default: it cut a bare round trip from ~120 to ~30 µs on
    this project's VM (`bench/link_wake.py`) but no split's decode measurably (`bench/split.py`); try it
    where `bench/link_wake.py` shows waking costs more (340 µs a hop was measured on another VM)."""
    direct_retry_s: float = 60.0
    """After a direct tensor link to a peer's address failed to connect (its address is not reachable from
    here, as across NATs), new stages on that peer use the data channel at once for this long."""
    offload_open_timeout_s: float = 30.0
    """Wait for a peer to accept an offloaded request."""
    offload_token_timeout_s: float = 60.0
    """Longest silence between two tokens of an offloaded request before its peer counts as lost."""
    remote_info_timeout_s: float = 10.0
    """Wait for a peer to describe a model it serves (`offload.info`)."""
    remote_tokenize_timeout_s: float = 30.0
    """Wait for a peer to tokenize a prompt for a model this node does not hold."""
    advert_refresh_s: float = 1.0
    """How often this node re-checks what it offers (memory budget, load); it re-advertises on change."""
    max_replans: int = 3
    """Re-plans of one request after lost stages or peers before it fails."""
    suspect_floor_s: float = 0.3
    """While a reply over a data channel is awaited (an offload's next token, a stage's answer), a silence
    this long (or `suspect_factor` typical gaps between the request's replies, if longer) makes the origin
    ping the peer (`split.liveness`)."""
    suspect_factor: float = 8.0
    """How many typical reply gaps of a request a silence may last before the peer is pinged."""
    probe_timeout_s: float = 0.4
    """A pinged peer that sends nothing back within this (at least 4 RTTs) is lost: re-plan without it."""
    standby_spans: bool = True
    """When a split with stages on peers starts, load in the background (one at a time) the spans a re-plan
    without each of those peers would put on this node (`split.standby`), so a lost stage's replacement is
    ready."""
    standby_max_mb: int = 1024
    """Largest standby span (its share of the model file), in MiB; bigger ones are left to load on need."""
    warm_peers_models: bool = True
    """When a peer has a model loaded (its advert's `split.in_use`) and this node holds the model's file, load
    in the background (one piece at a time, only while idle and serving others) what a plan at that peer would
    likely put here: a split's span as an idle stage, or the whole model for an offload (`split.warming`)."""
    warm_fetch_spans: bool = False
    """Warm for models this node does not hold too, fetching the likely span's bytes by CID (network and disk
    spent on a guess; off by default)."""
    top_k_logits: int = 256
    """Logits per row the last stage of a split returns when sampling needs more than the argmax."""
    fp16_hidden: bool = False
    """Ask stages to send hidden states as float16 (half the bytes; not bit-exact)."""
    max_sequences: int = 64
    """Remote sequences this node hosts at once; more are refused as busy."""
    max_offloads: int = 8
    """Whole requests this node runs for peers at once; more are refused as busy."""
    keep_idle_stages: int = 2
    """Hosted stages kept loaded with no sequence on them (reused by the next request)."""
    speed_probe: bool = True
    """Measure each model's speed once it loads (a short fixed prompt, one request then two at once:
    `split.speed_probe`), so the planner and the peers know it before the first request finishes."""
    speed_probe_tokens: int = 16
    """Tokens the speed probe decodes per request (2-256)."""
    speed_probe_every_min: int = 10
    """Probe a loaded model again this many minutes after its last probe, when the node is idle (0: only
    after each load; at most 1440)."""
    offload_gain_percent: int = 20
    """An automatic plan leaves this node only when predicted to finish at least this much sooner (0-90)."""
    stay_gain_percent: int = 5
    """Once this node's last automatic plan for a model went to peers, the (smaller) gain that keeps it
    there: the band between the two is the hysteresis that stops requests flapping (0-90, at most
    `offload_gain_percent`)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in (bool, "bool"):
                if not isinstance(value, bool):
                    raise ValueError(f"{f.name} must be true or false")
            elif f.type in (int, "int"):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{f.name} must be an integer")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{f.name} must be a number")
            elif not 0 < value <= 86_400:
                raise ValueError(f"{f.name} must be in (0, 86400] seconds, got {value}")
            else:
                object.__setattr__(self, f.name, float(value))
        if not 1 <= self.standby_max_mb <= 1 << 20:
            raise ValueError(f"standby_max_mb {self.standby_max_mb} must be between 1 and 1048576")
        if not 0 <= self.max_replans <= 16:
            raise ValueError(f"max_replans {self.max_replans} must be between 0 and 16")
        if not 1 <= self.top_k_logits <= 65_536:
            raise ValueError(f"top_k_logits {self.top_k_logits} must be between 1 and 65536")
        if not 1 <= self.max_sequences <= 4096:
            raise ValueError(f"max_sequences {self.max_sequences} must be between 1 and 4096")
        if not 1 <= self.max_offloads <= 1024:
            raise ValueError(f"max_offloads {self.max_offloads} must be between 1 and 1024")
        if not 2 <= self.speed_probe_tokens <= 256:
            raise ValueError(f"speed_probe_tokens {self.speed_probe_tokens} must be between 2 and 256")
        if not 0 <= self.speed_probe_every_min <= 1440:
            raise ValueError(f"speed_probe_every_min {self.speed_probe_every_min} must be between 0 and 1440")
        for name in ("offload_gain_percent", "stay_gain_percent"):
            if not 0 <= getattr(self, name) <= 90:
                raise ValueError(f"{name} {getattr(self, name)} must be between 0 and 90")
        if self.stay_gain_percent > self.offload_gain_percent:
            raise ValueError(f"stay_gain_percent {self.stay_gain_percent} must not exceed "
                             f"offload_gain_percent {self.offload_gain_percent}")
        if not 0 <= self.link_spin_us <= 5000:
            raise ValueError(f"link_spin_us {self.link_spin_us} must be between 0 and 5000")
        if not 0 <= self.keep_idle_stages <= 64:
            raise ValueError(f"keep_idle_stages {self.keep_idle_stages} must be between 0 and 64")
