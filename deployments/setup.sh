#!/usr/bin/env bash
# One-time setup of a Prefect server for wdsembed's deployments (safe to run again).
#
#   deployments/setup.sh INPUT OUTPUT      # e.g. /data/shards /data/embeddings, or s3://bucket/shards ...
#
# Needs PREFECT_API_URL pointing at the server and the project's .venv on PATH (or `prefect` from it).
# Env: WDSEMBED_POOL (default wdsembed-gpu, the name prefect.yaml uses), WDSEMBED_POOL_LIMIT (default 1).
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 INPUT OUTPUT" >&2
    exit 2
fi
pool="${WDSEMBED_POOL:-wdsembed-gpu}"

# A process pool: the worker runs each flow run as a subprocess on its own host, with that host's GPUs,
# environment (AWS credentials, HF_HOME) and this project's .venv. --overwrite keeps the script re-runnable.
prefect work-pool create "$pool" --type process --overwrite
# Every run takes all the host's GPUs, so the pool runs one flow run at a time across both deployments;
# the deployments' own limit (prefect.yaml) keeps each to one run too. Raise it for a pool of several hosts.
prefect work-pool set-concurrency-limit "$pool" "${WDSEMBED_POOL_LIMIT:-1}"

# The deployments' default input/output (read by `prefect deploy`; run forms can override them per run).
prefect variable set embed_input "$1" --overwrite
prefect variable set embed_output "$2" --overwrite
