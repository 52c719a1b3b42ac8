#!/bin/bash
# SmolLM2's tokenizer files, chat template and config.json in .bench/smollm2-tokenizer, for
# `bench_multiturn.py --device cuda --tokenizer-from` on a machine without the converted default
# model (the device): copied from this machine's conversion (made once, ~30 s). Run from the
# repository root after `make install`; then carry `.bench` (paged_gpu.sh).
set -euo pipefail
grep -qx '/.bench/' .git/info/exclude 2>/dev/null || echo '/.bench/' >> .git/info/exclude
.venv/bin/python - <<'PY'
import shutil
from pathlib import Path

from chatqueue.engine.hf import gguf_cache

source = gguf_cache.default_model_folder()
target = Path(".bench/smollm2-tokenizer")
target.mkdir(parents=True, exist_ok=True)
for path in source.iterdir():
    if "token" in path.name or path.suffix == ".jinja" or path.name.endswith("config.json"):
        shutil.copy(path, target / path.name)
print(sorted(p.name for p in target.iterdir()))
PY
