#!/bin/bash
# Issue 14's GPU figures in one device call (the pool's runner, Llama-3.2-1B shape, random bf16
# weights): 64 multi-turn chats through the server at the defaults, the burst of 64 and 256
# requests by prefill chunk and stall limit (the budget traced), the front at 256 streams over 4
# API servers, then decode ms/step / the bandwidth floor. Each part's full output lands in $OUT.
# carry: [".whl", ".bench"]  (.whl: benchmarks/device/wheels.sh; .bench/smollm2-tokenizer:
# benchmarks/device/tokenizer.sh, the default model's tokenizer for the multi-turn chats)
#     bash benchmarks/device/paged_gpu.sh            PARTS="multiturn burst front speed" DEADLINE=560
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1
# `chatqueue serve` for the benchmarks that start a server
bin=$(dirname "$(python3 -c 'import sys; print(sys.executable)')")
printf '#!/bin/sh\nexec python3 -c "import sys; from chatqueue.cli import app; sys.argv[0] = \x27chatqueue\x27; app()" "$@"\n' > "$bin/chatqueue"
chmod +x "$bin/chatqueue"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PARTS=${PARTS:-multiturn burst front speed}
DEADLINE=${DEADLINE:-560}
t0=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - t0) )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
part() {  # name, then the command
    local name=$1; shift
    local budget; budget=$(left)
    if [ "$budget" -lt 30 ]; then echo "=== $name: skipped, ${budget} s left"; return; fi
    echo "=== $name at $(( $(date +%s) - t0 )) s (limit ${budget} s)"
    timeout "$budget" "$@" > "$OUT/$name.txt" 2>&1
    echo "rc $?"; grep -v -i -E "warning|^\s*$" "$OUT/$name.txt" | tail -${TAIL:-14}
}
for p in $PARTS; do
  case $p in
    multiturn) part multiturn python3 benchmarks/bench_multiturn.py --device cuda --conversations 64 \
        --modes on --tokenizer-from .bench/smollm2-tokenizer \
        --serve-args "--api-servers 4 --history sqlite" ;;
    burst) part burst python3 benchmarks/bench_paged_gpu.py --parts throughput \
        --prefill-chunks 512 2048 --stall-limits 2 0 --out "$OUT" ;;
    front) part front python3 benchmarks/bench_gpu.py --no-check --parts http --kv-cache paged \
        --http-streams 256 --model-process on --overlap-steps auto --api-servers 4 --quick ;;
    speed) part speed python3 benchmarks/bench_paged_gpu.py --parts speed --out "$OUT" ;;
  esac
done
