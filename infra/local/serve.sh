#!/usr/bin/env bash
# `make serve`: a local Prefect server (UI on http://127.0.0.1:4200) and the brainlm deployments served
# against it (flows/serve.py). Ctrl-C stops both. From another shell:
#   PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect deployment run pretrain/default --watch
# Prefect's database and flow results live under .brainlm/prefect (PREFECT_HOME), beside MLflow's.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
BIN="$ROOT/.venv/bin"
HOST=127.0.0.1
PORT="${BRAINLM_PREFECT_PORT:-4200}"
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.brainlm/prefect}"
export PREFECT_API_URL="http://$HOST:$PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
mkdir -p "$PREFECT_HOME"
SERVER_LOG="$PREFECT_HOME/server.log"

healthy() { curl -sf "$PREFECT_API_URL/health" >/dev/null 2>&1; }

# Another server on the port would answer our health check and receive our deployments: refuse instead.
if healthy; then
    echo "serve.sh: a Prefect server already answers on $HOST:$PORT; stop it or set BRAINLM_PREFECT_PORT" >&2
    exit 1
fi

server_pid=""
serve_pid=""
# Stop a process (or, given "-PID", its process group): TERM, up to 30 s to finish, then KILL.
stop_pid() {
    local target="$1" pid="${1#-}"
    [ -n "$pid" ] || return 0
    kill -TERM -- "$target" 2>/dev/null || return 0
    for _ in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    kill -KILL -- "$target" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
# The served deployments first, with everything they started (flow-run processes, a local Ray), while the
# server can still record what happens to their runs; then the server. Each leads its own process group.
stop() {
    trap - EXIT INT TERM HUP
    echo "stopping the served deployments and the Prefect server"
    [ -z "$serve_pid" ] || stop_pid "-$serve_pid"
    [ -z "$server_pid" ] || stop_pid "-$server_pid"
}
trap stop EXIT INT TERM HUP

echo "starting the Prefect server on $HOST:$PORT (PREFECT_HOME=$PREFECT_HOME, log: $SERVER_LOG)"
# Server and deployments run in sessions of their own, so a Ctrl-C in this terminal reaches only this script,
# which then stops them in order (see stop).
setsid "$BIN/prefect" server start --host "$HOST" --port "$PORT" >"$SERVER_LOG" 2>&1 &
server_pid=$!

for _ in $(seq 1 120); do
    healthy && break
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "serve.sh: the Prefect server exited during start-up; see $SERVER_LOG" >&2
        exit 1
    fi
    sleep 1
done
if ! healthy; then
    echo "serve.sh: the Prefect server did not answer $PREFECT_API_URL/health within 120 s; see $SERVER_LOG" >&2
    exit 1
fi

echo "Prefect UI: http://$HOST:$PORT    (PREFECT_API_URL=$PREFECT_API_URL)"
setsid "$BIN/python" -m flows.serve &
serve_pid=$!
wait "$serve_pid"
