-- Run by the ClickHouse image's entrypoint from /docker-entrypoint-initdb.d on
-- a fresh data volume. The processor creates its `events` table itself.
CREATE DATABASE IF NOT EXISTS pipeline;
