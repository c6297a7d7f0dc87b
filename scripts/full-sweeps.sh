#!/usr/bin/env bash
# The exhaustive crash sweep: the reliability test kills a run after every one of its writes
# (every write of one seed, every third of two more) instead of the sample `scripts/test.sh`
# tries. Slow (an hour or more): run it before a release or after touching the publish.
set -euo pipefail
cd "$(dirname "$0")/.."
export TESSERA_TEST_FULL_SWEEP=1
exec scripts/test.sh --test it -- reliability::a_run_killed_at_any_write "$@"
