"""Plain tests of the TUI's pure parts: formatting, topology drawing, table rows, input checks, errors."""

from __future__ import annotations

import orjson
import pytest
from shoal.tui.client import (
    ApiError,
    ClientConfig,
    NotAvailable,
    SseComment,
    _error_from,
    iter_sse,
    progress_report,
)
from shoal.tui.connection import Backoff
from shoal.tui.format import (
    describe_route,
    human_bytes,
    human_eta,
    human_rate,
    route_kind,
    route_replans,
    short_id,
)
from shoal.tui.screens.logs import level_rank, log_line
from shoal.tui.screens.mesh import peer_row
from shoal.tui.screens.policy import parse_number
from shoal.tui.screens.requests import request_row
from shoal.tui.widgets.topology import draw_topology


def test_sizes_rates_and_etas() -> None:
    assert human_bytes(98_362_432) == "98.4 MB"
    assert human_bytes(512) == "512 B"
    assert human_bytes(None) == "—"
    assert human_rate(12_500_000) == "12.5 MB/s"
    assert human_eta(4.4) == "4s"
    assert human_eta(125) == "2m05s"
    assert human_eta(7260) == "2h01m"
    assert human_eta(None) == "—"
    assert short_id("p5ua52uc74q6mlafele5bi437jy", 8) == "p5ua52u…"


def test_routes() -> None:
    route = {
        "kind": "split",
        "peers": ["peer-a-long-id", {"name": "laptop"}],
        "spans": [[0, 15], [15, 30]],
        "replans": 1,
    }
    assert route_kind(route) == "split" and route_kind("local") == "local"
    assert route_replans(route) == 1 and route_replans("offload", {"replans": 2}) == 2
    assert describe_route(route) == "split via peer-a-lo…, laptop (2 spans, 1 re-plan)"
    assert describe_route({"kind": "local", "peers": [], "spans": [], "replans": 0}) == "local"
    timed = {**route, "stage_timing": [{"link": "local"}, {"link": "direct"}, {"link": "channel"}]}
    assert describe_route(timed) == "split via peer-a-lo…, laptop (2 spans over direct+channel, 1 re-plan)"


def test_topology_drawing_names_links_and_pipelines() -> None:
    topology = {
        "self": "aaa",
        "nodes": [{"id": "aaa", "name": "laptop"}, {"id": "bbb", "name": "pi"}, {"id": "ccc", "name": None}],
        "links": [{"a": "aaa", "b": "bbb", "rtt_ms": 3.25}],
        "pipelines": [
            {
                "request": "req-1",
                "stages": [{"peer": "aaa", "span": [0, 15]}, {"peer": "bbb", "span": [15, 30]}],
            }
        ],
    }
    text = draw_topology(topology, {}, "").plain
    assert "3 nodes, 1 link" in text
    assert "laptop (this node) ──3.2 ms── pi" in text or "laptop (this node) ──3.3 ms── pi" in text
    assert "ccc  (no links)" in text
    assert "req-1: laptop (this node)[0:15) → pi[15:30)" in text


def test_peer_row_reads_the_advert() -> None:
    peer = {
        "id": "p" * 40,
        "name": "pi",
        "state": "connected",
        "rtt_ms": 2.5,
        "path": {"type": "relayed", "local": "relay", "remote": "srflx", "protocol": "tcp"},
        "trusted": True,
        "advert": {
            "models": ["smollm2"],
            "shards": [{"model": "smollm2", "span": [0, 15]}],
            "target": "llvm",
            "speed": {"smollm2": {"prefill_tok_s": 300.0, "decode_tok_s": 95.5}},
            "free_memory": 2_000_000_000,
            "queue_depth": 1,
            "battery": 80,
        },
    }
    row = [str(getattr(cell, "plain", cell)) for cell in peer_row(peer)]
    assert row == [
        "pi",
        "ppppppppppp…",
        "llvm",
        "connected",
        "2.5",
        "relay/tcp",
        "smollm2",
        "1",
        "95.5",
        "2.0 GB",
        "80%",
        "1",
        "yes",
        "—",
        "—",
    ]
    assert "—" in [str(getattr(c, "plain", c)) for c in peer_row({"id": "x"})]
    assert str(peer_row({**peer, "path": {"type": "server-reflexive", "protocol": "udp"}})[5]) == "srflx/udp"
    assert peer_row({**peer, "path": None})[5] == "—"
    usage = {"given_requests": 2, "given_tokens": 74, "received_requests": 0, "received_tokens": 0}
    assert [str(c) for c in peer_row(peer, usage)[-2:]] == ["2 req / 74 tok", "—"]


def test_replanned_requests_are_highlighted() -> None:
    plain = request_row({"id": "r1", "model": "m", "route": "local", "status": "ok", "ttft_ms": 120.4})
    replanned = request_row(
        {"id": "r2", "model": "m", "route": {"kind": "split", "replans": 2}, "status": "ok"}
    )
    assert str(plain[2]) == "local" and plain[4] == "120" and plain[-1] == ""
    assert replanned[2].plain == "split" and "yellow" in str(replanned[2].style)
    assert replanned[-1].plain == "↻ 2"


def test_policy_numbers_are_checked_before_sending() -> None:
    assert parse_number(" 35 ", int, 0, 100) == 35
    assert parse_number("0.25", float, 0.0, 1.0) == 0.25
    with pytest.raises(ValueError, match="outside"):
        parse_number("250", int, 0, 100)
    with pytest.raises(ValueError, match="not an integer"):
        parse_number("3.5", int, 0, 100)


def test_log_levels() -> None:
    assert level_rank("debug") < level_rank("INFO") < level_rank("WARNING") < level_rank("ERROR")
    assert level_rank("CRITICAL") > level_rank("ERROR")
    line = log_line({"time": 0, "level": "WARNING", "logger": "mesh.peer", "message": "slow"}).plain
    assert line.endswith("WARNING mesh.peer: slow")


def test_errors_tell_missing_endpoints_from_real_refusals() -> None:
    def body(code: str | None, message: str = "m") -> bytes:
        return orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code}})

    assert isinstance(_error_from(404, body("unknown_url"), "/v1/x"), NotAvailable)
    assert isinstance(_error_from(404, b"404: Not Found", "/v1/x"), NotAvailable)
    assert isinstance(_error_from(405, body(None), "/v1/x"), NotAvailable)
    refused = _error_from(404, body("no_mesh", "this node is not in a mesh"), "/v1/mesh/invite")
    assert isinstance(refused, ApiError) and str(refused) == "this node is not in a mesh"
    bad = _error_from(400, body("invalid_value", "battery_floor must be 0-100"), "/v1/policy")
    assert isinstance(bad, ApiError) and bad.status == 400 and bad.code == "invalid_value"


def test_backoff_and_config_checks() -> None:
    backoff = Backoff(first=0.5, cap=4.0)
    assert [backoff.delay(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    with pytest.raises(ValueError):
        Backoff(first=2.0, cap=1.0)
    with pytest.raises(ValueError, match="http"):
        ClientConfig(base_url="127.0.0.1:8740")


def test_this_node_reads_first_in_a_link() -> None:
    topology = {
        "self": "zzz",
        "nodes": [{"id": "aaa", "name": "pi"}, {"id": "zzz", "name": "laptop"}],
        "links": [{"a": "aaa", "b": "zzz", "rtt_ms": None}],
    }
    assert "laptop (this node) ──—── pi" in draw_topology(topology, {}, "").plain


def test_a_browser_member_is_marked_in_the_topology() -> None:
    topology = {
        "self": "zzz",
        "nodes": [{"id": "zzz", "name": "laptop", "kind": "node"},
                  {"id": "bbb", "name": "tab", "kind": "browser"}],
        "links": [{"a": "bbb", "b": "zzz", "rtt_ms": 1.5}],
    }
    assert "laptop (this node) ──1.5 ms── tab (browser)" in draw_topology(topology, {}, "").plain


def test_launcher_probe_and_loopback_rule() -> None:
    from shoal.tui.launcher import is_loopback_url, probe, start_node

    from tests.tui.node_proc import free_port

    assert not probe(f"http://127.0.0.1:{free_port()}", timeout=0.5)
    assert is_loopback_url("http://127.0.0.1:8740") and is_loopback_url("http://localhost:1")
    assert not is_loopback_url("http://192.168.1.10:8740")
    with pytest.raises(ValueError, match="loopback"):
        start_node("http://192.168.1.10:8740")


def test_models_merge_with_the_catalog() -> None:
    from shoal.tui.screens.models import merge_catalog

    served = [{"id": "smollm2", "owned_by": "shoal", "shoal": {"cid": None, "size": 98, "loaded": True}}]
    catalog = [
        {"cid": "bafy-smol", "names": ["smollm2"], "size": None, "pinned": False, "complete": False},
        {"cid": "bafy-other", "names": ["other-model"], "size": 2000, "pinned": True, "complete": True},
        {"cid": "bafy-anon", "names": [], "size": None, "pinned": False, "complete": False},
    ]
    rows = merge_catalog(served, catalog)
    assert [r["id"] for r in rows] == ["smollm2", "other-model", "bafy-anon"]
    assert rows[0]["shoal"]["cid"] == "bafy-smol" and rows[0]["shoal"]["loaded"] is True
    assert rows[1]["owned_by"] == "catalog (stored)" and rows[2]["owned_by"] == "catalog"


def test_a_model_row_shows_the_nodes_state() -> None:
    from shoal.tui.screens.models import MODEL_COLUMNS, model_row

    column = MODEL_COLUMNS.index("loaded")
    for meta, shown in (({"state": "loading", "loaded": False}, "loading…"), ({"state": "loaded"}, "loaded"),
                        ({"state": "available", "loaded": False}, "—"), ({"loaded": True}, "loaded")):
        assert model_row({"id": "m", "shoal": meta})[column].plain == shown


async def test_progress_comments_of_a_stream_are_read_and_other_comments_skipped() -> None:
    async def lines():
        for line in (b": keep-alive\n", b"\n", b': shoal progress {"message": "waiting for peer abc", '
                     b'"waiting": "peer_load"}\n', b"\n", b'data: {"x": 1}\n', b"\n"):
            yield line

    plain = [item async for item in iter_sse(lines())]
    assert plain == ['{"x": 1}']
    items = [item async for item in iter_sse(lines(), comments=True)]
    assert isinstance(items[1], SseComment) and items[2] == '{"x": 1}'
    assert progress_report(items[0].text) is None  # not a progress comment
    report = progress_report(items[1].text)
    assert report is not None and report["waiting"] == "peer_load"
    assert report["message"] == "waiting for peer abc"
    assert progress_report("shoal progress {not json") is None
