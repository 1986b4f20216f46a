"""Browser member benchmark: a headless Chromium tab (Debian's, in a network namespace the bench makes) joins
a real `shoal node` through `GET /join`, loads the default model (SmolLM2-135M Q4_1, fetched by CID with every
block verified) into wllama — llama.cpp built to WebAssembly, one thread, on this CPU — and is measured:

    python bench/browser_member.py [--rounds 5] [--steps 32] [--joins 3] [--pings 50]

- decode (and prefill) tok/s of the tab, greedy from the same chat prompt ids, against native llama.cpp
  (llama-cpp-python, 1 thread) in the same run: rounds alternate which runs first; the ratio is the median of
  the per-round ratios (tab / native);
- the tab's link RTT to its node: ping frames over the data channel, timed in the page; and, measured the same
  way for both, node a's heartbeat RTT (ping/pong every 0.25 s) of the tab against that of a native node b
  linked to it in the same namespace (`GET /v1/mesh/peers`, sampled together);
- seconds from opening the join URL to being listed as a member by the node (`GET /v1/mesh/peers`), per round
  (a fresh tab each time; it closes and is seen leaving before the next).

No GPU is involved: Chromium runs headless with `--disable-gpu` and wllama's single-thread CPU build (wasm
SIMD); a phone or laptop runs the same build. Needs root (network namespaces), Chromium, the vendored wllama
(scripts/install_wllama.sh); llama-cpp-python for the native column (else that column says n/a).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shoal.mesh.p2p.invite import Invite  # noqa: E402
from shoal.models.embedded import embedded_model_path  # noqa: E402
from shoal.models.loader import open_model  # noqa: E402

from tests.mesh import chromium  # noqa: E402
from tests.mesh.browser_harness import NamespacedNode, browser_namespace, wait, why_not  # noqa: E402

COMPUTE = "shoalMember.compute"
QUESTION = "Count from one to ten in words."
PING_JS = """(async (peer, count) => {
  const link = shoalMember.links.get(peer);
  const samples = [];
  const original = link.onControl.bind(link);
  let waiter = null;
  link.onControl = (frame) => {
    if (frame.t === 'pong' && frame.b.bench !== undefined && waiter) { waiter(performance.now()); return; }
    original(frame);
  };
  try {
    for (let i = 0; i < count; i++) {
      const sent = performance.now();
      const got = await new Promise((resolve, reject) => {
        waiter = resolve;
        setTimeout(() => reject(new Error('no pong')), 5000);
        link.notify('ping', {t: sent / 1000, bench: i});
      });
      samples.push(got - sent);
    }
  } finally {
    link.onControl = original;
  }
  return samples;
})"""


def native_run(llm: Any, ids: list[int], steps: int) -> dict[str, float]:
    """llama.cpp, 1 thread: prefill `ids`, then `steps` greedy decode steps."""
    import numpy as np

    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
    decode = time.perf_counter() - start
    return {"prefill_tok_s": len(ids) / prefill, "decode_tok_s": steps / decode}


def tab_run(tab: chromium.Tab, ids: list[int], steps: int) -> dict[str, float]:
    return tab.evaluate(f"{COMPUTE}.measure({json.dumps(ids)}, {steps})", timeout=300)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="decode rounds (alternating tab and native)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per round")
    parser.add_argument("--joins", type=int, default=3, help="join-time rounds (a fresh tab each)")
    parser.add_argument("--pings", type=int, default=50, help="RTT samples per link")
    args = parser.parse_args()
    reason = why_not()
    if reason:
        print(f"browser_member: skipped: {reason}")
        return 0
    if not (REPO / "mesh/api/static/join/vendor/wllama/wllama.wasm").is_file():
        print("browser_member: skipped: wllama is not vendored (scripts/install_wllama.sh)")
        return 0
    try:
        from llama_cpp import Llama
        llm = Llama(model_path=str(embedded_model_path()), n_ctx=1024, n_threads=1, n_threads_batch=1,
                    logits_all=False, verbose=False)
    except ImportError:
        llm = None
    ids = open_model().tokenizer.encode_chat([{"role": "user", "content": QUESTION}])
    rows: list[tuple[str, str, str, str]] = []
    with browser_namespace("shoalbench") as ns, tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        prefix = ["ip", "netns", "exec", ns]
        mesh = {"heartbeat_interval_s": 0.25}
        a = NamespacedNode("a", base / "a", {"models": {"backend": "numpy"}, "mesh": mesh}, prefix=prefix)
        token = Invite.create("bench", (a.api,)).to_token()
        a.args = ["--join", token]
        b = NamespacedNode("b", base / "b", {"models": {"backend": "numpy", "preload": False}, "mesh": mesh},
                           prefix=prefix, args=["--join", token])
        browser = None
        try:
            for node in (a, b):
                node.launch()
            for node in (a, b):
                node.wait_ready(180, ready=lambda health: health.get("status") == "ok")
            wait(lambda: b.peer_id in a.members(), 60, "b to link to a")
            browser = chromium.Chromium.launch(base / "profile", prefix=prefix, log=base / "chromium.log")

            # --- join time: opening the URL → listed by the node ---------------------------------------
            joins = []
            for _ in range(args.joins):
                started = time.perf_counter()
                tab = browser.open(f"{a.url}/join?serve=off#{token}")
                listed = wait(lambda: [p for p, v in a.members().items() if v.get("kind") == "browser"], 60,
                              "the tab to be listed")
                joins.append(time.perf_counter() - started)
                tab.close()
                wait(lambda listed=listed: listed[0] not in a.members(), 30, "the tab to leave")
            rows.append(("open URL → listed member (s)", f"{median(joins):.2f}",
                         "", "rounds: " + ", ".join(f"{j:.2f}" for j in joins)))

            # --- the serving tab -----------------------------------------------------------------------
            started = time.perf_counter()
            tab = browser.open(f"{a.url}/join#{token}")
            tab.wait_for(f"{COMPUTE}.state === 'ready' || {COMPUTE}.state === 'error'", 600, "the model")
            assert tab.evaluate(f"{COMPUTE}.state") == "ready", tab.evaluate(f"{COMPUTE}.detail")
            loaded = time.perf_counter() - started
            size = tab.evaluate(f"{COMPUTE}.progress[1]") / 2**20
            rows.append(("open URL → model verified, loaded, measured (s)", f"{loaded:.1f}", "",
                         f"{size:.1f} MiB by CID"))
            me = tab.evaluate("shoalMember.identity.id")

            # --- decode / prefill, alternating ----------------------------------------------------------
            decode_ratios, prefill_ratios, tab_dec, nat_dec, tab_pre, nat_pre = [], [], [], [], [], []
            for r in range(args.rounds):
                order = ("tab", "native") if r % 2 == 0 else ("native", "tab")
                got: dict[str, dict[str, float]] = {}
                for who in order:
                    if who == "tab":
                        got["tab"] = tab_run(tab, ids, args.steps)
                    elif llm is not None:
                        got["native"] = native_run(llm, ids, args.steps)
                tab_dec.append(got["tab"]["decode_tok_s"])
                tab_pre.append(got["tab"]["prefill_tok_s"])
                if "native" in got:
                    nat_dec.append(got["native"]["decode_tok_s"])
                    nat_pre.append(got["native"]["prefill_tok_s"])
                    decode_ratios.append(got["tab"]["decode_tok_s"] / got["native"]["decode_tok_s"])
                    prefill_ratios.append(got["tab"]["prefill_tok_s"] / got["native"]["prefill_tok_s"])
            na = "n/a (no llama-cpp-python)"
            rows.append((f"decode tok/s ({args.steps} steps), tab vs llama.cpp 1 thread",
                         f"{median(tab_dec):.1f}", f"{median(nat_dec):.1f}" if nat_dec else na,
                         f"ratio {median(decode_ratios):.3f}" if decode_ratios else ""))
            rows.append((f"prefill tok/s ({len(ids)} tokens), tab vs llama.cpp 1 thread",
                         f"{median(tab_pre):.1f}", f"{median(nat_pre):.1f}" if nat_pre else na,
                         f"ratio {median(prefill_ratios):.3f}" if prefill_ratios else ""))

            # --- RTT ------------------------------------------------------------------------------------
            pings = tab.evaluate(f"({PING_JS})({json.dumps(a.peer_id)}, {args.pings})", timeout=300)
            rows.append(("tab → node ping RTT over the data channel (ms, page-timed)",
                         f"{median(pings):.2f}", "", f"p90 {sorted(pings)[int(0.9 * len(pings))]:.2f}"))
            tab_rtt, node_rtt = [], []
            for _ in range(args.pings):
                view = a.members()
                for peer, into in ((me, tab_rtt), (b.peer_id, node_rtt)):
                    value = view.get(peer, {}).get("rtt_ms")
                    if isinstance(value, int | float):
                        into.append(value)
                time.sleep(0.25)
            ratio = median(tab_rtt) / median(node_rtt) if tab_rtt and node_rtt else float("nan")
            rows.append(("heartbeat RTT seen by node a: tab vs node b (ms)", f"{median(tab_rtt):.2f}",
                         f"{median(node_rtt):.2f}", f"ratio {ratio:.2f}"))
        finally:
            if browser is not None:
                browser.close()
            for node in (a, b):
                node.stop()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{os.cpu_count()} CPUs, load average {load} (1, 5, 15 min) at the end")
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{width}}  {'browser tab':>12}  {'native':>26}  note")
    for name, ours, theirs, note in rows:
        print(f"{name:<{width}}  {ours:>12}  {theirs:>26}  {note}")
    print("\nbrowser: headless Chromium, wllama 2.4.0 single-thread wasm (CPU; no GPU or SwiftShader "
          "involved); native: llama-cpp-python, 1 thread; same GGUF, same prompt ids, greedy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
