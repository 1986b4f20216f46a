"""The sequences a stage host serves (`StageHost`): each opened by an origin peer under a u32 of its choosing,
and — a chain's stage (`split.stage_chain`) — fed by the stage before it under an id this host chose (its
`feed`, unique here: no peer can take another's). A frame's sequences are found here, by the peer it came
from."""

from __future__ import annotations

from dataclasses import dataclass, field

from shoal.mesh.split import wire
from shoal.mesh.split.hosted import HostedStage
from shoal.mesh.split.stage_chain import ChainPlace
from shoal.mesh.split.tensor_link_server import ServerLink


@dataclass
class Session:
    """One hosted sequence."""

    hosted: HostedStage
    local_id: int
    model: str = ""
    """The name a receipt gives the model: its CID where the origin sent one, else the name."""
    started: float = 0.0
    tokens_in: int = 0
    """Rows prefilled."""
    tokens_out: int = 0
    """Decode steps."""
    origin: str = ""
    """The peer whose request it is (it opened the sequence; receipts and quota are its)."""
    seq: int = 0
    """The origin's id for it."""
    feed: int = 0
    """A chain's stage: the id the stage before it names it by (this host's choice)."""
    place: ChainPlace = field(default_factory=ChainPlace)
    chained: bool = False
    """`forward` steps go on to `place.next_peer` (this node has a link to it)."""
    reply_link: ServerLink | None = None
    """The origin's direct link this sequence was last called on: the chain's last stage answers there."""

    def count(self, op: str, rows: int) -> None:
        """A call computed: its rows prefilled, or one decode step."""
        if op == "prefill":
            self.tokens_in += rows
        else:
            self.tokens_out += 1


class Sessions:
    """Sequences by (origin peer, seq), and chained ones also by (upstream peer, feed)."""

    def __init__(self) -> None:
        self._opened: dict[tuple[str, int], Session] = {}
        self._fed: dict[tuple[str, int], Session] = {}
        self.generation = 0
        """Counts every change of which sequences are open (a step lane armed before one is stale)."""

    def __len__(self) -> int:
        return len(self._opened)

    def taken(self, peer: str, seq: int) -> bool:
        return (peer, seq) in self._opened

    def add(self, session: Session) -> None:
        self.generation += 1
        self._opened[(session.origin, session.seq)] = session
        if session.place.upstream is not None:
            self._fed[(session.place.upstream, session.feed)] = session

    def get(self, peer: str, seq: int) -> Session | None:
        return self._opened.get((peer, seq))

    def pop(self, peer: str, seq: int) -> Session | None:
        self.generation += 1
        session = self._opened.pop((peer, seq), None)
        if session is not None and self._fed.get((session.place.upstream, session.feed)) is session:
            del self._fed[(session.place.upstream, session.feed)]
        return session

    def opened_by(self, peer: str) -> list[int]:
        return [seq for origin, seq in self._opened if origin == peer]

    def clear(self) -> None:
        self.generation += 1
        self._opened.clear()
        self._fed.clear()

    def find(self, peer: str, message: wire.TensorMessage, link: ServerLink | None) -> list[Session]:
        """The sequences a frame from `peer` names: those it feeds by their `feed` ids (a `forward` step on a
        direct link), else its own. A direct link's frame from the origin makes that link the one its
        sequences answer on. Raises FrameError."""
        if message.op in wire.CHAIN_OPS and link is None:
            raise wire.FrameError(wire.BAD_TENSOR, "a chain's steps travel on direct tensor links")
        if message.op == "forward":
            found = [self._fed.get((peer, s)) for s in message.seqs]
            if any(s is not None and not s.chained and s.reply_link is None for s in found):
                # its answer would have nowhere to go: refused before the stage runs it
                raise wire.FrameError(wire.BAD_REQUEST, "the origin has not called this sequence directly")
        else:
            found = [self._opened.get((peer, s)) for s in message.seqs]
            if link is not None and all(found):
                for session in found:
                    session.reply_link = link  # type: ignore[union-attr]
        sessions = [s for s in found if s is not None]
        if len(sessions) != len(found):
            missing = [s for s, session in zip(message.seqs, found, strict=True) if session is None]
            raise wire.FrameError(wire.UNKNOWN_SEQUENCE, f"unknown sequence(s) {missing[:4]}")
        first = sessions[0]
        if any(s.hosted is not first.hosted for s in sessions):
            raise wire.FrameError(wire.BAD_TENSOR, "one frame's sequences must share a stage")
        if message.op in wire.CHAIN_OPS and any(
                (s.origin, s.chained, s.place.next_peer, s.reply_link)
                != (first.origin, first.chained, first.place.next_peer, first.reply_link) for s in sessions):
            raise wire.FrameError(wire.BAD_TENSOR, "one chain step's sequences must share their chain")
        return sessions
