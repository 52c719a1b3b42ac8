"""Does the GPU's preparation (its context, a cuBLAS handle) overlap a model process's imports?
In fresh processes: torch, then transformers, the loader and Inductor's modules, with the
preparation before them ("seq"), on a thread beside them ("thread"), or after them ("after").

    PYTHONPATH=src python3 benchmarks/profile_start_overlap.py
"""

import subprocess
import sys

CODE = r"""
import sys, time, threading
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
def warm():
    x = torch.ones(8, 8, device="cuda", dtype=torch.bfloat16)
    (x @ x).sum().item()
mode = sys.argv[1]
if mode == "thread":
    th = threading.Thread(target=warm); th.start()
elif mode == "seq":
    tw = time.perf_counter(); warm(); tw = time.perf_counter() - tw
import transformers, chatqueue.engine.hf.loader, torch._dynamo, torch._inductor.compile_fx
t2 = time.perf_counter()
if mode == "thread":
    th.join()
t3 = time.perf_counter()
if mode == "after":
    tw = time.perf_counter(); warm(); tw = time.perf_counter() - tw; t3 = time.perf_counter()
print(f"{mode}: torch {t1-t0:.2f} rest {t2-t1:.2f} join/after {t3-t2:.2f} total {t3-t0:.2f}" + (f" warm alone {tw:.2f}" if mode != "thread" else ""))
"""
for _ in range(3):
    for mode in ("seq", "thread", "after"):
        subprocess.run([sys.executable, "-c", CODE, mode])
