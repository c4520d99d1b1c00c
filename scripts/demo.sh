#!/usr/bin/env bash
# make demo: Fashion-MNIST shards (converted once), a local Ray head, the InterCLR demo job submitted
# with `ray job submit`, and that Ray head (only it) stopped again whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RAY=${RAY:-.venv/bin/ray}
SRC=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
DATA=${DEMO_DATA:-data/fashion-mnist-demo}
RUNS=${DEMO_RUNS:-runs}
ARGS=("$@")
case "$PY" in /*) ;; *) PY="$PWD/$PY" ;; esac  # the job runs in Ray's copy of the working dir
case "$RAY" in /*) ;; *) RAY="$PWD/$RAY" ;; esac
case "$RUNS" in /*) ;; *) RUNS="$PWD/$RUNS" ;; esac
case "$DATA" in /*) ;; *) DATA="$PWD/$DATA" ;; esac
# Every port of the head free at start (another Ray on this machine keeps Ray's defaults, e.g. the
# dashboard agent's 52365): GCS, dashboard, agent listen / gRPC, runtime-env agent, metrics, client.
read -r PORT DASHBOARD AGENT AGENT_GRPC RUNTIME_ENV METRICS CLIENT < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(7)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
PORT=${DEMO_RAY_PORT:-$PORT}
DASHBOARD=${DEMO_DASHBOARD_PORT:-$DASHBOARD}

if [ ! -f "$SRC/train-images-idx3-ubyte.gz" ]; then
  echo "error: Fashion-MNIST not found in $SRC (apt-get install dataset-fashion-mnist)" >&2
  exit 2
fi
# 20,000 training images (the demo's budget) and the full 10,000-image test set as val
[ -f "$DATA/train.json" ] || "$PY" -m pipeline.convert fashion-mnist "$SRC" "$DATA" --split train --limit 20000 --shard-size 4M
[ -f "$DATA/val.json" ] || "$PY" -m pipeline.convert fashion-mnist "$SRC" "$DATA" --split val --shard-size 4M

# every make demo is a fresh run (the same name would resume the last one's checkpoint)
rm -rf "$RUNS/demo"
# Ray 2.60 token authentication stays on: both `ray start` and `ray job submit` need the mode set.
export RAY_AUTH_MODE=token
# The head gets its own temp dir (short: Ray's socket paths must fit 107 bytes). On exit only the
# processes of that head are stopped (`ray stop` would stop every Ray on the machine): the ones `ray start`
# left running, found by a variable in their environment, and every process below them (raylet workers,
# the dashboard's modules and agents). The agents retitle themselves "ray::DashboardAgent", which clears
# their environment and command line; stopping what named the temp dir left them running, one spinning a
# core, once the raylet was gone.
RAY_TMP=$(mktemp -d /tmp/vbdemo-XXXXXX)
MARK="VIEWBANK_DEMO_RAY=$RAY_TMP"
own_ray() {
  local found level
  if [ -r /proc/self/environ ]; then found=$(grep -lsxzF -- "$MARK" /proc/[0-9]*/environ | cut -d/ -f3 || true)
  else found=$(pgrep -f -- "$RAY_TMP" || true); fi  # no /proc: the command lines that name the temp dir
  level=$found
  while [ -n "$level" ]; do
    level=$(pgrep -P "$(echo $level | tr ' ' ',')" || true)
    found="$found $level"
  done
  echo $found | tr " " "\n" | sort -un
}
running() {  # those of the given processes that have not exited (a zombie has)
  [ $# -gt 0 ] || return 0
  ps -o pid=,stat= -p "$(echo "$@" | tr ' ' ,)" 2>/dev/null | awk '$2 !~ /^Z/ {print $1}' || true
}
stop_own_ray() {
  local pids signal wait
  pids=$(own_ray)  # the whole tree, before any of it exits and orphans its children
  for signal in TERM KILL; do
    pids=$(running $pids)
    [ -n "$pids" ] || break
    kill -"$signal" $pids 2>/dev/null || true
    for wait in $(seq 1 20); do  # up to 2 s to exit (the GCS and the autoscaler monitor often ignore TERM)
      [ -n "$(running $pids)" ] || break
      sleep 0.1
    done
  done
  rm -rf "$RAY_TMP" "${LOG:-}"
}
trap stop_own_ray EXIT
env "$MARK" "$RAY" start --head --port="$PORT" --dashboard-port="$DASHBOARD" --dashboard-agent-listen-port="$AGENT" \
  --dashboard-agent-grpc-port="$AGENT_GRPC" --runtime-env-agent-port="$RUNTIME_ENV" \
  --metrics-export-port="$METRICS" --ray-client-server-port="$CLIENT" --temp-dir="$RAY_TMP" \
  ${DEMO_RAY_START_ARGS:-} --disable-usage-stats >/dev/null
echo "demo: Ray head in $RAY_TMP, port $PORT, dashboard http://127.0.0.1:$DASHBOARD (stopped when the demo ends)"
# The dashboard's job agent comes up a few seconds after `ray start`; retry only that refusal.
LOG=$(mktemp)
for attempt in $(seq 1 30); do
  if "$RAY" job submit --address "http://127.0.0.1:$DASHBOARD" --working-dir . -- \
      "$PY" jobs/interclr_imagenet.py --preset demo --shards "$DATA" --storage "$RUNS" "${ARGS[@]}" 2>&1 | tee "$LOG"; then
    [ "${PIPESTATUS[0]}" = 0 ] && exit 0
  fi
  grep -q "No available agent" "$LOG" || exit 1
  sleep 2
done
echo "error: the Ray job agent did not come up" >&2
exit 1
