#!/usr/bin/env bash
# Paired redirect benchmark of two kurz variants, A and B: kurz pinned to CPU 0 with one worker
# (all its threads), the loadtest binary to CPU 1, 64 connections, 8 s a run, rounds
# alternating A and B. Prints req/s, requests per server CPU-second (utime+stime from /proc
# over the run), p99 and dropped click events per run, and the user-space CPU of the redirect
# threads per request (`kurz-lean-*`, from /proc/PID/task): the part of a request kurz's own
# code decides, which the kernel's share, the noisiest on a shared VM, does not blur. Then the
# median of each side.
#
# usage: loadtest/compare/ab.sh LINKS.tsv [LOADTEST ARGS...]
#   LINKS.tsv e.g. from data/gen-links.py 1000000; extra arguments go to the loadtest, e.g.
#   `--zipf 1.0` for a skewed, realistic mix, `--rate 60000` for an open-loop rate.
# environment:
#   A, B     the two variants: a kurz binary followed by extra `serve` arguments; default
#            A="$TARGET/release/kurz" (click analytics on) and B="$A --no-click-analytics"
#   ROUNDS   rounds of A then B (default 3)
# needs kurz and loadtest in $CARGO_TARGET_DIR/release (default target/release; build with
# cargo build --release --workspace).
set -u
LINKS=${1:?usage: ab.sh LINKS.tsv [LOADTEST ARGS...]}
shift
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
A=${A:-$TARGET/release/kurz}
B=${B:-$A --no-click-analytics}
ROUNDS=${ROUNDS:-3}
LT=$TARGET/release/loadtest
WORK=$(mktemp -d /tmp/kurz-ab.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
cut -f1 "$LINKS" > "$WORK/codes.txt"
# Each side imports its own data dir, with its own binary: the two may write different formats.
for side in A B; do
  read -r -a variant <<<"${!side}"
  "${variant[0]}" import --data-dir "$WORK/data-$side" "$LINKS" > /dev/null 2>&1
done
# utime ticks of the redirect threads (`kurz-lean-*`) of process $1 so far.
lean_user_ticks() {
  local total=0 task
  for task in /proc/"$1"/task/*; do
    [[ $(cat "$task/comm" 2>/dev/null) == kurz-lean-* ]] || continue
    total=$((total + $(awk '{print $14}' "$task/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}
for round in $(seq "$ROUNDS"); do
  for side in A B; do
    read -r -a variant <<<"${!side}"
    rm -rf "$WORK/data-$side/analytics" "$WORK/data-$side"/clicks*.tsv
    taskset -c 0 "${variant[0]}" serve --data-dir "$WORK/data-$side" --listen 127.0.0.1:18080 \
      --admin-listen 127.0.0.1:18081 --workers 1 "${variant[@]:1}" > "$WORK/serve.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do curl -sf localhost:18081/readyz >/dev/null && break; sleep 0.1; done
    read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    lean0=$(lean_user_ticks "$pid")
    out=$(taskset -c 1 "$LT" --url http://127.0.0.1:18080 --codes "$WORK/codes.txt" \
      --connections 64 --duration 8s --json --quiet "$@" 2>/dev/null)
    read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    lean1=$(lean_user_ticks "$pid")
    dropped=$(curl -s localhost:18081/metrics | awk '/^kurz_click_events_dropped_total/ {print $2}')
    kill -TERM "$pid"; wait "$pid" 2>/dev/null
    python3 - "$side" "$round" "$out" "$u0" "$s0" "$u1" "$s1" "${dropped:-0}" \
      "$((lean1 - lean0))" <<'PY' | tee -a "$WORK/results"
import json, os, sys
side, rnd, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
u0, s0, u1, s1 = map(int, sys.argv[4:8])
hz = os.sysconf("SC_CLK_TCK")
cpu = ((u1 - u0) + (s1 - s0)) / hz
lean_user_us = int(sys.argv[9]) / hz * 1e6 / out['requests']
print(f"{side} round {rnd}: rps {out['rps']:.0f} req/cpu-s {out['requests'] / cpu:.0f} "
      f"redirect-thread user us/req {lean_user_us:.3f} "
      f"p99 {out['latency_us']['p99']}us status {out['status']} errors {out['errors']['total']} "
      f"click events dropped {sys.argv[8]}")
PY
  done
done
python3 - "$WORK/results" <<'PY'
import statistics, sys
sides, lean = {}, {}
for line in open(sys.argv[1]):
    side, rest = line.split(" round ", 1)
    sides.setdefault(side, []).append(float(rest.split("req/cpu-s ")[1].split()[0]))
    lean.setdefault(side, []).append(float(rest.split("user us/req ")[1].split()[0]))
for side, values in sorted(sides.items()):
    print(f"{side}: median {statistics.median(values):.0f} req/cpu-s "
          f"(range {min(values):.0f}-{max(values):.0f}, {len(values)} runs); "
          f"redirect-thread user {statistics.median(lean[side]):.3f} us/req "
          f"(range {min(lean[side]):.3f}-{max(lean[side]):.3f})")
if len(sides) == 2:
    a, b = (statistics.median(sides[s]) for s in ("A", "B"))
    print(f"A/B: {a / b:.3f}")
PY
