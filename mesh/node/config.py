"""Node configuration: TOML file, then `SHOAL_<SECTION>_<KEY>` environment variables, then CLI flags.

Each TOML section is a frozen dataclass owned by one subsystem (`[api]`, `[policy]`, `[models]` here;
`[ipfs]`, `[mesh]` and `[split]` in their packages); `NodeConfig` composes them. Values are validated in
`__post_init__`; every problem is raised as `ConfigError` with a message naming the section and key.

Top-level keys: `name` (the node's display name), `data_dir` and `compile_cache`. Env: `SHOAL_NAME`,
`SHOAL_DATA_DIR`, `SHOAL_COMPILE_CACHE`. The environment is read here only (`load_config`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
from shoal.mesh.ipfs.config import IpfsConfig
from shoal.mesh.p2p.config import MeshConfig
from shoal.mesh.sections import ConfigError, section_from_mapping
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.policy import PolicyConfig

__all__ = ["ConfigError", "PolicyConfig", "SplitConfig", "section_from_mapping"]

APP_NAME = "shoal"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8740
DEFAULT_MODEL = "smollm2-135m-instruct"
BACKENDS = ("tvm", "numpy")
DEFAULT_CACHE_TOKENS = 4096
"""`[models] cache_tokens`: ~190 MB of fp32 KV for SmolLM2-135M; room for 7 chats of 512 tokens at once."""
DEFAULT_MAX_TOKENS = 512
MAX_KEEP_ALIVE_S = 366 * 86400.0
"""The longest finite `keep_alive` (a year); longer is as good as forever (negative)."""


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME))


def is_loopback(host: str) -> bool:
    """True when `host` can only be reached from this machine (127.0.0.0/8, ::1, `localhost`)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_origin(text: str) -> bool:
    """`*`, or a web origin: `http(s)://host[:port]` with nothing after it."""
    if text == "*":
        return True
    scheme, sep, rest = text.partition("://")
    return scheme in ("http", "https") and bool(sep) and bool(rest) and not any(c in rest for c in "/?#@ ")


@dataclass(frozen=True)
class ApiConfig:
    """`[api]`: the local HTTP endpoint."""

    host: str = DEFAULT_HOST
    """Address to bind. Anything but loopback requires `key`."""
    port: int = DEFAULT_PORT
    """TCP port (0 picks a free one)."""
    key: str | None = None
    """Bearer token clients must send (`Authorization: Bearer KEY`). Required off loopback."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted; bigger ones get 413."""
    request_log_size: int = 256
    """How many recent requests `/v1/mesh/requests` keeps."""
    log_buffer_size: int = 2000
    """How many log lines `/v1/logs` keeps."""
    shutdown_grace_s: float = 10.0
    """On SIGINT/SIGTERM, how long in-flight streams may run before they are cancelled."""
    allowed_hosts: tuple[str, ...] = ()
    """Extra names clients may send in `Host` (loopback names, the address a client connected to, `host` and
    `[mesh] advertise` always may); `*` allows any (only behind a proxy that checks it). Others get 403."""
    allowed_origins: tuple[str, ...] = ()
    """Web origins (`https://app.example:8443`) whose pages may call the API from a browser; same-origin
    pages always may. Other cross-site browser requests get 403."""
    read_timeout_s: float = 30.0
    """A request whose headers or body stop arriving for this long is dropped (408, connection closed)."""

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range 0-65535")
        if self.key is not None and len(self.key) < 8:
            raise ValueError("key must be at least 8 characters")
        if not 1024 <= self.max_body_bytes <= 1 << 30:
            raise ValueError("max_body_bytes must be between 1 KiB and 1 GiB")
        if not 1 <= self.request_log_size <= 100_000:
            raise ValueError("request_log_size must be between 1 and 100000")
        if not 1 <= self.log_buffer_size <= 1_000_000:
            raise ValueError("log_buffer_size must be between 1 and 1000000")
        if not 0 <= self.shutdown_grace_s <= 3600:
            raise ValueError("shutdown_grace_s must be between 0 and 3600")
        for host in self.allowed_hosts:
            if not isinstance(host, str) or not host or any(c in host for c in " /@[]"):
                raise ValueError(f"allowed_hosts entry {host!r} must be a host name or address, e.g. box.lan")
        for origin in self.allowed_origins:
            if not isinstance(origin, str) or not _is_origin(origin):
                raise ValueError(
                    f"allowed_origins entry {origin!r} must be '*' or scheme://host[:port], e.g. https://app.lan"
                )
        if not 1 <= self.read_timeout_s <= 3600:
            raise ValueError("read_timeout_s must be between 1 and 3600")

    def check_exposure(self) -> None:
        """Refuse to serve beyond this machine without an API key."""
        if not is_loopback(self.host) and not self.key:
            raise ConfigError(
                f"refusing to listen on {self.host}: binding a non-loopback address requires an API key "
                "(--api-key KEY, SHOAL_API_KEY or [api] key); clients then send 'Authorization: Bearer KEY'"
            )


@dataclass(frozen=True)
class ModelsConfig:
    """`[models]`: which model the node serves and how it runs it."""

    default: str = DEFAULT_MODEL
    """Model used when a request names none, and prepared at start."""
    backend: str = "tvm"
    """`tvm` (compiled for this device) or `numpy` (reference, slow)."""
    target: str | None = None
    """TVM target kind (`llvm`, `cuda`); none: detect."""
    max_batch: int = 8
    """Sequences decoded together (continuous batching)."""
    preload: bool = True
    """Load (and compile if needed) the default model at start."""
    context: int | None = None
    """Longest prompt + completion of one request, in tokens; none: the model's trained context. Never more
    than the trained context or `cache_tokens`."""
    cache_tokens: int = DEFAULT_CACHE_TOKENS
    """KV-cache tokens over all requests running at once (fp32: ~46 KB a token for SmolLM2-135M). Each
    request reserves prompt + max_tokens of it before it starts; the others wait."""
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    """`max_tokens` of a chat completion that sets none (and of engine streams without one)."""
    queue_size: int = 32
    """Requests that may wait for room in the KV cache; one more gets 429 with `Retry-After`."""
    queue_timeout_s: float = 600.0
    """Longest wait for room in the KV cache; past it the request gets 503 with `Retry-After` (as long as
    the `openai` client's own default timeout: long generations on a small machine take minutes)."""
    memory_budget_mb: int | None = None
    """Memory the loaded models may take together, in MiB (each model's estimate from `shoal.models.memory`:
    weights + KV cache at `cache_tokens` + workspace); none: half the machine's RAM. Loading past it first
    unloads idle models (least recently used); if it still does not fit, the request gets 503
    `model_memory_budget`."""
    keep_alive_s: float = 300.0
    """How long a model stays loaded after its last request (a request's own `keep_alive` overrides it);
    0 unloads right after each request, negative keeps models loaded (never unloaded automatically)."""
    keep_default_loaded: bool = True
    """Keep the `default` model loaded (as a negative `keep_alive_s` does for it): never unloaded for idleness
    or to make room, unless a request's own `keep_alive` or an explicit unload says otherwise."""

    def __post_init__(self) -> None:
        if not self.default:
            raise ValueError("default must name a model")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if not 1 <= self.max_batch <= 256:
            raise ValueError(f"max_batch {self.max_batch} must be between 1 and 256")
        if self.context is not None and not 16 <= self.context <= 1 << 20:
            raise ValueError(f"context {self.context} must be between 16 and 1048576 tokens (or none)")
        if not 16 <= self.cache_tokens <= 1 << 22:
            raise ValueError(f"cache_tokens {self.cache_tokens} must be between 16 and 4194304")
        if not 1 <= self.default_max_tokens <= 1 << 20:
            raise ValueError(f"default_max_tokens {self.default_max_tokens} must be between 1 and 1048576")
        if not 1 <= self.queue_size <= 100_000:
            raise ValueError(f"queue_size {self.queue_size} must be between 1 and 100000")
        if not 0 < self.queue_timeout_s <= 3600:
            raise ValueError(f"queue_timeout_s {self.queue_timeout_s} must be in (0, 3600]")
        if self.memory_budget_mb is not None and not 16 <= self.memory_budget_mb <= 1 << 30:
            raise ValueError(f"memory_budget_mb {self.memory_budget_mb} must be between 16 and 1073741824 "
                             "MiB (or none: half the machine's RAM)")
        if not self.keep_alive_s <= MAX_KEEP_ALIVE_S:  # NaN fails too
            raise ValueError(f"keep_alive_s {self.keep_alive_s} must be at most {MAX_KEEP_ALIVE_S:.0f} s "
                             "(a year; negative: forever)")


@dataclass(frozen=True)
class NodeConfig:
    """The whole node's configuration."""

    name: str = ""
    """The node's human name; empty: the host name plus a short suffix of its peer id (`laptop-7qzk`)."""
    data_dir: Path = field(default_factory=default_data_dir)
    api: ApiConfig = field(default_factory=ApiConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    ipfs: IpfsConfig = field(default_factory=IpfsConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    compile_cache: Path | None = None
    """Where compiled models are kept; none: `data_dir/compile`. Env: `SHOAL_COMPILE_CACHE`."""

    def __post_init__(self) -> None:
        if len(self.name) > 64:
            raise ValueError("name must be at most 64 characters")
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser())
        if self.compile_cache is not None:
            object.__setattr__(self, "compile_cache", Path(self.compile_cache).expanduser())

    @property
    def blocks_dir(self) -> Path:
        return self.data_dir / "blocks"

    @property
    def compile_dir(self) -> Path:
        return self.compile_cache or self.data_dir / "compile"

    @property
    def identity_dir(self) -> Path:
        return self.data_dir / "identity"


SECTIONS: dict[str, type] = {
    "api": ApiConfig,
    "policy": PolicyConfig,
    "models": ModelsConfig,
    "ipfs": IpfsConfig,
    "mesh": MeshConfig,
    "split": SplitConfig,
}
TOP_LEVEL = ("name", "data_dir", "compile_cache")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """`SHOAL_<SECTION>_<KEY>` → {section: {key: text}}; `SHOAL_NAME`, `SHOAL_DATA_DIR` → top level."""
    found: dict[str, Any] = {}
    for key in TOP_LEVEL:
        env_name = f"SHOAL_{key.upper()}"
        if env_name in environ:
            found[key] = environ[env_name]
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            env_name = f"SHOAL_{section.upper()}_{f.name.upper()}"
            if f.init and env_name in environ:
                found.setdefault(section, {})[f.name] = environ[env_name]
    return found


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def load_config(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Compose the node config: file (`path`, else the default file when it exists) < env < `overrides`.

    `overrides` has the file's shape, e.g. `{"api": {"port": 9000}, "data_dir": "/tmp/x"}`.
    """
    environ = os.environ if environ is None else environ
    if path is None:
        env_path = environ.get("SHOAL_CONFIG")
        path = Path(env_path) if env_path else None
        if path is None and default_config_path().is_file():
            path = default_config_path()
    raw = read_toml(Path(path).expanduser()) if path is not None else {}
    raw = _merge(raw, env_overrides(environ))
    raw = _merge(raw, overrides or {})
    unknown = sorted(k for k in raw if k not in SECTIONS and k not in TOP_LEVEL)
    if unknown:
        raise ConfigError(
            f"unknown config section(s) or key(s): {', '.join(unknown)}; "
            f"sections are {', '.join(f'[{s}]' for s in SECTIONS)}, top-level keys are {', '.join(TOP_LEVEL)}"
        )
    kwargs: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        if section in raw:
            if not isinstance(raw[section], Mapping):
                raise ConfigError(f"[{section}] must be a table")
            kwargs[section] = section_from_mapping(cls, raw[section], section)
    for key in TOP_LEVEL:
        if key in raw:
            value = raw[key]
            if not isinstance(value, str):
                raise ConfigError(f"{key} must be a string, got {value!r}")
            kwargs[key] = Path(value) if key in ("data_dir", "compile_cache") else value
    try:
        return NodeConfig(**kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def parse_host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[::1]:PORT` or `:PORT` (loopback) → (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ConfigError(f"--api {text!r} must look like HOST:PORT, e.g. 127.0.0.1:8740")
    host = host.strip("[]") or DEFAULT_HOST
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"--api {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--api {text!r}: port {port} is out of range 0-65535")
    return host, port
