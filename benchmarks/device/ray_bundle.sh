#!/bin/bash
# Ray Serve for the device machines (benchmarks/bench_cluster.py there): their Python 3.12 has no
# ray, and a call carries at most 64 MiB. This builds .raywhl/ray-site.tar.xz (~16 MB): ray 2.60.0
# (cp312 manylinux2014) without jars, rllib, data, tune, train, llm, the dashboard's web client and
# tests, its binaries stripped of symbols, plus the run-time dependencies the device lacks. On the
# device: `mkdir -p /tmp/site && tar -xJf .raywhl/ray-site.tar.xz -C /tmp/site`, then
# `pip install --no-index --no-deps --target /tmp/site .raywhl/*.whl` (grpcio-reflection matching
# the device's grpcio 1.84) and PYTHONPATH=/tmp/site. Ray then runs in its minimal mode (no
# dashboard, no Ray/Serve metrics agent). Run from the repository root:
#     bash benchmarks/device/ray_bundle.sh
set -euo pipefail
ROOT=$PWD
STAGE=${STAGE:-/tmp/raystage}
OUT=${OUT:-$ROOT/.raywhl/ray-site.tar.xz}
DEPS=${DEPS:-"jsonschema referencing rpds_py jsonschema_specifications"}
PLATFORM="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
mkdir -p "$ROOT/.raywhl" /tmp/raydl /tmp/raydeps
grep -qx '/.raywhl/' .git/info/exclude 2>/dev/null || echo '/.raywhl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: $PLATFORM -d /tmp/raydl ray==2.60.0
python3 -m pip download -q --no-deps --only-binary=:all: $PLATFORM -d /tmp/raydeps \
    jsonschema referencing rpds-py jsonschema-specifications
python3 -m pip download -q --no-deps --only-binary=:all: $PLATFORM -d "$ROOT/.raywhl" grpcio-reflection==1.84.0
rm -rf "$STAGE"; mkdir -p "$STAGE"
cd "$STAGE"
unzip -q /tmp/raydl/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl
for d in $DEPS; do unzip -qo /tmp/raydeps/${d}-*.whl; done
cd ray
# --- strip ray
rm -rf jars rllib data tune train llm air workflow \
       dashboard/client dashboard/modules/train dashboard/modules/data \
       util/spark util/dask util/collective util/joblib util/multiprocessing \
       autoscaler/_private/spark \
       _raylet.pyi _raylet.pxd includes setup-dev.py \
       ${EXTRA_RM:-}
if [ "${KEEP_AGENT_TP:-0}" != 1 ]; then rm -rf _private/runtime_env/agent/thirdparty_files; fi
find . -type d \( -name tests -o -name __pycache__ \) -prune -exec rm -rf {} +
# strip native code (symbol tables / debug info only; .eh_frame kept)
strip --strip-unneeded _raylet.so core/libjemalloc.so
strip core/src/ray/gcs/gcs_server core/src/ray/raylet/raylet
find "$STAGE" -name '*.so' ! -path '*/ray/*' -exec strip --strip-unneeded {} + 2>/dev/null || true
cd "$STAGE"
du -sh "$STAGE"
[ "${NOXZ:-0}" = 1 ] && exit 0
# big binaries adjacent at the start of the stream so LZMA2 (big dictionary) can dedupe shared static code
BIG="ray/_raylet.so ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet"
{ for b in $BIG; do echo "$b"; done
  find . -mindepth 1 | sed 's#^\./##' | grep -vxF -e ray/_raylet.so -e ray/core/src/ray/gcs/gcs_server -e ray/core/src/ray/raylet/raylet | LC_ALL=C sort; } > /tmp/raystage.list
tar --owner=0 --group=0 --numeric-owner --no-recursion -cf /tmp/raystage.tar -T /tmp/raystage.list
tar -tf /tmp/raystage.tar | wc -l
xz -T1 --lzma2=preset=9e,dict=${DICT:-192MiB} -c /tmp/raystage.tar > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
ls -la "$OUT"
