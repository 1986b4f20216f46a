"""`/v1/mesh/topology` lists running multi-device requests (the TUI draws them): the request log's view."""

from __future__ import annotations

from shoal.mesh.events import EventBus
from shoal.mesh.node.request_log import RequestLog
from shoal.mesh.route import ObservedTimes, ReplanEntry, Route


def test_running_split_and_offload_requests_are_pipelines() -> None:
    log = RequestLog(EventBus())
    local = log.start("smollm2-135m-instruct")
    split = log.start("smollm2-135m-instruct")
    split.route = Route("split", ["local", "peer-b"], ["0:15", "15:30"])
    offload = log.start("smollm2-135m-instruct")
    offload.route = Route("offload", ["peer-c"], ["0:30"])

    pipelines = log.pipelines()
    assert [p["request"] for p in pipelines] == [split.id, offload.id]
    assert pipelines[0]["stages"] == [{"peer": "local", "span": "0:15"}, {"peer": "peer-b", "span": "15:30"}]
    assert pipelines[1] == {"request": offload.id, "kind": "offload",
                            "stages": [{"peer": "peer-c", "span": "0:30"}]}

    log.finish(split, "stop")
    log.finish(local, "stop")
    assert [p["request"] for p in log.pipelines()] == [offload.id]


def test_a_request_finishes_once() -> None:
    bus = EventBus()
    log = RequestLog(bus)
    record = log.start("smollm2-135m-instruct")
    log.finish(record, "stop")
    finished = record.finished
    log.finish(record, "error")  # a late second finish changes nothing and says nothing
    assert record.status == "stop" and record.finished == finished is not None
    assert [e.data["status"] for e in bus.recent("request.finished")] == ["stop"]


def test_route_is_serialized_once_in_the_wire_shape() -> None:
    route = Route()
    assert route.to_dict() == {"kind": "local", "peers": [], "spans": [], "replans": 0}
    route.follow("split", [("local", "0:11"), ("p5ua", "11:30")], {"ttft_s": 0.45, "per_token_s": 0.111})
    route.replanned(ReplanEntry("p5ua", 39, 0.734567))
    route.follow("split", [("local", "0:30")], {"ttft_s": 0.2, "per_token_s": 0.05})
    route.measured(ObservedTimes(0.612345, 1.023456, None))
    route.timed([{"peer": "local", "layers": "0:30", "link": "local", "calls": 3}])
    assert route.to_dict() == {
        "kind": "split", "peers": ["local"], "spans": ["0:30"], "replans": 1,
        "predicted": {"ttft_s": 0.2, "per_token_s": 0.05},
        "observed": {"ttft_s": 0.6123, "seconds": 1.0235, "per_token_s": None},
        "replan_log": [{"lost": "p5ua", "at_tokens": 39, "seconds": 0.7346}],
        "stage_timing": [{"peer": "local", "layers": "0:30", "link": "local", "calls": 3}],
    }
    record = RequestLog(EventBus()).start("m")
    record.route.follow("offload", [("peer-c", "0:30")], {})
    assert record.to_dict()["route"]["kind"] == "offload"  # the record serializes its route
