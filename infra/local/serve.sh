#!/usr/bin/env bash
# `make serve`: on this machine, a Prefect server (UI on http://127.0.0.1:4200), an MLflow tracking server over the
# home's own store (UI on http://127.0.0.1:5000) and the brainlm deployments served against Prefect
# (flows/serve.py: ingest, pretrain, evaluate, promote, and the automation that evaluates the champion on every
# new cohort version). Ctrl-C stops all three, with everything they started. From another shell:
#   export PREFECT_API_URL=http://127.0.0.1:4200/api
#   .venv/bin/prefect deployment run pretrain/default -p preset=tiny --watch
#
# The flows write MLflow's store directly (the home's mlflow.yaml: SQLite + artifacts under .brainlm/), like the
# CLI; the MLflow server reads the same store for its UI. When the settings name another tracking store (a
# tracking server: MLFLOW_TRACKING_URI or BRAINLM_MLFLOW_CONFIG), no MLflow server starts here.
# Prefect's database lives under <home>/.brainlm/prefect (PREFECT_HOME). Ports: BRAINLM_PREFECT_PORT (4200),
# BRAINLM_MLFLOW_PORT (5000). Deployment parameters and schedules: BRAINLM_SERVE_CONFIG (see README).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
BIN="$ROOT/.venv/bin"
HOST=127.0.0.1
PORT="${BRAINLM_PREFECT_PORT:-4200}"
MLFLOW_PORT="${BRAINLM_MLFLOW_PORT:-5000}"
HOME_DIR="$(cd "${BRAINLM_HOME:-$ROOT}" && pwd)"
export PREFECT_HOME="${PREFECT_HOME:-$HOME_DIR/.brainlm/prefect}"
export PREFECT_API_URL="http://$HOST:$PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
mkdir -p "$PREFECT_HOME"
SERVER_LOG="$PREFECT_HOME/server.log"
MLFLOW_LOG="$HOME_DIR/.brainlm/mlflow-server.log"

healthy() { curl -sf "$1" >/dev/null 2>&1; }

# Another server on a port would answer our health checks and receive our deployments or runs: refuse instead.
if healthy "$PREFECT_API_URL/health"; then
    echo "serve.sh: a Prefect server already answers on $HOST:$PORT; stop it or set BRAINLM_PREFECT_PORT" >&2
    exit 1
fi

# The home's tracking store and artifact root, as brainlm reads them (mlflow.yaml, BRAINLM_MLFLOW_CONFIG,
# MLFLOW_TRACKING_URI): the UI shows exactly what the flows and the CLI write.
store="$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$BIN/python" -c \
    "from brainlm.config import load_settings; s = load_settings(); print(s.tracking_uri()); print(s.artifact_root())")" \
    || { echo "serve.sh: cannot read the brainlm settings of $HOME_DIR (see the error above)" >&2; exit 1; }
{ read -r TRACKING_URI; read -r ARTIFACT_ROOT; } <<<"$store"
if [[ "$TRACKING_URI" == sqlite:* ]] && healthy "http://$HOST:$MLFLOW_PORT/health"; then
    echo "serve.sh: something already answers on $HOST:$MLFLOW_PORT; stop it or set BRAINLM_MLFLOW_PORT" >&2
    exit 1
fi

server_pid=""
mlflow_pid=""
serve_pid=""
# Stop a process group: TERM, up to 30 s to finish, then KILL.
stop_group() {
    local pid="$1"
    [ -n "$pid" ] || return 0
    kill -TERM -- "-$pid" 2>/dev/null || return 0
    for _ in $(seq 1 60); do
        kill -0 -- "-$pid" 2>/dev/null || break
        sleep 0.5
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
# The served deployments first, with everything they started (flow-run processes, a local Ray), while the
# Prefect server can still record what happens to their runs; then the MLflow server and the Prefect server.
# Each leads its own process group (the MLflow server's workers and job runner included).
stop() {
    trap - EXIT INT TERM HUP
    echo "stopping the served deployments, the MLflow server and the Prefect server"
    stop_group "$serve_pid"
    stop_group "$mlflow_pid" &
    stop_group "$server_pid" &
    wait
}
trap stop EXIT
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM HUP

# Each server runs in a session of its own, so a Ctrl-C in this terminal reaches only this script, which then
# stops them in order (see stop).
echo "starting the Prefect server on $HOST:$PORT (PREFECT_HOME=$PREFECT_HOME, log: $SERVER_LOG)"
setsid "$BIN/prefect" server start --host "$HOST" --port "$PORT" >"$SERVER_LOG" 2>&1 &
server_pid=$!

if [[ "$TRACKING_URI" == sqlite:* ]]; then
    echo "starting the MLflow server on $HOST:$MLFLOW_PORT over $TRACKING_URI (log: $MLFLOW_LOG)"
    # One worker and no job runner: the UI is all it serves (the defaults start 4 workers + 7 job consumers).
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$BIN/mlflow" server --backend-store-uri "$TRACKING_URI" \
        --default-artifact-root "$ARTIFACT_ROOT" --no-serve-artifacts --host "$HOST" --port "$MLFLOW_PORT" \
        --workers 1 >"$MLFLOW_LOG" 2>&1 &
    mlflow_pid=$!
fi

wait_healthy() {  # name, URL, pid, log
    for _ in $(seq 1 120); do
        healthy "$2" && return 0
        if ! kill -0 "$3" 2>/dev/null; then
            echo "serve.sh: the $1 exited during start-up; see $4" >&2
            exit 1
        fi
        sleep 1
    done
    echo "serve.sh: the $1 did not answer $2 within 120 s; see $4" >&2
    exit 1
}
wait_healthy "Prefect server" "$PREFECT_API_URL/health" "$server_pid" "$SERVER_LOG"
echo "Prefect UI: http://$HOST:$PORT    (PREFECT_API_URL=$PREFECT_API_URL)"
if [ -n "$mlflow_pid" ]; then
    wait_healthy "MLflow server" "http://$HOST:$MLFLOW_PORT/health" "$mlflow_pid" "$MLFLOW_LOG"
    echo "MLflow UI:  http://$HOST:$MLFLOW_PORT    (store: $TRACKING_URI)"
else
    echo "MLflow:     $TRACKING_URI (a tracking server of its own; not started here)"
fi

setsid "$BIN/python" -m flows.serve &
serve_pid=$!
# Until Ctrl-C, or until one of the three exits (then the others are stopped too).
set +e
wait -n "$serve_pid" "$server_pid" ${mlflow_pid:+"$mlflow_pid"}
status=$?
echo "serve.sh: a served process exited (status $status); see $SERVER_LOG${mlflow_pid:+, $MLFLOW_LOG} and the output above" >&2
exit "$status"
