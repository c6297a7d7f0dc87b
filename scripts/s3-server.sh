#!/usr/bin/env bash
# Starts SeaweedFS's S3 gateway on 127.0.0.1 with static test credentials.
# Usage: scripts/s3-server.sh start DIR   (prints `export …` lines for the tests; run under eval)
#        scripts/s3-server.sh stop DIR
set -euo pipefail
cmd=${1:?start or stop}
dir=${2:?state folder}
venv=${TESSERA_VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv}

case "$cmd" in
start)
  mkdir -p "$dir"
  # Ports: a base picked from the pid, so parallel runs on one machine do not collide.
  # weed also opens port+10000 for gRPC, so every base stays below 20000.
  base=$(( 12000 + ($$ % 700) * 10 ))
  s3=$base; master=$((base + 1)); volume=$((base + 2)); filer=$((base + 3)); admin=$((base + 4))
  key=tessera-test-access
  secret=tessera-test-secret-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')
  cat > "$dir/s3.json" <<JSON
{"identities":[{"name":"tessera","credentials":[{"accessKey":"$key","secretKey":"$secret"}],"actions":["Admin","Read","List","Tagging","Write"]}]}
JSON
  GOMEMLIMIT=256MiB nohup "$venv/bin/weed" mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -s3.port=$s3 -master.port=$master -volume.port=$volume -filer.port=$filer -admin.port=$admin \
    -s3.config="$dir/s3.json" -admin.ui=false -webdav=false -master.telemetry=false -s3.port.iceberg=0 -s3.port.lance=0 \
    > "$dir/weed.log" 2>&1 &
  echo $! > "$dir/weed.pid"
  # Ready when a signed request succeeds (the port opens before credentials are loaded).
  for _ in $(seq 1 120); do
    if AWS_ACCESS_KEY_ID=$key AWS_SECRET_ACCESS_KEY=$secret "$venv/bin/python" - "$s3" <<'PY' 2>/dev/null
import sys
from pyarrow import fs
s3 = fs.S3FileSystem(endpoint_override=f"127.0.0.1:{sys.argv[1]}", scheme="http", region="us-east-1", allow_bucket_creation=True)
s3.create_dir("tessera-ready")
s3.get_file_info(fs.FileSelector("tessera-ready", allow_not_found=True))
PY
    then
      echo "export AWS_ACCESS_KEY_ID=$key"
      echo "export AWS_SECRET_ACCESS_KEY=$secret"
      echo "export AWS_REGION=us-east-1"
      echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$s3"
      echo "export AWS_ALLOW_HTTP=true"
      echo "export TESSERA_TEST_S3=1"
      exit 0
    fi
    sleep 0.5
  done
  echo "SeaweedFS did not become ready; its log:" >&2
  tail -50 "$dir/weed.log" >&2
  exit 1
  ;;
stop)
  if [ -f "$dir/weed.pid" ]; then
    pid=$(cat "$dir/weed.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/weed.pid"
  fi
  ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
