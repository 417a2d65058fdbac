#!/usr/bin/env bash
# The whole queued pipeline on this machine, no cloud account: a private password-protected
# redis-server, the scheduler and one stylize worker in the background, the bundled example
# manifest submitted with a live progress bar, outputs and index.html left in ./capvst-demo
# (or the folder given as $1). Everything it started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
command -v redis-server >/dev/null || { echo "redis-server is needed (apt-get install redis-server)" >&2; exit 1; }

demo=$(mkdir -p "${1:-capvst-demo}" && cd "${1:-capvst-demo}" && pwd)
mkdir -p "$demo/logs"
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
password=$(python -c 'import secrets; print(secrets.token_hex(16))')
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

redis-server --port "$port" --bind 127.0.0.1 --requirepass "$password" --save "" \
  --appendonly no --logfile "$demo/logs/redis.log" &
pids+=($!)
export CAPVST_BROKER_URL="redis://:$password@127.0.0.1:$port/0"
export CAPVST_LOCAL_ROOT="$demo"   # workers may read and write only inside this folder
export CAPVST_DEVICE="${CAPVST_DEVICE:-auto}"
# With CAPVST_CHECKPOINT_PHOTOREALISTIC / _ARTISTIC exported, the worker serves them. Without,
# this demo runs the seeded untrained network on purpose (a real worker refuses to start
# without checkpoints); the summary, the status and index.html then say "untrained".
export CAPVST_ALLOW_UNTRAINED="${CAPVST_ALLOW_UNTRAINED:-1}"

capvst examples "$demo/inputs" >/dev/null
capvst scheduler --logfile "$demo/logs/scheduler.log" >/dev/null 2>&1 &
pids+=($!)
capvst worker --logfile "$demo/logs/worker.log" >/dev/null 2>&1 &
pids+=($!)

echo "submitting $demo/inputs/manifest.jsonl (logs in $demo/logs)" >&2
rc=0
job=$(CAPVST_PROGRESS=bar capvst-submit "$demo/inputs/manifest.jsonl" --output "$demo/outputs" --wait) || rc=$?
echo >&2
echo "outputs: $demo/outputs" >&2
echo "report:  $demo/outputs/_capvst/$job/index.html" >&2
exit "$rc"
