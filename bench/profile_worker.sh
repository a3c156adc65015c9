#!/usr/bin/env bash
# Which Python code of the GPU worker holds the GIL while the flow runs (py-spy, on the GPU host).
#
#   bash bench/profile_worker.sh SECONDS [bench/device.sh args...]
#
# Runs bench/device.sh with the given args (with --skip model fidelity). Once a process holds more than 2 GiB of GPU
# memory (the Dask GPU worker with its model, graph and pipeline built: the warm-up flow has started), py-spy
# records that process for SECONDS: only samples where a thread holds the GIL (--gil), without pausing it
# (--nonblocking), stacks per thread. Writes $OUT/gil.txt (collapsed stacks) and $OUT/gil-summary.txt
# (bench/gil_summary.py). PROFILE_WORKER=N profiles the Nth GPU worker process the bench starts instead of the
# first: with --s3 the bench starts one for the model's full flow, one for the local-disk side of the pair, then
# one for S3, so PROFILE_WORKER=3 profiles the S3-fed worker. py-spy: carry .whl (../shared/device/bundle does not
# fetch it; `pip download py-spy`) and
#   python -m pip install --no-deps --no-index --target /tmp/pyspy .whl/py_spy*.whl
# in the same command (a later command may no longer have .whl; /tmp/site/bin already exists, so --target
# /tmp/site would skip the binary).
set -u
spy=$(command -v py-spy || ls /tmp/pyspy/bin/py-spy /tmp/site/bin/py-spy 2>/dev/null | head -1)
if [ -z "$spy" ]; then echo "py-spy not found (see the header of $0)" >&2; exit 2; fi
seconds=$1
shift
skip=$(( ${PROFILE_WORKER:-1} - 1 ))
# PROFILE_NATIVE=1: with the C/C++ frames under each Python frame (what a call into DALI or torch does while it holds
# the GIL). py-spy then pauses the process for each sample, so fewer of them: 50 a second instead of 250.
mode="--nonblocking -r 250"
if [ "${PROFILE_NATIVE:-0}" = "1" ]; then mode="--native -r 50"; fi
seen=""
(
  for _ in $(seq 1200); do
    # the process holding the most GPU memory, once it holds over 2 GiB: the worker (the bench, --skip model, holds little)
    pid=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null |
          sort -t, -k2 -n -r | awk -F', ' '$2 > 2048 {print $1; exit}')
    if [ -z "$pid" ] && [ "$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)" -gt 2048 ] &&
       [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader)" ]; then
      # a container that hides the GPU's processes: the spawned process with the largest RSS
      pid=$(ps -eo pid=,rss=,args= | grep "multiprocessing" | grep -v grep | sort -k2 -n -r | awk '{print $1; exit}')
    fi
    if [ -n "$pid" ] && [ "$skip" -gt 0 ]; then  # an earlier worker than the one asked for: wait for it to go
      case " $seen " in *" $pid "*) ;; *) seen="$seen $pid"; skip=$((skip - 1)) ;; esac
      pid=""
    fi
    if [ -n "$pid" ]; then
      case " $seen " in *" $pid "*) sleep 1; continue ;; esac
      echo "profiling GPU worker pid $pid for ${seconds}s" >&2
      "$spy" record --gil $mode --threads -d "$seconds" -f raw \
        -o "${OUT:-/tmp}/gil.txt" -p "$pid" > /tmp/py-spy.log 2>&1
      python bench/gil_summary.py "${OUT:-/tmp}/gil.txt" > "${OUT:-/tmp}/gil-summary.txt" 2>&1
      exit 0
    fi
    sleep 1
  done
) &
profiler=$!
bash bench/device.sh "$@"
rc=$?
wait "$profiler"
exit "$rc"
