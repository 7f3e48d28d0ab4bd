#!/usr/bin/env bash
# The Prefect worker of a brainlm deployment: serves the flows' deployments (flows/serve.py, the same code as
# `make serve`) against the Prefect server at PREFECT_API_URL, and runs their flow runs in this container.
#
# A pretraining flow is a Ray driver. With RAY_ADDRESS set (the Ray head's GCS, host:6379), this container first
# joins the cluster as a node with no CPUs and no GPUs: the driver, its progress queue and Ray Train's
# controller run here, next to the flow, and every training worker runs on the GPU nodes.
#
#   PREFECT_API_URL      http://prefect-server:4200/api
#   RAY_ADDRESS          ray-head:6379 (unset: each flow run starts Ray of its own in this container)
#   and what the flows read: BRAINLM_HOME, BRAINLM_MLFLOW_CONFIG, MLFLOW_TRACKING_URI (+ _USERNAME/_PASSWORD),
#   BRAINLM_DVC_REMOTE, BRAINLM_DVC_S3_ENDPOINT, AWS_* (see infra/README.md)
set -euo pipefail

if [ -z "${PREFECT_API_URL:-}" ]; then
    echo "infra/prefect/worker.sh: set PREFECT_API_URL (http://prefect-server:4200/api)" >&2
    exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if [ -n "${RAY_ADDRESS:-}" ]; then
    ray start --address "$RAY_ADDRESS" --num-cpus 0 --num-gpus 0 --disable-usage-stats
fi
# The container's lifetime is the server's: its Ray node goes with the container.
exec python -m flows.serve
