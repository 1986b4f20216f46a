"""Settings of the IPFS layer: where blocks come from, how long to wait, how hard to retry."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlparse

SOURCE_KINDS = ("local", "mesh", "rpc", "gateway")


def _check_url(url: str, what: str) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"{what} must be an http(s) URL like http://127.0.0.1:5001, not {url!r}")


@dataclass(frozen=True)
class IpfsConfig:
    rpc_url: str | None = "http://127.0.0.1:5001"
    """A local IPFS node's RPC API (Kubo or js-ipfs); None to never ask one."""
    gateways: tuple[str, ...] = field(default=())
    """Trustless HTTP gateways (or other shoal nodes), e.g. ("http://192.168.1.7:8600",). Tried in order."""
    source_order: tuple[str, ...] = SOURCE_KINDS
    """Policy order of source kinds; the local store is always asked first."""
    block_timeout_s: float = 15.0
    """Per-source timeout for one block."""
    connect_timeout_s: float = 3.0
    """Timeout to open a connection to a source."""
    parallelism: int = 8
    """Blocks fetched at once during a pull."""
    retries: int = 4
    """Rounds over all sources before a block is declared missing."""
    stall_timeout_s: float = 120.0
    """A whole-model pull that gets no new block for this long fails (`PullStalledError`)."""
    backoff_base_s: float = 0.2
    """First back-off after a source fails; doubles per consecutive failure."""
    backoff_max_s: float = 30.0
    """Cap of a source's back-off."""
    ban_after_bad_blocks: int = 3
    """A source that serves this many blocks failing verification is banned for `ban_s`."""
    ban_s: float = 300.0
    fsync: bool = True
    """fsync each block before renaming it into place (turn off only for throwaway stores)."""
    publish_dirs: tuple[str, ...] = ()
    """Folders whose files `POST /v1/models/publish {"path"}` may import (absolute; default none: the API
    then only takes uploads). The CLI publishes any file its user can read."""
    max_upload_bytes: int = 64 << 30
    """Largest file `POST /v1/models/publish` takes as an upload; bigger ones get 413."""

    def __post_init__(self) -> None:
        if self.rpc_url is not None:
            _check_url(self.rpc_url, "ipfs rpc_url")
        for url in self.gateways:
            _check_url(url, "ipfs gateway")
        unknown = [kind for kind in self.source_order if kind not in SOURCE_KINDS]
        if unknown:
            raise ValueError(f"unknown ipfs source kinds {unknown}; use some of {list(SOURCE_KINDS)}")
        for name in ("block_timeout_s", "connect_timeout_s", "backoff_base_s", "backoff_max_s", "ban_s",
                     "stall_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ipfs {name} must be positive, not {getattr(self, name)}")
        if not 1 <= self.parallelism <= 256:
            raise ValueError(f"ipfs parallelism must be between 1 and 256, not {self.parallelism}")
        if not 1 <= self.retries <= 100:
            raise ValueError(f"ipfs retries must be between 1 and 100, not {self.retries}")
        if self.ban_after_bad_blocks < 1:
            raise ValueError("ipfs ban_after_bad_blocks must be at least 1")
        for folder in self.publish_dirs:
            if not isinstance(folder, str) or not os.path.isabs(os.path.expanduser(folder)):
                raise ValueError(f"ipfs publish_dirs entry {folder!r} must be an absolute path")
        if not 1 <= self.max_upload_bytes <= 1 << 40:
            raise ValueError("ipfs max_upload_bytes must be between 1 byte and 1 TiB")

    @classmethod
    def from_dict(cls, raw: dict) -> IpfsConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown [ipfs] settings: {sorted(unknown)}")
        values = dict(raw)
        for name in ("gateways", "source_order", "publish_dirs"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)
