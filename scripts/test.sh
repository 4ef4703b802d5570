#!/usr/bin/env bash
# Runs lint and the test suite (fast default set; pass -m slow or "" for more).
source "$(dirname "$0")/env.sh"
echo "== ruff"
ruff check .
ruff format --check .
echo "== pytest"
if [ "$#" -eq 0 ]; then
  set -- -m "not slow"
fi
exec python -m pytest -q -n 2 --dist loadgroup "$@"
