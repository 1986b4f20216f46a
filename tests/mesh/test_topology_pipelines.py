"""`/v1/mesh/topology` lists running multi-device requests (the TUI draws them): the request log's view."""

from __future__ import annotations

from shoal.mesh.events import EventBus
from shoal.mesh.node.request_log import RequestLog


def test_running_split_and_offload_requests_are_pipelines() -> None:
    log = RequestLog(EventBus())
    local = log.start("smollm2-135m-instruct")
    split = log.start("smollm2-135m-instruct")
    split.route = {"kind": "split", "peers": ["local", "peer-b"], "spans": ["0:15", "15:30"], "replans": 0}
    offload = log.start("smollm2-135m-instruct")
    offload.route = {"kind": "offload", "peers": ["peer-c"], "spans": ["0:30"], "replans": 0}

    pipelines = log.pipelines()
    assert [p["request"] for p in pipelines] == [split.id, offload.id]
    assert pipelines[0]["stages"] == [{"peer": "local", "span": "0:15"}, {"peer": "peer-b", "span": "15:30"}]
    assert pipelines[1] == {"request": offload.id, "kind": "offload",
                            "stages": [{"peer": "peer-c", "span": "0:30"}]}

    log.finish(split, "stop")
    log.finish(local, "stop")
    assert [p["request"] for p in log.pipelines()] == [offload.id]
