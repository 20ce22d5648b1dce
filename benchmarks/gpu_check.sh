#!/usr/bin/env bash
# The CUDA checks on a lent GPU machine (torch + CUDA, no JAX): the device matrix (all network types, MLP
# and GRU actors and critics, continuous and masked discrete actions, the latter through the pure-torch
# game of tests/masked_game.py), the cross-device resumes (the CPU half in a process that sees no GPU),
# the VMAS CUDA tests and the rollout-on-the-trainer-device option, slow-marked CUDA cases included, and
# the CUDA-graph compiled update; then benchmarks/gpu.py (HalfCheetah 6x1 on gpu and cpu, VMAS balance
# at 10 to 16384 environments), its figures in $OUT/gpu.json after each run, and VMAS at 4096 and 16384
# environments again with compile_update and TF32 (matmul_precision high), in $OUT/gpu_fast.json.
# It expects the machine's package tarball in .device/ (cp ../shared/device/gpu-site-py312.tar.xz),
# the EGL debs in .gl/ and the PyOpenGL wheel in .whl/ (see ../shared/device/README.md), carried with the
# run. Set-up 30 s; tests (136 s on an H200), benchmark and fast-settings benchmark cut at 220, 180 and
# 150 s: under 10 min in all.
set -u -o pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
tar -xJf .device/gpu-site-py312.tar.xz -C /tmp
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/whl .whl/*.whl
export PYTHONPATH=/tmp/gpusite:/tmp/whl:$PWD PYTHONUNBUFFERED=1 MUJOCO_GL=egl
for f in .gl/*.deb; do dpkg -x "$f" / ; done; ldconfig
export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
ls /usr/local/nvidia/share/glvnd/egl_vendor.d/ >/dev/null 2>&1 || unset __EGL_VENDOR_LIBRARY_FILENAMES
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchrl, lightning; print(torch.__version__, torch.version.cuda, torchrl.__version__, lightning.__version__)" | tee -a "$OUT/gpu.txt"
echo "== setup $(( $(date +%s) - t0 )) s"
timeout 220 python3 -m pytest -v -o addopts="" -p no:cacheprovider -rs --durations=20 \
  -k "(cuda or gpu or trainer_device) and not smax" tests/test_devices.py tests/test_vmas_env.py \
  tests/test_masked_game.py tests/test_compile_update.py tests/test_nonfinite.py >"$OUT/tests.log" 2>&1
echo "== pytest exit $? (124: timed out)"
grep -E "^(E |FAILED|ERROR|SKIPPED)|passed|failed|s call " "$OUT/tests.log" | tail -45
echo "== tests done $(( $(date +%s) - t0 )) s"
timeout 180 python3 benchmarks/gpu.py --json "$OUT/gpu.json" 2>"$OUT/gpu_stderr.log" | tee "$OUT/gpu_bench.txt"
echo "== benchmark exit $? (124: timed out); $(( $(date +%s) - t0 )) s"
timeout 150 python3 benchmarks/gpu.py --no-halfcheetah --vmas-envs 4096 16384 --compile-update \
  --matmul-precision high --json "$OUT/gpu_fast.json" 2>"$OUT/gpu_fast_stderr.log" | tee "$OUT/gpu_fast.txt"
echo "== fast-settings benchmark exit $? (124: timed out); done $(( $(date +%s) - t0 )) s"
