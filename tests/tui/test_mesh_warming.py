"""The Mesh tab's warming line: what this node prepared for its peers' likely plans (`warming` of
`GET /v1/mesh/route`, filled by `split.warming`; the whole path over real nodes:
tests/mesh/test_warming_nodes.py)."""

from __future__ import annotations

from shoal.tui.screens.mesh import warming_line


def test_warming_line_lists_what_is_warm_and_hides_when_nothing_is():
    assert warming_line(None) is None
    assert warming_line({"enabled": True, "entries": []}) is None
    skipped = {"model": "m", "span": "0:5", "kind": "stage", "state": "skipped"}
    assert warming_line({"entries": [skipped]}) is None
    line = warming_line({"entries": [
        {"model": "smollm2", "span": "0:15", "kind": "stage", "state": "ready", "origin": "p5uaq3uvmagexyz"},
        {"model": "big", "span": "0:30", "kind": "model", "state": "compiled", "origin": "p5uab"},
        {"model": "x", "span": "3:4", "kind": "stage", "state": "dropped", "origin": "p5uac"},
        "junk",
    ]})
    assert line is not None
    assert line.plain == ("warm for peers smollm2 layers 0:15 ready for p5uaq3uvmag…  big whole compiled for "
                          "p5uab")
