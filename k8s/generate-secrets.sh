#!/usr/bin/env bash
# Generates the deployment's secrets: one env file per Secret, with random
# values, in a directory git ignores (default k8s/overlays/local/secrets/),
# which the overlay's secretGenerator reads (`envs:`). No password is in git;
# every cluster gets its own.
#
#   bash k8s/generate-secrets.sh [DIR]      # make render / deploy / check run it
#
# A file that exists is kept as it is: re-running changes nothing, so the
# Secrets, and the passwords the stores were initialised with, stay the same
# from one deploy to the next. To rotate one, delete its file and deploy again
# (k8s/README.md, "Secrets"). The directory is 0700, every file 0600.
#
# Values are hex (from /dev/urandom), so they need no quoting in an env file
# and no percent-encoding in a URL: the POSTGRES_URL of each file carries that
# file's password as it is. The env names are the settings the containers read
# (POSTGRES_URL, CLICKHOUSE_PASSWORD, AWS_*), the images' own (POSTGRES_PASSWORD)
# or the keys the manifests mount (token, password); k8s/tests/test_policy.py
# checks that this script writes every key the manifests reference.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/k8s/overlays/local/secrets}"

# PostgreSQL's address and database, as the manifests name them.
PG_HOST="postgres.platform.svc.cluster.local:5432"
PG_DB="pipeline"
# The database owner (the image's POSTGRES_USER), who creates the tables
# (`streamctl db migrate`), and the role the processor and the sqs-consumer
# connect as, which may only read and write them (created by
# base/platform/postgres-app-role.sh).
PG_OWNER="postgres"
PG_APP_ROLE="pipeline_app"

# random BYTES: BYTES random bytes as lower-case hex (2 x BYTES characters).
random() {
  od -An -v -tx1 -N "$1" /dev/urandom | tr -d ' \n'
}

# write NAME LINE...: DIR/NAME with one LINE each, unless it exists. Written to
# a temporary file first and linked into place, so a reader never sees half a
# file and a concurrent run never replaces one.
write() {
  local name="$1" target="$DIR/$1" tmp
  shift
  if [ -e "$target" ]; then
    return 0
  fi
  tmp="$(mktemp "$DIR/.$name.XXXXXX")"
  printf '%s\n' "$@" >"$tmp"
  chmod 0600 "$tmp"
  if ln "$tmp" "$target" 2>/dev/null; then
    echo "generate-secrets: wrote ${target#"$ROOT"/}" >&2
  fi
  rm -f "$tmp"
}

umask 077
mkdir -p "$DIR"
chmod 0700 "$DIR"

# The database owner: the postgres image sets its password on first start
# (POSTGRES_PASSWORD); the db-migrate Job connects with the URL.
owner_password="$(random 24)"
write postgres-owner.env \
  "POSTGRES_PASSWORD=$owner_password" \
  "POSTGRES_URL=postgres://$PG_OWNER:$owner_password@$PG_HOST/$PG_DB"

# The application role: PIPELINE_APP_PASSWORD for the role's creation (postgres
# init, db-migrate), POSTGRES_URL for the processor and the sqs-consumer.
app_password="$(random 24)"
write postgres-app.env \
  "PIPELINE_APP_PASSWORD=$app_password" \
  "POSTGRES_URL=postgres://$PG_APP_ROLE:$app_password@$PG_HOST/$PG_DB"

# ClickHouse's user `pipeline` (the image's entrypoint creates it).
write clickhouse.env \
  "CLICKHOUSE_USER=pipeline" \
  "CLICKHOUSE_PASSWORD=$(random 24)"

# ElasticMQ checks no signature, but the keys are no less generated.
write sqs.env \
  "AWS_ACCESS_KEY_ID=$(random 10)" \
  "AWS_SECRET_ACCESS_KEY=$(random 20)"

# MinIO's root user, which the DLQ archiver signs its S3 requests as.
write s3.env \
  "AWS_ACCESS_KEY_ID=$(random 10)" \
  "AWS_SECRET_ACCESS_KEY=$(random 20)"
# The processor's admin token (POST /actors/<name>/kill|panic|hang): 64 hex
# characters, mounted as a file (ADMIN_TOKEN_FILE).
write processor-admin-token.env "token=$(random 32)"

# Grafana's admin user (anonymous users only view).
write grafana-admin.env "password=$(random 24)"
