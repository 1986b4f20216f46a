"""Usage receipts: signed by the server, countersigned by the client, verifiable with public keys alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shoal.mesh.p2p.identity import Identity
from shoal.mesh.split.receipts import (
    Expected,
    Receipt,
    ReceiptError,
    ReceiptLog,
    Usage,
    UsageLedger,
    countersign,
    sign_as_server,
    verify_file,
)

from tests.conftest import REPO_ROOT

SERVER, CLIENT, OTHER = Identity.generate("server"), Identity.generate("client"), Identity.generate("other")


def usage(tokens_out: int = 12, request: str = "chatcmpl-1") -> Usage:
    return Usage(server=SERVER.peer_id, client=CLIENT.peer_id, request=request, kind="offload",
                 model="bafkreiexample", span=(0, 30), tokens_in=20, tokens_out=tokens_out,
                 started=1000.0, finished=1001.5)


def signed(tokens_out: int = 12, request: str = "chatcmpl-1") -> Receipt:
    return countersign(CLIENT, sign_as_server(SERVER, usage(tokens_out, request)))


def test_a_countersigned_receipt_verifies_and_round_trips() -> None:
    receipt = signed()
    receipt.check()
    again = Receipt.from_line(receipt.to_line())
    assert again == receipt
    again.check()


def test_only_the_named_parties_can_sign() -> None:
    with pytest.raises(ReceiptError, match="only the serving member"):
        sign_as_server(OTHER, usage())
    with pytest.raises(ReceiptError, match="another client"):
        countersign(OTHER, sign_as_server(SERVER, usage()))


def test_an_unsigned_countersign_is_required_by_default() -> None:
    half = sign_as_server(SERVER, usage())
    half.check(require_countersign=False)
    with pytest.raises(ReceiptError, match="not countersigned"):
        half.check()


@pytest.mark.parametrize("field, value", [("tokens_out", 13), ("tokens_in", 1), ("model", "bafkreiother"),
                                          ("finished", 1001.6), ("span", [0, 29])])
def test_any_edited_field_breaks_the_signatures(field: str, value: object) -> None:
    data = signed().to_dict()
    data["usage"][field] = value
    with pytest.raises(ReceiptError, match="does not verify"):
        Receipt.from_dict(data).check()


def test_the_client_cannot_forge_the_server_signature() -> None:
    forged = Receipt(usage(), signed().client_sig)  # a client signature where the server's belongs
    with pytest.raises(ReceiptError):
        countersign(CLIENT, forged)


@pytest.mark.parametrize("body", [
    b"[]", b"{}", b'{"usage": {}}', b"not json", b'{"usage": {"server": "x"}, "server_sig": 1}',
    b"x" * 5000,
])
def test_malformed_lines_are_refused_with_a_receipt_error(body: bytes) -> None:
    with pytest.raises(ReceiptError):
        Receipt.from_line(body)


@settings(max_examples=150, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=20,
))
def test_fuzzed_receipts_raise_only_receipt_errors(data: object) -> None:
    try:
        Receipt.from_dict(data).check()
    except ReceiptError:
        pass


def test_the_log_keeps_totals_per_peer(tmp_path: Path) -> None:
    server_log = ReceiptLog.in_data_dir(tmp_path / "server", SERVER.peer_id)
    for i in range(3):
        server_log.append(signed(tokens_out=10 + i, request=f"r{i}"))
    totals = server_log.totals()
    assert set(totals) == {CLIENT.peer_id}
    assert totals[CLIENT.peer_id].given_requests == 3
    assert totals[CLIENT.peer_id].given_tokens == 3 * 20 + 10 + 11 + 12
    client_view = ReceiptLog(server_log.path, CLIENT.peer_id).totals()
    assert client_view[SERVER.peer_id].received_requests == 3
    with pytest.raises(ReceiptError, match="does not involve"):
        ReceiptLog(tmp_path / "x.jsonl", OTHER.peer_id).append(signed())


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal.mesh", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, check=False)


def test_usage_verify_passes_good_files_and_fails_a_tampered_one(tmp_path: Path) -> None:
    log = ReceiptLog.in_data_dir(tmp_path, SERVER.peer_id)
    log.append(signed(request="a"))
    log.append(signed(request="b"))
    good, problems = verify_file(log.path)
    assert (good, problems) == (2, [])
    run = run_cli("usage", "verify", str(log.path))
    assert run.returncode == 0 and "2 receipts verify, 0 do not" in run.stdout

    lines = log.path.read_bytes().splitlines()
    tampered = orjson.loads(lines[1])
    tampered["usage"]["tokens_out"] += 1000
    bad = tmp_path / "tampered.jsonl"
    bad.write_bytes(lines[0] + b"\n" + orjson.dumps(tampered) + b"\n")
    run = run_cli("usage", "verify", str(bad))
    assert run.returncode == 1
    assert "1 receipts verify, 1 do not" in run.stdout
    assert "line 2" in run.stderr and "Traceback" not in run.stderr

    run = run_cli("usage", "--data-dir", str(tmp_path), "--json", "--peer", SERVER.peer_id)
    assert run.returncode == 0
    view = orjson.loads(run.stdout)
    assert view["peers"][CLIENT.peer_id]["given_requests"] == 2


class Holder:
    def __init__(self, identity: Identity) -> None:
        self.identity = identity


async def test_the_ledgers_of_server_and_client_each_keep_one_verified_copy(tmp_path: Path) -> None:
    server = UsageLedger(Holder(SERVER), tmp_path / "server")
    client = UsageLedger(Holder(CLIENT), tmp_path / "client")
    issued = server.issue(usage())
    seen = Expected(SERVER.peer_id, "chatcmpl-1", "offload", "bafkreiexample", 20, 12)
    signed = await client.countersign(seen, issued.to_dict())
    await server.accept(CLIENT.peer_id, signed.to_dict())
    for ledger, peer in ((server, CLIENT.peer_id), (client, SERVER.peer_id)):
        kept = list(ledger.log.receipts())
        assert kept == [signed]
        assert peer in (await ledger.view())["peers"]
    with pytest.raises(ReceiptError, match="did not issue"):  # a second copy of the same receipt
        await server.accept(CLIENT.peer_id, signed.to_dict())


async def test_a_client_refuses_a_receipt_that_overcharges(tmp_path: Path) -> None:
    server = UsageLedger(Holder(SERVER), tmp_path / "server")
    client = UsageLedger(Holder(CLIENT), tmp_path / "client")
    issued = server.issue(usage(tokens_out=50))
    seen = Expected(SERVER.peer_id, "chatcmpl-1", "offload", "bafkreiexample", 20, 12)
    with pytest.raises(ReceiptError, match="this node saw"):
        await client.countersign(seen, issued.to_dict())
    assert list(client.log.receipts()) == []


async def test_a_server_refuses_a_receipt_it_never_issued(tmp_path: Path) -> None:
    server = UsageLedger(Holder(SERVER), tmp_path / "server")
    forged = countersign(CLIENT, Receipt(usage(), signed().server_sig))
    with pytest.raises(ReceiptError, match="did not issue"):
        await server.accept(CLIENT.peer_id, forged.to_dict())
