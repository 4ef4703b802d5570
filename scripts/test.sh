#!/usr/bin/env bash
# Lint + tests. Default: the fast set (-m "not slow"); --all: everything CI runs (Spark
# local-cluster jobs and the large nets included; GPU tests skip themselves without a GPU).
# Other arguments go to pytest.
source "$(dirname "$0")/env.sh"
echo "== ruff"
ruff check .
ruff format --check .
echo "== pytest"
if [ "${1:-}" = "--all" ]; then
  shift
  set -- -m "" "$@"
elif [ "$#" -eq 0 ]; then
  set -- -m "not slow"
fi
exec python -m pytest -q -n 2 --dist loadgroup "$@"
