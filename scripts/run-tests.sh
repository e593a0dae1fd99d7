#!/usr/bin/env bash
# Runs the whole test suite on four workers, or one per CPU where there are more, up to eight
# (pytest-xdist): most tests wait on guests, daemons and namespaces, not on a CPU, so four
# workers on two cores take about two thirds of the time two do (a test keeps its own
# namespace, directories and daemon, or shares a module-scoped one that it checks it finds and
# leaves clean (the failpoint matrix, test_remote_api): module fixtures are per worker, set up
# again, one daemon start, when a worker comes back to the module after tests of another).
# --dist loadgroup runs a module marked xdist_group whole on one worker (the browser tests) and
# spreads the rest test by test, as --dist load does. pytest's "no tests collected" (exit 5) is
# not a failure. ROOST_TEST_WORKERS=0 runs it in one process.
set -uo pipefail
cd "$(dirname "$0")/.."
cpus=$(nproc)
workers=${ROOST_TEST_WORKERS:-$((cpus > 4 ? (cpus > 8 ? 8 : cpus) : 4))}
.venv/bin/python -m pytest -n "$workers" --dist loadgroup --durations=20 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "run-tests: no tests were collected"
    exit 0
fi
exit "$rc"
