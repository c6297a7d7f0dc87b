#!/usr/bin/env bash
# Runs every test on a fresh machine: installs the Python tools the tests read outputs with,
# starts a real S3 server (SeaweedFS) on 127.0.0.1, runs `cargo test`, stops the server.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh ingest`).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export TESSERA_VENV=${TESSERA_VENV:-$root/.venv}

if [ ! -x "$TESSERA_VENV/bin/python" ]; then
  python3 -m venv "$TESSERA_VENV"
fi
"$TESSERA_VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt

state=$(mktemp -d "${TMPDIR:-/tmp}/tessera-s3.XXXXXX")
cleanup() { scripts/s3-server.sh stop "$state"; rm -rf "$state"; }
trap cleanup EXIT
eval "$(scripts/s3-server.sh start "$state")"

export TESSERA_TEST_PYTHON="$TESSERA_VENV/bin/python"
# With this set, a test that needs S3 or Python fails instead of skipping.
export TESSERA_TEST_REQUIRE_ALL=1

# The HTML report test renders the page in headless Chromium: install Debian's when missing.
if [ -n "${TESSERA_TEST_REQUIRE_ALL:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
    || { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
fi
cargo test --locked "$@"
