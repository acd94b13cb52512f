#!/usr/bin/env bash
# Paired redirect benchmark of kurz with click analytics on and off (--no-click-analytics):
# kurz pinned to CPU 0 with one worker, the loadtest binary to CPU 1, closed loop, 64
# connections, 8 s, three rounds alternating on/off. Prints req/s, requests per server
# CPU-second (utime+stime from /proc over the run), p99 and dropped click events per run.
#
# usage: loadtest/compare/analytics-ab.sh LINKS.tsv [LOADTEST ARGS...]
#   LINKS.tsv e.g. from data/gen-links.py 1000000; extra arguments go to the loadtest, e.g.
#   `--zipf 1.0` for a skewed, realistic mix instead of every code equally likely.
# needs kurz and loadtest in $CARGO_TARGET_DIR/release (default target/release; build with
# cargo build --release --workspace).
set -u
LINKS=${1:?usage: analytics-ab.sh LINKS.tsv [LOADTEST ARGS...]}
shift
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
KURZ=$TARGET/release/kurz
LT=$TARGET/release/loadtest
cut -f1 "$LINKS" > /tmp/codes-1m.txt
rm -rf /tmp/ab-data && $KURZ import --data-dir /tmp/ab-data "$LINKS" > /dev/null 2>&1
for round in 1 2 3; do
  for mode in on off; do
    extra=""; [ $mode = off ] && extra="--no-click-analytics"
    rm -rf /tmp/ab-data/analytics /tmp/ab-data/clicks.tsv
    taskset -c 0 $KURZ serve --data-dir /tmp/ab-data --listen 127.0.0.1:18080 --admin-listen 127.0.0.1:18081 --workers 1 $extra > /tmp/ab-serve.log 2>&1 &
    pid=$!
    for i in $(seq 100); do curl -sf localhost:18081/readyz >/dev/null && break; sleep 0.1; done
    read -r u0 s0 < <(awk '{print $14, $15}' /proc/$pid/stat)
    out=$(taskset -c 1 $LT --url http://127.0.0.1:18080 --codes /tmp/codes-1m.txt --connections 64 --duration 8s --json --quiet "$@" 2>/dev/null)
    read -r u1 s1 < <(awk '{print $14, $15}' /proc/$pid/stat)
    dropped=$(curl -s localhost:18081/metrics | awk '/^kurz_click_events_dropped_total/ {print $2}')
    kill -TERM $pid; wait $pid 2>/dev/null
    python3 - "$mode" "$round" "$out" $u0 $s0 $u1 $s1 "${dropped:-0}" <<'PY'
import json,sys,os
mode,rnd,out=sys.argv[1],sys.argv[2],json.loads(sys.argv[3])
u0,s0,u1,s1=map(int,sys.argv[4:8]); hz=os.sysconf('SC_CLK_TCK')
cpu=((u1-u0)+(s1-s0))/hz
print(f"{mode} round {rnd}: rps {out['rps']:.0f} req/cpu-s {out['requests']/cpu:.0f} p99 {out['latency_us']['p99']}us status {out['status']} errors {out['errors']['total']} click events dropped {sys.argv[8]}")
PY
  done
done
