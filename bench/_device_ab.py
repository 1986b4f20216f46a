"""Temporary device-run script (kernels engineer): whole q4_1 model, stock vs fast CPU attention, pinned."""
import contextlib
import os
import sys
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.getcwd())
import numpy as np

from models.embedded import embedded_model_path
from models.gguf import GGUFModel
from models.kernels.attention_cpu import fast_cpu_attention
from models.runtime import CompiledStage
from models.span import LayerSpan
from models.targets import llvm_target

m = GGUFModel.open(embedded_model_path())
stages = {}
for name in ("stock", "fast"):
    ctx = fast_cpu_attention() if name == "fast" else contextlib.nullcontext()
    t0 = time.time()
    with ctx:
        stages[name] = CompiledStage.load(m, LayerSpan(0, 30), quantization="q4_1",
                                          cache_dir=f"/tmp/c_{name}", target=llvm_target(2))
    print(name, "compile+load s", round(time.time() - t0, 1), flush=True)
os.sched_setaffinity(0, {0, 1})
ids = (np.arange(200) * 37 % 49000 + 20).astype(np.int32)
res = {n: {"prefill": [], "decode": []} for n in stages}
for rep in range(3):
    for n, st in stages.items():
        st.add_sequence(rep)
        t0 = time.perf_counter()
        lg = st.prefill(rep, ids)
        res[n]["prefill"].append(time.perf_counter() - t0)
        tok = int(lg.argmax())
        for _ in range(64):
            t0 = time.perf_counter()
            lg = st.decode([rep], np.array([tok], np.int32))
            res[n]["decode"].append(time.perf_counter() - t0)
            tok = int(lg.argmax())
        st.remove_sequence(rep)
for n, r in res.items():
    p, d = np.median(r["prefill"]), np.median(r["decode"])
    print(f"{n}: prefill 200 {p * 1e3:.0f} ms ({200 / p:.0f} tok/s); "
          f"decode {d * 1e3:.2f} ms ({1 / d:.0f} tok/s)")
