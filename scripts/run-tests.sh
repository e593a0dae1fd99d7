#!/usr/bin/env bash
# Runs the whole test suite on up to four workers (pytest-xdist; a test keeps its own
# namespace, directories and daemon, or shares a module-scoped one that it checks it finds and
# leaves clean (the failpoint matrix, test_remote_api): module fixtures are per worker, set up
# again, one daemon start, when a worker comes back to the module after tests of another).
# --dist loadgroup runs a module marked xdist_group whole on one worker (the browser tests) and
# spreads the rest test by test, as --dist load does. pytest's "no tests collected" (exit 5) is
# not a failure. ROOST_TEST_WORKERS=0 runs it in one process.
set -uo pipefail
cd "$(dirname "$0")/.."
workers=${ROOST_TEST_WORKERS:-$(nproc)}
if [ "$workers" -gt 4 ]; then
    workers=4
fi
.venv/bin/python -m pytest -n "$workers" --dist loadgroup --durations=20 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "run-tests: no tests were collected"
    exit 0
fi
exit "$rc"
