#!/usr/bin/env bash
# Issue 29 on a lent GPU machine: MuJoCo Warp there, its CUDA tests, then benchmarks/warp_gpu.py.
#
# The machine has no warp-lang (149 MB), and one device call carries at most 64 MiB, so it travels in three
# calls made back to back (the warm machine keeps /tmp between them). Once, on the development machine:
#
#   bash benchmarks/warp_gpu_check.sh prepare     # .device/warp/: the wheels, warp-lang in 3 parts
#
# then, on the device machine (the `run` tool), quickly one after another (it is given back after 30 s idle):
#
#   1. carry [".device/warp/part_aa"]:  bash benchmarks/warp_gpu_check.sh keep
#   2. carry [".device/warp/part_ab"]:  bash benchmarks/warp_gpu_check.sh keep
#   3. carry [".device/warp/part_ac", ".device/warp/small", ".device/gpu-site-py312.tar.xz"]:
#                                       bash benchmarks/warp_gpu_check.sh check
#
# `check` installs the wheels, runs the Warp tests that need CUDA (graph capture, one step against C
# MuJoCo on the GPU), then the benchmark of HalfCheetah 6x1 (environment alone at 1,024 to 16,384 worlds,
# training at 4,096 and 8,192) and the run to the paper's return (5 minutes at most), writing $OUT/warp_gpu.json
# after each task. Every part has its own time limit: under 11 minutes in all.
set -u -o pipefail
cd "$(dirname "$0")/.."
case "${1:-check}" in
prepare)
  mkdir -p .device/warp/small
  grep -qx "/.device/" .git/info/exclude 2>/dev/null || echo /.device/ >> .git/info/exclude
  pip download -q warp-lang==1.19.0 --no-deps -d .device/warp --python-version 3.12 --only-binary=:all: \
    --platform manylinux_2_28_x86_64
  pip download -q mujoco-warp==4.0.0 absl-py etils --no-deps -d .device/warp/small --python-version 3.12 \
    --only-binary=:all:
  (cd .device/warp && split -b 60M warp_lang-*.whl part_ && ls warp_lang-*.whl > wheel_name && rm warp_lang-*.whl)
  cp ../shared/device/gpu-site-py312.tar.xz .device/ 2>/dev/null || true
  ls -la .device/warp .device/warp/small
  ;;
keep)
  mkdir -p /tmp/warp_parts && cp .device/warp/part_* /tmp/warp_parts/ && ls -la /tmp/warp_parts
  ;;
check)
  t0=$(date +%s)
  mkdir -p /tmp/warp_parts && cp .device/warp/part_* /tmp/warp_parts/
  wheel=/tmp/$(cat .device/warp/wheel_name 2>/dev/null || echo warp_lang-1.19.0-py3-none-manylinux_2_28_x86_64.whl)
  cat /tmp/warp_parts/part_* > "$wheel"
  tar -xJf .device/gpu-site-py312.tar.xz -C /tmp
  python3 -m pip install -q --no-index --no-deps --target /tmp/warpsite "$wheel" .device/warp/small/*.whl
  export PYTHONPATH=/tmp/gpusite:/tmp/warpsite:$PWD PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  python3 -c "import torch, warp, mujoco_warp; print(torch.__version__, torch.version.cuda, warp.__version__)" \
    | tee -a "$OUT/gpu.txt"
  echo "== setup $(( $(date +%s) - t0 )) s"
  timeout 150 python3 -m pytest -v -o addopts="" -p no:cacheprovider -rs --durations=10 \
    -k "cuda or graph" tests/test_mamujoco_warp.py >"$OUT/tests.log" 2>&1
  echo "== pytest exit $? (124: timed out)"
  grep -E "^(E |FAILED|ERROR|SKIPPED)|passed|failed|s call " "$OUT/tests.log" | tail -20
  echo "== tests done $(( $(date +%s) - t0 )) s"
  timeout 420 python3 benchmarks/warp_gpu.py --tasks halfcheetah_6x1 --time-to-return 5 \
    --json "$OUT/warp_gpu.json" 2>"$OUT/warp_gpu_stderr.log" | tee "$OUT/warp_gpu.txt"
  echo "== benchmark exit $? (124: timed out); done $(( $(date +%s) - t0 )) s"
  ;;
esac
