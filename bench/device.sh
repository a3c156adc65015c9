#!/usr/bin/env bash
# On the GPU machine (after ../shared/device/install.sh unpacked the bundle into /tmp/site):
#   bash bench/device.sh [bench args...]         -> $OUT/bench.json, $OUT/bench.log, $OUT/dmon.log (GPU use, clocks each s)
#   bash bench/device.sh probe [probe args...]   -> $OUT/probe.log (bench/dali_probe.py: where the GPU time goes)
#   bash bench/device.sh smoke [smoke args...]   -> $OUT/smoke-1gpu.json (+ smoke-2gpu.json with two GPUs): the CLI
#                                                  cold on small mixed shards, every row checked (bench/smoke.py)
#   bash bench/device.sh first                   -> a fresh machine's first command (about 5 minutes): the smoke run
#                                                  with one model, then the ladder's L10 and L11 rungs ($OUT/probe.log)
#   bash bench/device.sh round                   -> smoke, then the flow for the three models against their fastest
#                                                  forms in one bench run ($OUT/round-models.json,
#                                                  $OUT/smoke-1gpu.json; about 8.5 minutes with the bundle's install)
#   bash bench/device.sh host                    -> what bounds ResNet-50 on this host: DALI alone and the flow at 4
#                                                  and 12 threads, all JPEGs on the hardware decoder or 9 in 10, then
#                                                  the feeding thread's time per batch ($OUT/host-4.json,
#                                                  $OUT/host-12.json, $OUT/host-kernels.log; about 6.5 minutes)
#   bash bench/device.sh s3                      -> the flow from a loopback S3 server against local disk, ViT-B/16
#                                                  ($OUT/round-s3.json; about 3.5 minutes)
#   bash bench/device.sh share [share args...]   -> $OUT/share.json (bench/gpu_share.py: one worker process on the
#                                                  GPU against several, taking turns pass after pass)
#   bash bench/device.sh mps [any of the above]  -> the same with CUDA's Multi-Process Service on for the command
#                                                  ($OUT/mps-control.log beside its own files)
set -u
export PYTHONPATH=/tmp/site:$PWD
export PREFECT_HOME=/tmp/prefect-home PREFECT_SERVER_ANALYTICS_ENABLED=false
if [ "${1:-}" = "mps" ]; then
  shift
  # Without MPS, worker processes on one GPU take turns on it (time-slicing): while one runs only DALI's small
  # kernels, the other's model waits. Under MPS their kernels run side by side, as two streams of one process do.
  # Pair a run with the same command without `mps`; the bench's JSON says which it was ("cuda_mps").
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/wdsembed-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/wdsembed-mps/log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d || { echo "the MPS control daemon did not start (nvidia-cuda-mps-control -d)"; exit 1; }
  trap 'echo quit | nvidia-cuda-mps-control; cp "$CUDA_MPS_LOG_DIRECTORY/control.log" "${OUT:-/tmp}/mps-control.log"' EXIT
  bash "$0" "$@"
  exit $?
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import nvidia.dali, timm, torch, prefect, dask_cuda; print('dali', nvidia.dali.__version__, 'timm', timm.__version__, 'torch', torch.__version__, 'prefect', prefect.__version__, 'dask_cuda', dask_cuda.__version__)"
if [ "${1:-}" = "probe" ]; then
  shift
  python bench/dali_probe.py "$@" 2>&1 | tee "${OUT:-/tmp}/probe.log"
  exit "${PIPESTATUS[0]}"
fi
if [ "${1:-}" = "share" ]; then
  shift
  python bench/gpu_share.py --json "${OUT:-/tmp}/share.json" "$@" 2>&1 | tee "${OUT:-/tmp}/share.log"
  exit "${PIPESTATUS[0]}"
fi
if [ "${1:-}" = "first" ]; then
  bash "$0" smoke --models resnet18.a1_in1k
  rc=$?
  bash "$0" probe --ladder --images 16000 --repeats 2 --rungs L10 L11
  exit $((rc | $?))
fi
if [ "${1:-}" = "round" ]; then
  # A GPU session's first command (about 8.5 minutes with the bundle's install, under the device's 10-minute
  # limit; with S3 as well it ran past it): the cold smoke run first, then the full flow for the three
  # models against their fastest forms, in one bench run. `s3` is the next command.
  bash "$0" smoke --models resnet18.a1_in1k
  rc=$?
  bash "$0" --threads 12 --model-seconds 2 --models vit_large_patch14_clip_224.openai \
    vit_base_patch16_clip_224.openai resnet50.a1_in1k --skip dali fidelity > /dev/null
  rc=$((rc | $?))
  mv "${OUT:-/tmp}/bench.json" "${OUT:-/tmp}/round-models.json" 2>/dev/null
  rm -f "${OUT:-/tmp}/bench.log" "${OUT:-/tmp}/dmon.log" "${OUT:-/tmp}/smoke.log"
  exit "$rc"
fi
if [ "${1:-}" = "host" ]; then
  # What bounds a fast convnet on this host (about 5 minutes after the round's shards are built): DALI alone (b) and
  # the flow, ResNet-50, at 4 DALI threads (the default) with 9 JPEGs in 10 on the hardware decoder (the default)
  # and with all of them, in turn; then (b) and the flow at 12 threads. Each flow run's gpu_use sets the shards'
  # rate against the worker's own timing of the model ($OUT/host-4.json, $OUT/host-12.json).
  bash "$0" --threads 4 --model-seconds 2 --models resnet50.a1_in1k --worker-env 2 WDSEMBED_HW_DECODER_LOAD 1.0 \
    --skip fidelity > /dev/null
  rc=$?
  mv "${OUT:-/tmp}/bench.json" "${OUT:-/tmp}/host-4.json" 2>/dev/null
  bash "$0" --threads 12 --models resnet50.a1_in1k --repeats 2 --skip model fidelity > /dev/null
  rc=$((rc | $?))
  mv "${OUT:-/tmp}/bench.json" "${OUT:-/tmp}/host-12.json" 2>/dev/null
  rm -f "${OUT:-/tmp}/bench.log" "${OUT:-/tmp}/dmon.log"
  # Where the feeding thread's time goes per batch at the default 4 threads (the tar reader and host checks,
  # feed_input, waiting for DALI's outputs, the copy out) and the GPU's busy share: Python or DALI?
  bash "$0" probe --kernels --images 8000 --threads 4 --model resnet50.a1_in1k > /dev/null
  rc=$((rc | $?))
  mv "${OUT:-/tmp}/probe.log" "${OUT:-/tmp}/host-kernels.log" 2>/dev/null
  rm -f "${OUT:-/tmp}"/kernels-*.json
  exit "$rc"
fi
if [ "${1:-}" = "s3" ]; then
  # The shards the round built are reused (same --workdir, same arguments).
  bash "$0" --threads 12 --models vit_base_patch16_clip_224.openai --s3 --skip model dali fidelity > /dev/null
  rc=$?
  mv "${OUT:-/tmp}/bench.json" "${OUT:-/tmp}/round-s3.json" 2>/dev/null
  rm -f "${OUT:-/tmp}/bench.log" "${OUT:-/tmp}/dmon.log"
  exit "$rc"
fi
if [ "${1:-}" = "smoke" ]; then
  shift
  # with the model's stream timed (wdsembed.worker.StreamMeter, off by default), so that its GPU path runs too
  export WDSEMBED_STREAM_METER=1
  CUDA_VISIBLE_DEVICES=0 python bench/smoke.py --device cuda --json "${OUT:-/tmp}/smoke-1gpu.json" "$@" 2>&1 | tee "${OUT:-/tmp}/smoke.log"
  rc=${PIPESTATUS[0]}
  if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    python bench/smoke.py --device cuda --n-workers 2 --models resnet18.a1_in1k --json "${OUT:-/tmp}/smoke-2gpu.json" 2>&1 | tee -a "${OUT:-/tmp}/smoke.log"
    rc=$((rc | PIPESTATUS[0]))
  fi
  exit "$rc"
fi
# The GPUs' power, temperature, utilisation, clocks and memory each second beside the bench's log (W, C, SM %, NVJPG
# %, SM and memory MHz, framebuffer MB): starved, saturated or throttled, and the whole device's memory over the run.
nvidia-smi dmon -s pucm -o T > "${OUT:-/tmp}/dmon.log" 2>&1 &
dmon=$!
python bench/throughput.py --json "${OUT:-/tmp}/bench.json" --workdir /tmp/bench-work "$@" 2>&1 | tee "${OUT:-/tmp}/bench.log" | grep -v "distributed\.\|^\s*$"
rc=${PIPESTATUS[0]}
kill "$dmon" 2>/dev/null
exit "$rc"
