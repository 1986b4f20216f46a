"""Node configuration: TOML < SHOAL_* environment < flags, validation with actionable messages."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from shoal.mesh.commands.node import config_overrides
from shoal.mesh.node.config import ConfigError, PolicyConfig, is_loopback, load_config, parse_host_port
from shoal.mesh.split.config import SplitConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_without_file(tmp_path: Path) -> None:
    config = load_config(environ={"SHOAL_CONFIG": str(write(tmp_path, ""))})
    assert (config.api.host, config.api.port, config.api.key) == ("127.0.0.1", 8740, None)
    assert config.models.default == "smollm2-135m-instruct" and config.models.backend == "tvm"
    assert config.policy == PolicyConfig()
    assert config.blocks_dir == config.data_dir / "blocks"
    assert config.compile_dir == config.data_dir / "compile"
    assert config.identity_dir == config.data_dir / "identity"


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
name = "kitchen"
data_dir = "/tmp/shoal-a"
[api]
port = 9001
host = "127.0.0.2"
[policy]
battery_floor = 30
serve_others = true
[models]
backend = "numpy"
max_batch = 4
""",
    )
    env = {
        "SHOAL_API_PORT": "9002",
        "SHOAL_POLICY_MAX_MEMORY_SHARE": "0.25",
        "SHOAL_POLICY_PREFER_LOCAL": "no",
        "SHOAL_DATA_DIR": "/tmp/shoal-b",
        "SHOAL_COMPILE_CACHE": "/elsewhere",
    }
    config = load_config(path, environ=env)
    assert config.name == "kitchen"
    assert config.api.port == 9002 and config.api.host == "127.0.0.2"
    assert config.policy.battery_floor == 30 and config.policy.serve_others is True
    assert config.policy.max_memory_share == 0.25 and config.policy.prefer_local is False
    assert config.models.backend == "numpy" and config.models.max_batch == 4
    assert config.data_dir == Path("/tmp/shoal-b")
    args = argparse.Namespace(
        api="127.0.0.1:9003", api_key="secret-key-1", data_dir=Path("/tmp/shoal-c"), backend="tvm"
    )
    config = load_config(path, environ=env, overrides=config_overrides(args))
    assert config.api.port == 9003 and config.api.key == "secret-key-1"
    assert config.data_dir == Path("/tmp/shoal-c") and config.models.backend == "tvm"


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[api\nport = 1", {}, "not valid TOML"),
        ("[apii]\nport = 1", {}, "unknown config section"),
        ("[api]\nprot = 1", {}, "[api] has unknown key(s) prot"),
        ('[api]\nport = "high"', {}, "[api] port must be an integer"),
        ("[api]\nport = 70000", {}, "port 70000 is out of range"),
        ("[policy]\nbattery_floor = 120", {}, "battery_floor 120 is out of range 0-100"),
        ("[policy]\nmax_memory_share = 0", {}, "max_memory_share 0.0 must be in (0, 1]"),
        ('[models]\nbackend = "cuda-magic"', {}, "backend 'cuda-magic' is not one of tvm, numpy"),
        ("", {"SHOAL_API_PORT": "eighty"}, "[api] port must be an integer, got 'eighty'"),
        ("", {"SHOAL_POLICY_SERVE_OTHERS": "perhaps"}, "[policy] serve_others must be true or false"),
        ("", {"SHOAL_API_KEY": "short"}, "key must be at least 8 characters"),
        ("api = 3", {}, "[api] must be a table"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, toml: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, toml), environ=env)
    assert message in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_ipfs_section_is_composed(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, '[ipfs]\ngateways = ["http://127.0.0.1:8081"]\nparallelism = 4\n'), environ={}
    )
    assert config.ipfs.gateways == ("http://127.0.0.1:8081",) and config.ipfs.parallelism == 4
    with pytest.raises(ConfigError, match=r"\[ipfs\]"):
        load_config(write(tmp_path, "[ipfs]\nparallelism = 0\n"), environ={})


def test_split_section_holds_the_split_timeouts(tmp_path: Path) -> None:
    path = write(tmp_path, "[split]\nrebuild_timeout_s = 90\nmax_replans = 1\ndirect_tensors = false\n")
    env = {"SHOAL_SPLIT_SPAN_FETCH_TIMEOUT_S": "120.5", "SHOAL_SPLIT_LINK_RECORD_TIMEOUT_S": "2"}
    config = load_config(path, environ=env)
    assert config.split == SplitConfig(rebuild_timeout_s=90.0, max_replans=1, direct_tensors=False,
                                       span_fetch_timeout_s=120.5, link_record_timeout_s=2.0)
    assert isinstance(config.split.rebuild_timeout_s, float)
    assert load_config(write(tmp_path, ""), environ={}).split == SplitConfig()
    for toml, env, message in [
        ("[split]\nrebuild_timeout_s = 0", {}, "rebuild_timeout_s must be in (0, 86400] seconds"),
        ("[split]\nstage_timeout_s = true", {}, "[split] stage_timeout_s must be a number"),
        ("[split]\nmax_replans = 1.5", {}, "[split] max_replans must be an integer"),
        ("[split]\nmax_sequences = 0", {}, "max_sequences 0 must be between 1 and 4096"),
        ("[split]\nlink_spin_us = 6000", {}, "link_spin_us 6000 must be between 0 and 5000"),
        ("[split]\nrecord_timeout = 1", {}, "[split] has unknown key(s) record_timeout"),
        ("", {"SHOAL_SPLIT_OPEN_TIMEOUT_S": "soon"}, "[split] open_timeout_s must be a number, got 'soon'"),
        ("[mesh]\ndirect_tensors = true", {}, "[mesh] has unknown key(s) direct_tensors"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, toml), environ=env)
        assert message in str(info.value)


def test_non_loopback_needs_a_key() -> None:
    config = load_config(environ={}, overrides={"api": {"host": "0.0.0.0"}})
    with pytest.raises(ConfigError, match="requires an API key"):
        config.api.check_exposure()
    keyed = load_config(environ={}, overrides={"api": {"host": "0.0.0.0", "key": "long-enough-key"}})
    keyed.api.check_exposure()
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")


def test_policy_partial_update_is_strict() -> None:
    policy = PolicyConfig()
    assert policy.updated({"battery_floor": 55}).battery_floor == 55
    assert policy.updated({"max_memory_share": 1}).max_memory_share == 1.0
    with pytest.raises(ConfigError, match="battery_floor must be an integer"):
        policy.updated({"battery_floor": "55"})
    with pytest.raises(ConfigError, match="unknown key"):
        policy.updated({"volume": 11})


def test_parse_host_port() -> None:
    assert parse_host_port("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_host_port(":9000") == ("127.0.0.1", 9000)
    assert parse_host_port("[::1]:9000") == ("::1", 9000)
    for bad in ("localhost", "host:port", "h:99999"):
        with pytest.raises(ConfigError):
            parse_host_port(bad)


def test_the_test_node_config_file_is_what_load_config_reads(tmp_path: Path) -> None:
    from tests.nodes import NodeProcess, to_toml

    node = NodeProcess("n1", tmp_path / "n1", {"models": {"backend": "numpy", "preload": False},
                                               "split": {"rebuild_timeout_s": 45, "direct_tensors": False}},
                       port=9123, key="a-long-api-key")
    config = load_config(write(tmp_path, to_toml(node.config())), environ={})
    assert (config.name, config.data_dir, config.api.port, config.api.key) == ("n1", tmp_path / "n1", 9123,
                                                                               "a-long-api-key")
    assert config.models.backend == "numpy" and config.models.preload is False
    assert config.mesh.mdns is False and config.mesh.ice_interfaces == ("lo",) and config.ipfs.rpc_url is None
    assert config.split == SplitConfig(rebuild_timeout_s=45.0, direct_tensors=False)


def test_compile_cache_is_a_top_level_setting(tmp_path: Path) -> None:
    base = {"SHOAL_CONFIG": str(write(tmp_path, 'data_dir = "/tmp/shoal-d"\n'))}
    assert load_config(environ=base).compile_dir == Path("/tmp/shoal-d/compile")
    env = {**base, "SHOAL_COMPILE_CACHE": "/elsewhere"}
    assert load_config(environ=env).compile_dir == Path("/elsewhere")
    in_file = write(tmp_path, 'compile_cache = "/cache/here"\n')
    assert load_config(in_file, environ={}).compile_dir == Path("/cache/here")


def test_store_commands_use_the_node_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shoal.mesh.commands.cli import CommandError
    from shoal.mesh.commands.node_client import data_dir

    monkeypatch.delenv("SHOAL_DATA_DIR", raising=False)
    monkeypatch.setenv("SHOAL_CONFIG", str(write(tmp_path, 'data_dir = "/srv/shoal"\n')))
    assert data_dir(None) == Path("/srv/shoal")  # `shoal publish/pull/models` use the node's store
    monkeypatch.setenv("SHOAL_DATA_DIR", "/tmp/shoal-env")
    assert data_dir(None) == Path("/tmp/shoal-env")
    assert data_dir(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.setenv("SHOAL_CONFIG", str(write(tmp_path, "[apii]\n")))
    with pytest.raises(CommandError, match="unknown config section"):
        data_dir(None)
