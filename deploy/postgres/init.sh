#!/bin/sh
# Runs once on an empty data directory (docker-entrypoint-initdb.d): roles, databases, passwords.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" -f /docker-entrypoint-initdb.d/init.sql.in
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" \
  -c "ALTER ROLE xiaozhi PASSWORD '${HUB_DB_PASSWORD}'" \
  -c "ALTER ROLE rasa PASSWORD '${RASA_TRACKER_DB_PASSWORD}'"
