#!/usr/bin/env bash
# Creates .venv (if missing), installs the pinned requirements, then this project (editable: the server
# packages, and the client package it carries). Idempotent: a second run only checks that all is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
# haproxy for the load-balancer and failover tests (tests/e2e/test_failover.py, docs/deployment.md): Debian's
# package, installed only when it is missing and we may (root with apt-get); otherwise those tests say so and skip.
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ] && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing haproxy (apt-get)" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null) \
    || echo "setup: could not install haproxy; the haproxy/failover tests will skip" >&2
fi
