#!/usr/bin/env bash
# Start the team's MLflow tracking server: PostgreSQL backend store, artifacts proxied by the
# server (clients never need storage credentials), optional basic-auth. Configured only through
# the environment, so the same script runs under systemd, Slurm, Docker and Kubernetes, and
# secrets come from wherever the platform keeps them (never from this file).
#
# Required:
#   MLFLOW_BACKEND_STORE_URI      postgresql+psycopg://USER:PASSWORD@HOST:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION  where the server keeps artifacts: file:///shared/mlartifacts,
#                                 s3://bucket/prefix, gs://..., (clients upload through the server)
# Optional:
#   MLFLOW_HOST (127.0.0.1; 0.0.0.0 behind a firewall/ingress), MLFLOW_PORT (5000),
#   MLFLOW_WORKERS (2), MLFLOW_ALLOWED_HOSTS (comma-separated Host headers the server accepts
#   besides localhost and private IPs, e.g. mlflow.example.org)
#   ALCOT_MLFLOW_AUTH=1 turns on MLflow's basic-auth app; it then also needs
#     MLFLOW_AUTH_DATABASE_URI        users and permissions: a second database (not the
#                                     tracking one: both keep an alembic version table)
#     MLFLOW_AUTH_ADMIN_PASSWORD      the admin's password, used once to create the admin user
#     MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF secret, the same on every server replica
#     MLFLOW_AUTH_ADMIN_USERNAME      (admin) and MLFLOW_AUTH_DEFAULT_PERMISSION (READ)
#     ALCOT_MLFLOW_AUTH_CACHE_SECONDS (0) caches a verified password that long per worker: each
#       request otherwise re-hashes it (PBKDF2), which costs seconds per request on a busy
#       small server; a changed or revoked password then still works on other workers until the
#       cache entry expires
#   MLFLOW_BIN: the mlflow executable (default: the one next to this project's .venv python,
#     else mlflow on PATH)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

fail() { echo "serve.sh: $*" >&2; exit 2; }
[ -n "${MLFLOW_BACKEND_STORE_URI:-}" ] || fail "set MLFLOW_BACKEND_STORE_URI (postgresql+psycopg://...)"
[ -n "${MLFLOW_ARTIFACTS_DESTINATION:-}" ] || fail "set MLFLOW_ARTIFACTS_DESTINATION (file:///..., s3://...)"
case "$MLFLOW_BACKEND_STORE_URI" in
    postgresql*|mysql*|sqlite:*|mssql*) ;;
    *) fail "MLFLOW_BACKEND_STORE_URI must be a database URI, got '${MLFLOW_BACKEND_STORE_URI%%:*}:...'" ;;
esac

mlflow_bin="${MLFLOW_BIN:-}"
if [ -z "$mlflow_bin" ]; then
    if [ -x "$root/.venv/bin/mlflow" ]; then mlflow_bin="$root/.venv/bin/mlflow"; else mlflow_bin=mlflow; fi
fi

# The store URI holds the database password: `mlflow server` reads it from the environment
# (MLFLOW_BACKEND_STORE_URI), so it never shows in the process list (`ps`, /proc/PID/cmdline),
# which every user of the machine can read.
export MLFLOW_BACKEND_STORE_URI
args=(server
    --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
    --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}"
    --workers "${MLFLOW_WORKERS:-2}")
[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ] && args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")

if [ "${ALCOT_MLFLOW_AUTH:-0}" = "1" ]; then
    [ -n "${MLFLOW_AUTH_DATABASE_URI:-}" ] || fail "ALCOT_MLFLOW_AUTH=1 needs MLFLOW_AUTH_DATABASE_URI"
    [ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] || fail "ALCOT_MLFLOW_AUTH=1 needs MLFLOW_AUTH_ADMIN_PASSWORD"
    [ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ] || fail "ALCOT_MLFLOW_AUTH=1 needs MLFLOW_FLASK_SERVER_SECRET_KEY"
    # The auth app reads an ini file; write one that holds no secret (the password and the
    # key stay in the environment) and point MLFLOW_AUTH_CONFIG_PATH at it.
    conf="$(mktemp -d)/basic_auth.ini"
    umask 077
    cat > "$conf" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${ALCOT_MLFLOW_AUTH_CACHE_SECONDS:-0}
INI
    export MLFLOW_AUTH_CONFIG_PATH="$conf"
    args+=(--app-name basic-auth)
fi

# Lean: no background job runner (GenAI evaluation jobs; 35 s -> 17 s start, 2.1 -> 0.5 GB).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
exec "$mlflow_bin" "${args[@]}"
