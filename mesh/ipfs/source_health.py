"""How each block source has behaved: a source that fails is backed off exponentially (capped), one that
serves blocks failing verification is banned for `ban_s` once it has served `ban_after_bad_blocks` of them."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from shoal.mesh.ipfs.config import IpfsConfig
from shoal.mesh.ipfs.sources import BlockSource

logger = logging.getLogger(__name__)


@dataclass
class _Health:
    failures: int = 0
    retry_at: float = 0.0
    bad_blocks: int = 0


class SourceHealth:
    """Back-off and bans of the sources one fetcher asks, by source name."""

    def __init__(self, sources: Sequence[BlockSource], config: IpfsConfig) -> None:
        self.config = config
        self._health: dict[str, _Health] = {s.name: _Health() for s in sources}

    def retry_at(self, source: BlockSource) -> float:
        """The `time.monotonic()` before which `source` is not asked (0 when it may be asked now)."""
        return self._health.setdefault(source.name, _Health()).retry_at

    def ready(self, sources: Sequence[BlockSource]) -> list[BlockSource]:
        """The sources that may be asked now, in order."""
        now = time.monotonic()
        return [s for s in sources if self.retry_at(s) <= now]

    def penalise(self, source: BlockSource, bad_block: bool) -> None:
        health = self._health.setdefault(source.name, _Health())
        health.failures += 1
        if bad_block:
            health.bad_blocks += 1
        if health.bad_blocks >= self.config.ban_after_bad_blocks:
            health.retry_at = time.monotonic() + self.config.ban_s
            logger.warning("source %s banned for %.0f s (bad blocks)", source.name, self.config.ban_s)
            return
        delay = min(self.config.backoff_base_s * 2 ** (health.failures - 1), self.config.backoff_max_s)
        health.retry_at = time.monotonic() + delay

    def reward(self, source: BlockSource) -> None:
        health = self._health.setdefault(source.name, _Health())
        health.failures = 0
        health.retry_at = 0.0
