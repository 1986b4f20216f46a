"""The native step lane: a stage node's steady decode step on a direct tensor link, read and answered in C.

Why: a split's decode step runs each stage's compute back to back, and the compute streams the stage's
weights through the caches. The Python that reads, checks, encodes and seals a step then runs cold: ~240 µs
a stage on the znver4 VM (in one process, with a 64 MB sweep standing in for the compute), against ~70 µs
for the same work in one native call each way (`native/steplane.c`; docs/split.md, *The native step lane*).

How: after the generic path (`StageHost._link_frame`) has answered a decode step of one sequence whose inputs
are float32 hidden states, `arm` gives the link a `StepLane`: the record's header (`INPUT_HEAD` and its
sequence id) and the answer's header. The next record on that link is first offered to `_steplane.take`,
which takes it only when it is that same step but for its request id and step: the same length, the same
header bytes, a step in bounds and finite values — exactly what `wire.decode_input`, `Sessions.find` and
`hosted.check_inputs` accepted for the armed record, which depends on nothing else in the frame. Anything
else goes back, unread or opened, to the generic path, which disarms the link and arms it again once a step
qualifies. State that can change between steps (the sequences open, the chain's next link, where the origin
is answered) is checked on every step, as the generic path does.

The stage's compute, the counting (receipts, quota) and every error are the generic path's own code
(`StageHost._lane_step`). A node where the lane cannot be built (`split.native`) or `[split] native_lane =
false` runs the generic path only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from shoal.mesh.split import wire
from shoal.mesh.split.hosted import HostedStage
from shoal.mesh.split.stage_sessions import Session

LANE_OPS = ("decode", "chain", "forward")
"""The steps a lane takes: a decode step, from the origin or (a chain) from the stage before."""


@dataclass(slots=True, eq=False)
class StepLane:
    """A link's armed steady step."""

    head: bytes
    """The step's payload header as armed (`INPUT_HEAD` + its sequence id); its step bytes are ignored."""
    inputs: np.ndarray
    """float32 [1, hidden]: where `take` writes each step's values."""
    session: Session
    hosted: HostedStage
    op: str
    ids: list[int]
    """The stage's local sequence id, as the compute takes it."""
    generation: int
    """`Sessions.generation` when armed: any sequence opened or closed since disarms the lane."""
    passing: bool
    """The answer goes on to the chain's next stage (`next_peer`) rather than to the origin."""
    out_head: bytes
    """The answer's header, its step (and, for an answer to the origin, its compute time) filled per step."""
    top_1: bool
    """The answer carries the logits row's argmax (id, value) instead of the row."""

    def current(self, generation: int) -> bool:
        """Whether the lane still describes the session as it is: the same sequences open, the chain as
        armed, and someone to answer."""
        session = self.session
        if generation != self.generation or self.passing != (self.op in wire.CHAIN_OPS and session.chained):
            return False
        return self.passing or session.reply_link is not None or self.op != "forward"


def arm(frame_payload: bytes, message: wire.TensorMessage, sessions: list[Session], out: np.ndarray,
        passing: bool, generation: int) -> StepLane | None:
    """The lane for the step just answered the generic way, or None when such steps do not qualify (several
    sequences, prefill, token ids, float16 either way, logits other than the argmax)."""
    array = message.array
    if (len(sessions) != 1 or message.op not in LANE_OPS or message.reply_f16 or array is None
            or array.dtype != np.float32 or array.shape[0] != 1 or array.ndim != 2):
        return None
    if out.dtype != np.float32 or out.ndim != 2 or out.shape[0] != 1 or not out.flags.c_contiguous:
        return None
    session = sessions[0]
    top_1 = False
    if passing:
        out_head = wire.input_head("forward", 0, [session.place.next_seq], out, message.top_k)
    elif session.hosted.stage.span.is_last(session.hosted.stage.config.num_layers):
        if message.top_k != 1:  # full rows or top-k: sampling, which the lane leaves to the generic path
            return None
        top_1 = True
        out_head = wire.logits_head(0, 1, out.shape[1], 1)
    else:
        out_head = wire.hidden_head(0, out)
    head = frame_payload[: wire.INPUT_HEAD.size + wire.ONE_SEQ.size]
    return StepLane(head, np.empty_like(array, dtype=np.float32), session, session.hosted, message.op,
                    [session.local_id], generation, passing, out_head, top_1)
