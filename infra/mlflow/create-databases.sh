#!/usr/bin/env bash
# Create the role and the two databases the tracking server needs, on an existing PostgreSQL,
# as a superuser (psql reads PGHOST/PGPORT/PGUSER/PGPASSWORD as usual):
#   MLFLOW_DB_PASSWORD=... infra/mlflow/create-databases.sh [ROLE] [DB] [AUTH_DB]
# Defaults: role mlflow, databases mlflow (runs, metrics) and mlflow_auth (users, permissions).
# Idempotent: what exists is left alone. The schema itself is created by `mlflow server` on
# its first start (and upgraded by `mlflow db upgrade URI` after an MLflow upgrade).
set -euo pipefail
role="${1:-mlflow}" db="${2:-mlflow}" auth_db="${3:-mlflow_auth}"
[ -n "${MLFLOW_DB_PASSWORD:-}" ] || { echo "set MLFLOW_DB_PASSWORD" >&2; exit 2; }
psql=(psql -v ON_ERROR_STOP=1 -X -q -d postgres)
exists() { [ "$("${psql[@]}" -tAc "$1")" = 1 ]; }
if ! exists "SELECT 1 FROM pg_roles WHERE rolname = '$role'"; then
    "${psql[@]}" -v pw="$MLFLOW_DB_PASSWORD" <<SQL
CREATE ROLE "$role" LOGIN PASSWORD :'pw';
SQL
fi
for d in "$db" "$auth_db"; do
    exists "SELECT 1 FROM pg_database WHERE datname = '$d'" || "${psql[@]}" -c "CREATE DATABASE \"$d\" OWNER \"$role\""
done
echo "role $role, databases $db and $auth_db ready"
