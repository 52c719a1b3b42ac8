#!/bin/bash
# The package's Python dependencies (`chatqueue[hf]`, transitively, less torch, triton and numpy,
# which the device image holds) as cp312 wheels in .whl/, at the versions this machine's
# `make install` picked, so that the device runs what a user's install runs. Run from the
# repository root after `make install`:
#     bash benchmarks/device/wheels.sh
# On the device (`carry: [".whl"]`):
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#         --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src:$PWD
set -euo pipefail
PLATFORM="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
--platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
--platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64
--platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
.venv/bin/python benchmarks/device/closure.py torch triton numpy > /tmp/device-pins.txt
python3 -m pip download -q --no-deps --only-binary=:all: $PLATFORM -d .whl -r /tmp/device-pins.txt \
    2>&1 | { grep -v "^WARNING: Location" || true; }
du -sh .whl
