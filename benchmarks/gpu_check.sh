#!/usr/bin/env bash
# The GPU checks of issue 16 in one command, < 8 minutes on one H200:
#   1. the CUDA tests (tests/test_device.py; on a GPU the CUDA-only ones run instead of skipping),
#   2. benchmarks/gpu_throughput.py (mtrank streamed from Parquet, bare GPU loop, torch-rechub,
#      roofline, GPU utilisation) -> gpu_throughput.json / .md.
# Results go to $OUT (the device tool's output folder) if set, else benchmarks/results/.
#
# On a bare CUDA image with its own torch (no registry there), first run here, where pip works:
#   bash benchmarks/gpu_wheels.sh        # -> .whl/ (polars, pydantic, torch-rechub; ~56 MiB)
# and carry .whl along; this script installs it into /tmp/site with --no-index.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RES=${OUT:-benchmarks/results}
mkdir -p "$RES"
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } 2>&1 | tee "$RES/gpu_check_env.txt"
t0=$(date +%s)
timeout 200 $PY -m pytest -q -rs -p no:cacheprovider tests/test_device.py 2>&1 | tail -25 | tee "$RES/gpu_check_tests.txt"
tests_rc=${PIPESTATUS[0]}
echo "tests: exit $tests_rc after $(( $(date +%s) - t0 )) s" | tee -a "$RES/gpu_check_tests.txt"
timeout 330 $PY benchmarks/gpu_throughput.py --out "$RES" ${GPU_BENCH_ARGS:-} 2>&1 | tail -40
bench_rc=${PIPESTATUS[0]}
echo "benchmark: exit $bench_rc; total $(( $(date +%s) - t0 )) s"
exit $(( tests_rc != 0 || bench_rc != 0 ))
