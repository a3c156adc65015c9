#!/usr/bin/env bash
# On the GPU machine (after ../shared/device/install.sh unpacked the bundle into /tmp/site):
#   bash bench/device.sh [bench args...]         -> $OUT/bench.json, $OUT/bench.log
#   bash bench/device.sh probe [probe args...]   -> $OUT/probe.log (bench/dali_probe.py: where the GPU time goes)
set -u
export PYTHONPATH=/tmp/site:$PWD
export PREFECT_HOME=/tmp/prefect-home PREFECT_SERVER_ANALYTICS_ENABLED=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import nvidia.dali, timm, torch, prefect, dask_cuda; print('dali', nvidia.dali.__version__, 'timm', timm.__version__, 'torch', torch.__version__, 'prefect', prefect.__version__, 'dask_cuda', dask_cuda.__version__)"
if [ "${1:-}" = "probe" ]; then
  shift
  python bench/dali_probe.py "$@" 2>&1 | tee "${OUT:-/tmp}/probe.log"
  exit "${PIPESTATUS[0]}"
fi
python bench/throughput.py --json "${OUT:-/tmp}/bench.json" --workdir /tmp/bench-work "$@" 2>&1 | tee "${OUT:-/tmp}/bench.log" | grep -v "distributed\.\|^\s*$"
