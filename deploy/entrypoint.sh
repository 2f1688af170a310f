#!/bin/sh
# Container start: prepare, then become the server.
# `escrow init` is idempotent: it creates the data directory, runs pending database
# migrations and creates the vault key on first start. `exec` replaces this shell with
# the server, so the SIGTERM of `docker stop` reaches it and it shuts down cleanly.
set -eu
escrow init
exec escrow serve "$@"
