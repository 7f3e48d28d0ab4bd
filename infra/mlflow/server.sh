#!/usr/bin/env bash
# The MLflow tracking server of a brainlm deployment: runs and the model registry in PostgreSQL, artifacts in S3,
# MLflow's basic auth in front. docker compose and Kubernetes (infra/compose.yaml, infra/k8s/mlflow.yaml) run this
# script, and so do the tests (tests/flows/test_production_backends.py), so all three start the same server.
#
# Artifacts are proxied (--serve-artifacts): clients upload and download through this server, so they hold
# only their MLflow user, never the database password or S3 keys. Every setting and secret comes from the
# environment; nothing secret is written anywhere but a private temporary file (the auth app's config).
#
#   MLFLOW_BACKEND_STORE_URI        postgresql+psycopg2://USER:PASSWORD@HOST:5432/mlflow   (runs, registry)
#   MLFLOW_AUTH_DATABASE_URI        postgresql+psycopg2://USER:PASSWORD@HOST:5432/mlflow_auth  (users, grants;
#                                   a database of its own: both keep an alembic_version table)
#   MLFLOW_ARTIFACTS_DESTINATION    s3://BUCKET/mlflow
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (or any other AWS credential source); MLFLOW_S3_ENDPOINT_URL for an
#                                   S3 that is not AWS (MinIO, Ceph, ...)
#   MLFLOW_AUTH_ADMIN_USERNAME      the first admin (default: admin), created on the first start
#   MLFLOW_AUTH_ADMIN_PASSWORD      its password (MLflow ships none; the server refuses to start without one)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  signs the auth app's sessions and CSRF tokens
#   MLFLOW_HOST, MLFLOW_PORT, MLFLOW_WORKERS   default 0.0.0.0, 5000, 1
#   MLFLOW_AUTH_CACHE_TTL_SECONDS   default 60: a verified password is trusted for this long per worker process
#                                   (checking it costs ~0.4 s of PBKDF2 per request otherwise); a password
#                                   changed through another worker takes up to this long to reach this one
set -euo pipefail

need() {
    if [ -z "${!1:-}" ]; then
        echo "infra/mlflow/server.sh: set $1 ($2)" >&2
        exit 2
    fi
}
need MLFLOW_BACKEND_STORE_URI "postgresql+psycopg2://USER:PASSWORD@HOST:5432/mlflow"
need MLFLOW_AUTH_DATABASE_URI "postgresql+psycopg2://USER:PASSWORD@HOST:5432/mlflow_auth"
need MLFLOW_ARTIFACTS_DESTINATION "s3://BUCKET/mlflow"
need MLFLOW_AUTH_ADMIN_PASSWORD "the first admin's password"
need MLFLOW_FLASK_SERVER_SECRET_KEY "a long random string"

# The auth app reads its settings from an ini file; it holds the auth database's password, so it lives in a
# private temporary folder that is removed when the server exits.
auth_dir="$(mktemp -d)"
trap 'rm -rf "$auth_dir"' EXIT
(umask 077 && cat > "$auth_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_SECONDS:-60}
INI
)
export MLFLOW_AUTH_CONFIG_PATH="$auth_dir/basic_auth.ini"
# No background job runner (it starts a pool of extra processes that brainlm never uses).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false

mlflow server \
    --app-name basic-auth \
    --serve-artifacts \
    --host "${MLFLOW_HOST:-0.0.0.0}" \
    --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-1}" &
server=$!
# Stop the server (and the processes it started) with this script: a container's or a test's SIGTERM lands here.
trap 'kill -TERM "$server" 2>/dev/null; wait "$server"; rm -rf "$auth_dir"' EXIT INT TERM
wait "$server"
