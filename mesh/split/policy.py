"""`[policy]`: what this node is willing to do for the mesh, and the one policy type the scheduler plans
under. Mutable at runtime (`PUT /v1/policy`): a change is a new frozen value (`updated`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shoal.mesh.sections import section_from_mapping


@dataclass(frozen=True)
class PolicyConfig:
    """`[policy]`: what this node is willing to do for the mesh. Mutable at runtime via `PUT /v1/policy`."""

    serve_others: bool = True
    """Run requests (or layer ranges) for other members of this node's mesh (a node in no mesh has no peers).
    The battery floor and the memory share still apply; false refuses every peer with code `refused`."""
    battery_floor: int = 20
    """Stop serving others when the battery is below this percentage (0-100)."""
    max_memory_share: float = 0.5
    """Largest share (0-1) of this device's memory that models may take."""
    trusted_only_splits: bool = False
    """Only plan splits and offloads onto peers on `[mesh] allow` (false: any member of the mesh)."""
    prefer_local: bool = False
    """Run locally whenever the local node can serve the request at all (false: the scheduler places each
    request where it is predicted to finish first — a slow or busy node offloads to a faster or idle member,
    with a margin against flapping: docs/split.md "Placement")."""
    metered: bool = False
    """This node is on a metered link (mobile data): it serves no peer (code `refused`) and, as origin, runs a
    request itself whenever it can (offloads and splits only what it cannot hold)."""
    max_tokens_per_peer_per_hour: int = 0
    """Most tokens (prompt + generated, or stage rows) this node serves one peer in a sliding hour; past it
    the peer is refused with code `quota` (its client answers 429 `peer_quota`). 0: no quota."""

    def __post_init__(self) -> None:
        for name in ("serve_others", "trusted_only_splits", "prefer_local", "metered"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false")
        if isinstance(self.battery_floor, bool) or not isinstance(self.battery_floor, int):
            raise ValueError("battery_floor must be an integer percentage 0-100")
        if not 0 <= self.battery_floor <= 100:
            raise ValueError(f"battery_floor {self.battery_floor} is out of range 0-100")
        if isinstance(self.max_memory_share, bool) or not isinstance(self.max_memory_share, int | float):
            raise ValueError("max_memory_share must be a number between 0 and 1")
        quota = self.max_tokens_per_peer_per_hour
        if isinstance(quota, bool) or not isinstance(quota, int) or quota < 0:
            raise ValueError("max_tokens_per_peer_per_hour must be a whole number of tokens, 0 for no quota")
        if not 0.0 < float(self.max_memory_share) <= 1.0:
            raise ValueError(f"max_memory_share {self.max_memory_share} must be in (0, 1]")
        object.__setattr__(self, "max_memory_share", float(self.max_memory_share))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def updated(self, changes: Mapping[str, Any]) -> PolicyConfig:
        """A copy with `changes` applied (a partial update); unknown keys and bad values raise ConfigError."""
        return section_from_mapping(PolicyConfig, {**self.to_dict(), **changes}, "policy", coerce=False)
