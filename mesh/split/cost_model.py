"""The cost model of the scheduler (`split.scheduler`): what a device, a request and a model's shape are, and
how long running a request on a set of stages is predicted to take. Pure: no I/O, no clocks.

Cost model (all times in seconds; every prediction is logged by the caller next to what really happened)
------------------------------------------------------------------------------------------------------------
Decoding a token is memory-bound, so a device's time for part of the model is its measured whole-model time
scaled by the share of weight bytes that part reads:

    compute_d(part) = bytes(part) / bytes(model) / decode_tps_d × steps_d(queue_depth_d + 1)

where `queue_depth_d` counts the requests the device is already busy with (its engine's live and waiting
ones, sequences it hosts for peers, and what this node has just placed there) and `steps_d(n)` is the step
time with n requests running relative to one alone: the device's measured `batch_steps` (its speed probe,
`split.speed_probe`, times 1, 2 and 4 at once), past those and where unmeasured 1 + `batch_cost_d` × (n − 1)
(`batch_cost`: the share of one request's step time each further request adds; 1.0 when batching gains
nothing; less where a batched step reads the weights once),
with `bytes(model)` = layers + output head (the embedding lookup reads one row and is free). The local node
also relays the tokens of the requests it offloaded (each frame off its direct link or through aiortc, then
to its HTTP client), on the CPU that computes its own: that divides its speed by `1 − relay_share`, where
`relay_share` = Σ over its offloads running `relay_token_s(peer)` × that stream's tokens/s (`relay_share()`;
`RELAY_LINK_TOKEN_S` for a peer whose tokens come over a direct link, `Device.offload_link`, else
`RELAY_TOKEN_S`). Prefill uses
`prefill_tps_d` the same way, per prompt token. A device that does not hold the model but can fetch it adds
`bytes(span) / fetch_bps` once, before its first token — unless it holds that very span loaded already
(`Device.held`).

- **local**:   ttft = prefill_local(P);  per_token = compute_local(model)
- **offload**: ttft = rtt_p + prefill_p(P);  per_token = compute_p(model) + `offload_token_s(p)`. Tokens
  stream back pipelined (over a direct link, or `control`), so the link costs one RTT in total, not one per
  token; what each token frame costs the serving node's event loop is the constant (`OFFLOAD_LINK_TOKEN_S`
  over a direct link, `OFFLOAD_TOKEN_S` over the data channel).
- **split** over stages s_1..s_k (the origin relays between them, a star as llama.cpp RPC does):
  per_token = Σ_i compute_i(span_i) + Σ_{remote i} (rtt_i + (in_i + out_i) / bandwidth_i)
  where `in`/`out` are the bytes a stage receives and returns per step (4 for a token id, 4·hidden for a
  hidden state, `logit_bytes` for the last stage);
  ttft = Σ_i prefill_i(P, span_i) + Σ_{remote i} (chunks · rtt_i + P · (in_i + out_i) / bandwidth_i).
  With `chain` (`[split] chain_stages`: decode steps pass from one remote stage straight to the next,
  docs/split.md "A chain instead of the star"), each boundary between two remote stages on different peers
  that this node links to directly (`Device.offload_link`) and whose RTT to each other one of them
  advertises (`Device.peer_rtts`, its advert's `links`) costs
  rtt_{i,i+1} / 2 + 4·hidden / min(bandwidth_i, bandwidth_{i+1}) a token instead of the star's
  rtt_i / 2 + rtt_{i+1} / 2 + 2 · 4·hidden transfers; prefill still goes through the origin.

  ttlt = ttft + (max_tokens − 1) · per_token is what is minimised.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shoal.mesh.split.policy import PolicyConfig
from shoal.models.config import ModelConfig
from shoal.models.memory import kv_bytes_per_token
from shoal.models.span import LayerSpan

LOCAL = "local"
"""The device id of the node making the plan."""

DEFAULT_BANDWIDTH = 8 * 1024 * 1024
"""Bytes/s assumed for a link that has not been measured (aiortc's SCTP on loopback: 6-9 MiB/s)."""
DEFAULT_OVERHEAD = 200 * 1024 * 1024
"""Runtime bytes a stage needs beyond weights and KV cache (TVM runtime, buffers)."""
DEFAULT_LOGIT_BYTES = 256 * 8
"""What the last stage returns per step: the top-256 logits (value + id)."""
OFFLOAD_TOKEN_S = 0.001
"""Per-token cost of an offload's token stream over the data channel (a frame through both nodes' event loops
and aiortc's SCTP): with every node on one core an offload decoded at 0.87x of local for SmolLM2 on TVM at
~140 tok/s (docs/split.md, bench/split.py --one-core), i.e. ~1 ms a token; the serving node's loop spends
+0.56-0.86 ms a token over serving its own client (bench/offload_link.py, `channel`)."""
OFFLOAD_LINK_TOKEN_S = 0.0002
"""The same over a direct offload link (`split.offload_link`, sealed records on TCP): the serving node's loop
spends what serving its own client does (-0.11 to +0.09 ms a token, median ~0 over 4 runs of
bench/offload_link.py), the stream decoded at 0.98-1.05x of the serving node's own; what is left is a
record's seal and write and the origin's read, counted small so an equal peer is never free."""
RELAY_TOKEN_S = 0.0006
"""The origin's CPU per token of a request it offloaded over the data channel: the frame's DTLS/SCTP receipt
in Python, its control handler and the relay to the HTTP client. Measured as the origin's event-loop CPU
time per relayed token (/proc schedstat, SmolLM2 on TVM, `bench/placement.py` bursts and one-stream
offloads): 0.6-0.9 ms on a loaded 2-core VM, 0.63 ms quiet (docs/split.md, *Placement*)."""
RELAY_LINK_TOKEN_S = 0.0003
"""The origin's CPU per relayed token when they come over a direct link: the record's read, AES-GCM open and
JSON, the token's check and the SSE chunk to the client. bench/offload_link.py, net of each loop's idle
CPU, in the same runs: 0.75-0.92 ms a token against 1.54-1.65 ms over the channel (load 3.5-3.8), i.e.
0.46-0.59 of the channel's; `RELAY_TOKEN_S` scaled by that (docs/split.md, *Offload over a direct link*)."""
MAX_RELAY_SHARE = 0.9
"""Largest share of a device's CPU counted as taken by relays (the rest still computes)."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes the cost model needs; `from_config` estimates them from a `ModelConfig` and the file size."""

    num_layers: int
    hidden_size: int
    layer_bytes: int
    """Weight bytes of one decoder layer."""
    embed_bytes: int
    """Weight bytes of the token embedding."""
    head_bytes: int
    """Weight bytes of the final norm + output head (equal to `embed_bytes` when tied)."""
    kv_bytes_per_token_layer: int
    """KV-cache bytes one position takes in one layer."""

    def __post_init__(self) -> None:
        if self.num_layers <= 0 or self.hidden_size <= 0:
            raise ValueError("num_layers and hidden_size must be positive")
        if min(self.layer_bytes, self.embed_bytes, self.head_bytes, self.kv_bytes_per_token_layer) < 0:
            raise ValueError("byte sizes must not be negative")
        if self.layer_bytes == 0 and self.head_bytes == 0:
            raise ValueError("a model needs some weights")

    @classmethod
    def from_config(cls, config: ModelConfig, weight_bytes: int, quantization: str = "auto") -> ModelShape:
        """Split `weight_bytes` (the whole file's tensors) by parameter count: layers, embedding, head. The
        KV term is the build's: fp16 pages for the quantized builds members serve on their CPUs (`f32` builds
        keep fp32; a CUDA member's fp32 pages are in GPU memory, outside the host budget an advert offers)."""
        h, f = config.hidden_size, config.intermediate_size
        kv = config.num_kv_heads * config.head_dim
        layer_params = h * (h + 2 * kv) + h * h + 3 * h * f + 2 * h
        embed_params = config.vocab_size * h
        head_params = embed_params + h
        head_extra = h if config.tie_embeddings else head_params
        total = config.num_layers * layer_params + embed_params + head_extra
        per_param = weight_bytes / total
        return cls(
            num_layers=config.num_layers,
            hidden_size=h,
            layer_bytes=int(layer_params * per_param),
            embed_bytes=int(embed_params * per_param),
            head_bytes=int(head_params * per_param),
            kv_bytes_per_token_layer=kv_bytes_per_token(config, LayerSpan(0, 1), quantization),
        )

    @property
    def compute_bytes(self) -> int:
        """Bytes read per decoded token by the whole model: every layer and the head."""
        return self.num_layers * self.layer_bytes + self.head_bytes

    def span_compute_bytes(self, span: LayerSpan) -> int:
        return len(span) * self.layer_bytes + (self.head_bytes if span.is_last(self.num_layers) else 0)

    def span_memory(self, span: LayerSpan, context_tokens: int, overhead: int) -> int:
        """Bytes a stage running `span` needs for a request of `context_tokens` positions."""
        extra = overhead
        if span.is_first():
            extra += self.embed_bytes
        if span.is_last(self.num_layers):
            extra += self.head_bytes
        return extra + len(span) * (self.layer_bytes + context_tokens * self.kv_bytes_per_token_layer)


@dataclass(frozen=True)
class Device:
    """A device the planner may use: the local node (`id == LOCAL`) or a peer, as its advert describes it."""

    id: str
    decode_tps: float
    """Measured whole-model decode speed for this model, tokens/s (0: unknown — the device is not used)."""
    prefill_tps: float
    """Measured whole-model prefill speed, prompt tokens/s (0: taken as 10 × decode_tps)."""
    free_memory: int
    """Bytes free for models now."""
    total_memory: int
    """Bytes of memory in all (bounds `max_memory_share`)."""
    holds_model: bool = True
    """Has the model's weights (or, for a span, can read them without fetching)."""
    fetch_bps: float = 0.0
    """If not holding the model: bytes/s it can fetch weights at (0: cannot)."""
    queue_depth: int = 0
    """Requests the device is already busy with (running, waiting, hosted stages)."""
    batch_cost: float = 1.0
    """Share of one request's step time each request already running there adds (1: no gain from
    batching; unknown is taken as 1)."""
    batch_steps: tuple[float, ...] = ()
    """Measured step time with 1, 2, … requests running, relative to one alone (the speed probe's: the cost
    need not grow in a line); past its end, and where empty, `batch_cost` per request counts."""
    measured: bool = True
    """Whether `decode_tps`/`prefill_tps` were measured for this model; the scheduler never assumes an
    unmeasured device is faster than the one it compares it with."""
    battery: float | None = None
    """Percent 0-100, or None for mains power."""
    charging: bool = False
    trusted: bool = True
    serves_others: bool = True
    rtt_s: float = 0.0
    """Round-trip time from the local node (0 for the local node)."""
    bandwidth_bps: float = DEFAULT_BANDWIDTH
    """Bytes/s on the link from the local node."""
    link: str = "host"
    """What the link from the local node is (its selected ICE pair, docs/mesh.md "Across NATs"): `host`,
    `server-reflexive`, `peer-reflexive` or `relayed` (through a TURN server)."""
    relay_share: float = 0.0
    """Share of this device's CPU taken by relaying the tokens of requests it offloaded (the local node only;
    `relay_share()`): its compute runs that much slower."""
    offload_link: bool = False
    """Whether an offload's tokens from this peer would come over a direct link (`split.offload_link`): the
    local node makes offload links (`[split] direct_tensors` and `offload_link`), the peer advertises an API
    address, and no link to it failed lately. Picks the link's per-token constants over the channel's."""
    peer_rtts: tuple[tuple[str, float], ...] = ()
    """(peer id, RTT seconds) of this device's own links to other members (a peer's advert `links`): what a
    chain's hop from it to the next stage costs (`predict(chain=True)`)."""
    held: tuple[LayerSpan, ...] = ()
    """Spans of this model the device holds loaded as stages (a peer's advert `shards`, the local node's stage
    host: `split.held_spans`): a stage of exactly one of them needs no new memory there (its bytes are out of
    the budget already) and no fetch."""
    loaded: bool = False
    """Whether the device's engine has this model loaded (a peer's advert `split.in_use`, the local node's
    own engine): its weights are out of the budget already, so running a request whole there — locally or as
    an offload — needs only the request's KV cache and overhead (`runs_whole`)."""

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("device id must not be empty")
        for name in ("decode_tps", "prefill_tps", "fetch_bps", "rtt_s", "batch_cost"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"device {self.id}: {name} must be a finite number >= 0")
        if self.bandwidth_bps <= 0 or not math.isfinite(self.bandwidth_bps):
            raise ValueError(f"device {self.id}: bandwidth_bps must be positive")
        if self.free_memory < 0 or self.total_memory < 0 or self.queue_depth < 0:
            raise ValueError(f"device {self.id}: memory and queue depth must be >= 0")
        if any(not math.isfinite(x) or x < 1 for x in self.batch_steps):
            raise ValueError(f"device {self.id}: batch_steps must be finite numbers >= 1")
        if not 0 <= self.relay_share <= MAX_RELAY_SHARE:  # also rejects NaN
            raise ValueError(f"device {self.id}: relay_share must be in [0, {MAX_RELAY_SHARE}]")
        if any(not math.isfinite(rtt) or rtt < 0 for _, rtt in self.peer_rtts):
            raise ValueError(f"device {self.id}: peer_rtts must be finite numbers >= 0")

    @property
    def is_local(self) -> bool:
        return self.id == LOCAL

    def memory_budget(self, policy: PolicyConfig) -> int:
        return int(min(self.free_memory, policy.max_memory_share * self.total_memory))

    def below_battery_floor(self, policy: PolicyConfig) -> bool:
        return self.battery is not None and not self.charging and self.battery < policy.battery_floor

    @property
    def load_factor(self) -> float:
        """How much slower a new request runs here than on the idle device: the requests it runs (batch cost
        each) and the CPU its relays take."""
        steps = self.batch_steps
        if len(steps) > self.queue_depth:  # joining `queue_depth` requests: a batch of queue_depth + 1
            batched = steps[self.queue_depth]
        elif steps:
            batched = steps[-1] + self.batch_cost * (self.queue_depth + 1 - len(steps))
        else:
            batched = 1 + self.batch_cost * self.queue_depth
        return batched / (1 - self.relay_share)

    @property
    def effective_prefill_tps(self) -> float:
        return self.prefill_tps or 10 * self.decode_tps

    def seconds_per_token(self) -> float:
        return self.load_factor / self.decode_tps

    def seconds_per_prompt_token(self) -> float:
        return self.load_factor / self.effective_prefill_tps


@dataclass(frozen=True)
class Request:
    prompt_tokens: int
    max_tokens: int
    prefill_chunk: int = 128
    logit_bytes: int = DEFAULT_LOGIT_BYTES
    overhead_bytes: int = DEFAULT_OVERHEAD

    def __post_init__(self) -> None:
        if self.prompt_tokens <= 0 or self.max_tokens <= 0 or self.prefill_chunk <= 0:
            raise ValueError("prompt_tokens, max_tokens and prefill_chunk must be positive")

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens


@dataclass(frozen=True)
class Prediction:
    ttft_s: float
    per_token_s: float
    ttlt_s: float

    def to_dict(self) -> dict[str, float]:
        return {"ttft_s": self.ttft_s, "per_token_s": self.per_token_s, "ttlt_s": self.ttlt_s}


def _stage_cost(
    shape: ModelShape, request: Request, device: Device, span: LayerSpan
) -> tuple[float, float]:
    """(prefill seconds, per-token seconds) of `device` running `span`, its link included."""
    share = shape.span_compute_bytes(span) / shape.compute_bytes
    per_token = share * device.seconds_per_token()
    prefill = share * device.seconds_per_prompt_token() * request.prompt_tokens
    if not device.holds_model and span not in device.held:
        prefill += shape.span_memory(span, 0, 0) / device.fetch_bps
    if not device.is_local:
        in_bytes = 4 if span.is_first() else 4 * shape.hidden_size
        out_bytes = request.logit_bytes if span.is_last(shape.num_layers) else 4 * shape.hidden_size
        per_token += device.rtt_s + (in_bytes + out_bytes) / device.bandwidth_bps
        chunks = math.ceil(request.prompt_tokens / request.prefill_chunk)
        transfer = request.prompt_tokens * (in_bytes + out_bytes) / device.bandwidth_bps
        prefill += chunks * device.rtt_s + transfer
    return prefill, per_token


def predict(shape: ModelShape, request: Request, stages: Sequence[tuple[Device, LayerSpan]],
            chain: bool = False) -> Prediction:
    """Predicted TTFT, per-token time and time-to-last-token of running `stages` in order; `chain`: decode
    steps pass between consecutive remote stages directly where their RTT is known."""
    prefill = per_token = 0.0
    for device, span in stages:
        p, t = _stage_cost(shape, request, device, span)
        prefill, per_token = prefill + p, per_token + t
    if chain:
        per_token += sum(chain_saving(shape, a, b) for (a, _), (b, _) in itertools.pairwise(stages))
    return Prediction(prefill, per_token, prefill + (request.max_tokens - 1) * per_token)


def rtt_between(a: Device, b: Device) -> float | None:
    """The RTT of the two peers' own link, as either advertises it (the lower, if both do), or None."""
    known = [rtt for device, other in ((a, b), (b, a)) for peer, rtt in device.peer_rtts if peer == other.id]
    return min(known) if known else None


def chain_saving(shape: ModelShape, a: Device, b: Device) -> float:
    """Per-token seconds a chain changes at the boundary from stage device `a` to the next, `b` (negative: it
    saves): one hop between them instead of a's answer to the origin and the origin's call to b. 0 unless both
    are peers, different ones, this node would link to both directly (`offload_link`: a chain runs over
    direct tensor links only, so never through a browser tab), and their RTT is known."""
    if a.is_local or b.is_local or a.id == b.id or not (a.offload_link and b.offload_link):
        return 0.0
    direct = rtt_between(a, b)
    if direct is None:
        return 0.0
    hidden = 4 * shape.hidden_size
    star = (a.rtt_s + b.rtt_s) / 2 + hidden / a.bandwidth_bps + hidden / b.bandwidth_bps
    return direct / 2 + hidden / min(a.bandwidth_bps, b.bandwidth_bps) - star


def predict_offload(shape: ModelShape, request: Request, device: Device) -> Prediction:
    """Offload: the whole request runs on `device`; one RTT for the request, tokens stream back pipelined."""
    whole = LayerSpan.whole(shape.num_layers)
    local_view = dataclasses.replace(device, id=LOCAL)  # its compute, without per-step links
    prefill, per_token = _stage_cost(shape, request, local_view, whole)
    prefill += device.rtt_s + request.prompt_tokens * 4 / device.bandwidth_bps
    per_token += offload_token_s(device)
    return Prediction(prefill, per_token, prefill + (request.max_tokens - 1) * per_token)


def offload_token_s(device: Device) -> float:
    """What each token of an offload to `device` adds to its stream: `OFFLOAD_LINK_TOKEN_S` over a direct
    link, else `OFFLOAD_TOKEN_S` (the data channel)."""
    return OFFLOAD_LINK_TOKEN_S if device.offload_link else OFFLOAD_TOKEN_S


def relay_token_s(device: Device) -> float:
    """The local node's CPU per token it relays from an offload to `device`: `RELAY_LINK_TOKEN_S` over a
    direct link, else `RELAY_TOKEN_S`."""
    return RELAY_LINK_TOKEN_S if device.offload_link else RELAY_TOKEN_S


def relay_share(streams: Iterable[tuple[int, Device]]) -> float:
    """The share of the local node's CPU its relays take: for each (requests offloaded there and still
    running, peer), `relay_token_s(peer)` × those requests' tokens/s (the peer's decode speed under its
    load), capped at `MAX_RELAY_SHARE`."""
    share = sum(count * relay_token_s(peer) / peer.seconds_per_token() for count, peer in streams
                if count > 0 and peer.decode_tps > 0)
    return min(MAX_RELAY_SHARE, share)


def max_layers(
    shape: ModelShape, request: Request, device: Device, policy: PolicyConfig, first: bool, last: bool
) -> int:
    """How many layers `device` can hold in a stage at that position (0 if not even the extras fit)."""
    budget = device.memory_budget(policy) - request.overhead_bytes
    if first:
        budget -= shape.embed_bytes
    if last:
        budget -= shape.head_bytes
    per_layer = shape.layer_bytes + request.context_tokens * shape.kv_bytes_per_token_layer
    if budget < 0:
        return 0
    return shape.num_layers if per_layer == 0 else min(shape.num_layers, budget // per_layer)


def request_memory(shape: ModelShape, request: Request) -> int:
    """Bytes a request run whole needs on a device whose engine has the model loaded: its KV cache in every
    layer plus `overhead_bytes` (the weights are there already)."""
    kv = request.context_tokens * shape.kv_bytes_per_token_layer * shape.num_layers
    return kv + request.overhead_bytes


def runs_whole(shape: ModelShape, request: Request, device: Device, policy: PolicyConfig) -> bool:
    """Whether `device`'s memory budget can take the request whole: only `request_memory` where its engine
    has the model loaded (`Device.loaded`), else the whole model's weights and KV (`max_layers`)."""
    if device.loaded:
        return request_memory(shape, request) <= device.memory_budget(policy)
    return max_layers(shape, request, device, policy, True, True) >= shape.num_layers
