#!/usr/bin/env bash
# The application role: `pipeline_app`, a LOGIN role with no other attribute,
# which the processor and the sqs-consumer connect as. It owns nothing and may
# create nothing: `streamctl db migrate` (the db-migrate Job, as the owner)
# creates the tables and grants it SELECT, INSERT, UPDATE and DELETE on them.
#
# Run twice, with the same effect (it creates the role if missing and sets its
# password either way):
#   - by the postgres image's entrypoint, from /docker-entrypoint-initdb.d, on
#     the first start of an empty data volume (over the local socket, as
#     POSTGRES_USER); it is executable (defaultMode 0555), so it runs in its
#     own process rather than being sourced into the entrypoint's;
#   - by the db-migrate Job's init container on every deploy (over TCP, PGHOST
#     and PGPASSWORD: the owner's), so a data volume initialised before the role
#     existed gets it too, and a rotated PIPELINE_APP_PASSWORD reaches the role.
#
# The password comes from the environment (Secret postgres-app-credentials),
# read by psql itself (\getenv), so it is on no command line.
set -euo pipefail

: "${PIPELINE_APP_PASSWORD:?PIPELINE_APP_PASSWORD is not set (Secret postgres-app-credentials)}"
: "${POSTGRES_USER:?POSTGRES_USER is not set (the database owner)}"
: "${POSTGRES_DB:?POSTGRES_DB is not set}"

psql --no-psqlrc -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
\getenv app_password PIPELINE_APP_PASSWORD
SELECT 'CREATE ROLE pipeline_app'
 WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'pipeline_app')
\gexec
ALTER ROLE pipeline_app WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'app_password';
-- Nobody but the owner creates objects in the schema (PostgreSQL 15 and later
-- grant PUBLIC no CREATE here already; this says so whatever the version).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO pipeline_app;
SQL
echo "postgres-app-role: role pipeline_app ready in database $POSTGRES_DB"
