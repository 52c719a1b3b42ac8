#!/bin/bash
# The cluster path on a device machine's CPUs (mock engine; no GPU used): bench_cluster with the
# front's lines on, then off (Serve calls), each beside the plain server. carry: .whl .raywhl
# (.whl: the package's pure-Python dependencies as device wheels; .raywhl: ray_bundle.sh).
mkdir -p /tmp/site && tar -xJf .raywhl/ray-site.tar.xz -C /tmp/site || exit 1
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .raywhl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD
unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=/tmp/pyc
printf '#!/bin/sh\nexec python3 -c "import sys; from chatqueue.cli import app; sys.argv[0] = \x27chatqueue\x27; app()" "$@"\n' > $(dirname $(python3 -c 'import sys; print(sys.executable)'))/chatqueue
chmod +x $(dirname $(python3 -c 'import sys; print(sys.executable)'))/chatqueue
nproc; python3 -c "import ray, aiohttp; print(ray.__version__, aiohttp.__version__)"
t0=$(date +%s)
for v in on off; do
  echo "=== cluster link $v at $(( $(date +%s) - t0 )) s, load $(cut -d' ' -f1 /proc/loadavg)"
  timeout 125 python3 -u benchmarks/bench_cluster.py --streams 32 --rounds 3 --probes 20 --cluster-args "--cluster-link $v" > $OUT/cluster_$v.txt 2>&1
  echo "rc $?"; grep -v Warning $OUT/cluster_$v.txt | tail -9
done
