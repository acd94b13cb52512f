#!/usr/bin/env bash
# Side-by-side comparison of redirect servers on this machine: nginx (map), HAProxy (map) and,
# when $CARGO_TARGET_DIR/release/kurz (default target/) can import and serve, kurz, all with the
# same links, each pinned to CPU 0 while the load generator (this repo's `loadtest` binary) runs
# on CPU 1; then the floor, a C epoll loop answering fixed bytes (floor.c), which shows the
# kernel's share that every server pays.
#
# For each server it measures: time from start to the first successful redirect; closed-loop
# peak rate and its p99 (64 connections); open-loop latency at 50% and 90% of that peak and at
# one fixed rate, the same for every server (FIXED_RATE);
# requests per server CPU-second (utime+stime from /proc/PID/stat over each run); resident
# memory (VmRSS of the serving process) after the load; nginx's reload time; for kurz, the
# share of click analytics events it shed at the peak; and wrk's closed-loop numbers on the same
# server for reference. It prints one table at the end.
#
# usage: loadtest/compare/run.sh [LINKS]        (default 1000000)
# environment: DURATION (per run, default 10s), CONNECTIONS (default 64), KEEP_WORK_DIR=1 to
# keep the generated configs and logs, SKIP_WRK=1 to skip the wrk reference runs, QUIET_WAIT_S
# (default 60) how long to wait for other processes to leave the CPUs before each server,
# FIXED_RATE (default 50000) the open-loop rate every server is also measured at,
# STARTUP_ONLY=1 to measure only the time to the first redirect and the resident memory after
# a 2 s warm-up load (no rate runs, no reload: for 10M links, where nginx needs minutes),
# PAIRED_ROUNDS (default 5) and ROUND_DURATION (default 5s) for the paired rounds.
#
# Paired rounds: after the per-server measurements every server is still up, and each in turn
# gets a closed-loop run of ROUND_DURATION, PAIRED_ROUNDS times (the order rotating per round).
# The rounds also run a second kurz with click analytics off (`--no-click-analytics`; exact
# click counts stay on), "kurz-bare": the work closest to nginx's and HAProxy's, which log
# nothing here.
# On a shared VM one server's figure drifts by 10-25% between its own runs minutes apart; taken
# round by round, the ratios between servers see the same machine.
#
# Everything it starts listens on 127.0.0.1 only and is stopped by PID when the script exits.

set -euo pipefail

LINKS=${1:-1000000}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
FIXED_RATE=${FIXED_RATE:-50000}
PAIRED_ROUNDS=${PAIRED_ROUNDS:-5}
ROUND_DURATION=${ROUND_DURATION:-5s}
SERVER_CPU=0
CLIENT_CPU=1
NGINX_PORT=18081
HAPROXY_PORT=18082
KURZ_PORT=18083
KURZ_ADMIN_PORT=18084
FLOOR_PORT=18085
KURZ_BARE_PORT=18086
KURZ_BARE_ADMIN_PORT=18087
READY_TIMEOUT_S=600
QUIET_WAIT_S=${QUIET_WAIT_S:-60}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
LOADTEST=$TARGET_DIR/release/loadtest
KURZ=$TARGET_DIR/release/kurz
CLK_TCK=$(getconf CLK_TCK)

die() { echo "compare: $*" >&2; exit 2; }
note() { echo "compare: $*" >&2; }

[[ $LINKS =~ ^[0-9]+$ && $LINKS -gt 0 ]] || die "LINKS must be a positive whole number, got '$LINKS'"
[[ $FIXED_RATE =~ ^[0-9]+$ && $FIXED_RATE -gt 0 ]] || die "FIXED_RATE must be a positive whole number, got '$FIXED_RATE'"
[[ $PAIRED_ROUNDS =~ ^[0-9]+$ ]] || die "PAIRED_ROUNDS must be a whole number, got '$PAIRED_ROUNDS'"
[[ $(nproc) -ge 2 ]] || die "needs 2 CPUs (server on CPU $SERVER_CPU, generator on CPU $CLIENT_CPU)"

WORK=$(mktemp -d /tmp/kurz-compare.XXXXXX)
STARTED_PIDS=()
cleanup() {
    local pid
    for pid in "${STARTED_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${STARTED_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ ${KEEP_WORK_DIR:-0} == 1 ]]; then
        note "work dir kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- tools -------------------------------------------------------------------------------------

install_missing() {
    local missing=()
    command -v nginx >/dev/null || missing+=(nginx)
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v wrk >/dev/null || missing+=(wrk)
    if ((${#missing[@]})); then
        [[ $(id -u) == 0 ]] || die "install ${missing[*]} (apt-get needs root)"
        note "installing ${missing[*]} with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}
install_missing
PATH=$PATH:/usr/sbin:/sbin

note "building the load generator"
(cd "$ROOT" && cargo build -p loadtest --release --quiet)
[[ -x $LOADTEST ]] || die "no load generator at $LOADTEST after the build"

# --- links -------------------------------------------------------------------------------------

LINKS_TSV=$WORK/links.tsv
note "generating $LINKS links"
if [[ -f $ROOT/data/gen-links.py ]]; then
    python3 "$ROOT/data/gen-links.py" "$LINKS" "$LINKS_TSV"
else
    # Same format as data/gen-links.py: 7-char base62 codes unique ignoring case, 40-300-byte
    # https URLs.
    python3 - "$LINKS" "$LINKS_TSV" <<'EOF'
import math, random, string, sys
count, out = int(sys.argv[1]), sys.argv[2]
rng = random.Random(1)
alphabet = string.digits + string.ascii_uppercase + string.ascii_lowercase
seen = set()
with open(out, "w") as f:
    while len(seen) < count:
        code = "".join(rng.choice(alphabet) for _ in range(7))
        if code.lower() in seen:
            continue
        seen.add(code.lower())
        length = min(300, max(40, int(rng.lognormvariate(math.log(75), 0.35))))
        url = "https://www.example-%d.com/" % rng.randint(0, 99999)
        while len(url) < length:
            url += rng.choice(["docs/", "blog/", "item/", "page/", "2025/"])
        f.write(code + "\t" + url[:length] + "\n")
EOF
fi
CODES=$WORK/codes.txt
cut -f1 "$LINKS_TSV" >"$CODES"
RAW_BYTES=$(awk -F'\t' '{ bytes += length($1) + length($2) } END { print bytes }' "$LINKS_TSV")
PROBE_CODE=$(head -1 "$CODES")

# --- measuring helpers -------------------------------------------------------------------------

now_s() { date +%s.%N; }

# Evaluates an arithmetic expression with awk, printed with DECIMALS decimals.
calc() { awk "BEGIN { printf \"%.${2}f\", ($1) }"; }

# utime+stime in clock ticks of a process and its direct children (nginx's workers).
cpu_ticks() {
    local total=0 pid fields
    for pid in "$1" $(ps --ppid "$1" -o pid= 2>/dev/null); do
        [[ -r /proc/$pid/stat ]] || continue
        # Fields after the ")" that closes the command name: utime is the 12th, stime the 13th.
        fields=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null) || continue
        read -r -a parts <<<"$fields"
        total=$((total + parts[11] + parts[12]))
    done
    echo "$total"
}

# Busy clock ticks (everything but idle and iowait) of the server and generator CPUs together.
busy_ticks() {
    awk -v a="cpu$SERVER_CPU" -v b="cpu$CLIENT_CPU" \
        '$1 == a || $1 == b { busy += $2 + $3 + $4 + $7 + $8 + $9 } END { print busy }' /proc/stat
}

# Leaves in CHILDREN_CPU_S the user+system seconds of every child this shell has waited for
# (the `times` builtin, which must run in this shell, not in a $(...) subshell).
children_cpu_s() {
    times >"$WORK/times.txt"
    CHILDREN_CPU_S=$(awk 'NR == 2 {
        split($1, u, /[ms]/); split($2, s, /[ms]/); printf "%.3f", u[1] * 60 + u[2] + s[1] * 60 + s[2]
    }' "$WORK/times.txt")
}

rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

# Status code of GET /CODE, or 000 if nothing answers.
probe_status() {
    curl -s -o /dev/null --max-time 1 -w '%{http_code}' "http://127.0.0.1:$1/$2" 2>/dev/null || true
}

# Seconds from START_S until GET /PROBE_CODE answers a redirect.
wait_for_redirect() {
    local port=$1 start_s=$2 pid=$3 status
    while true; do
        status=$(probe_status "$port" "$PROBE_CODE")
        if [[ $status =~ ^30[1278]$ ]]; then
            calc "$(now_s) - $start_s" 2
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || return 1
        if (($(calc "$(now_s) - $start_s > $READY_TIMEOUT_S" 0))); then
            return 1
        fi
        sleep 0.02
    done
}

json_field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }

# Runs the generator against PORT with extra flags; leaves JSON in OUT, in LOAD_REQUESTS and
# LOAD_CPU_S the requests it completed (or failed) and the server's CPU time over the run, and in
# LOAD_OTHER_PCT how much of the two CPUs anything else used meanwhile (a sign of a noisy run).
run_load() {
    local port=$1 pid=$2 out=$3
    shift 3
    local before after busy_before busy_after client_before client_after start_s wall_s
    before=$(cpu_ticks "$pid")
    busy_before=$(busy_ticks)
    children_cpu_s
    client_before=$CHILDREN_CPU_S
    start_s=$(now_s)
    taskset -c "$CLIENT_CPU" "$LOADTEST" --url "http://127.0.0.1:$port" --codes "$CODES" \
        --connections "$CONNECTIONS" --quiet --json "$@" >"$out" || {
        local status=$?
        [[ $status == 1 ]] || die "loadtest failed against port $port (exit $status)"
    }
    after=$(cpu_ticks "$pid")
    busy_after=$(busy_ticks)
    children_cpu_s
    client_after=$CHILDREN_CPU_S
    wall_s=$(calc "$(now_s) - $start_s" 3)
    LOAD_OTHER_PCT=$(calc "100 * (($busy_after - $busy_before - $after + $before) / $CLK_TCK \
        - ($client_after - $client_before)) / (2 * $wall_s)" 0)
    LOAD_REQUESTS=$(json_field "$out" "d['requests'] + d['errors']['total']")
    LOAD_CPU_S=$(calc "($after - $before) / $CLK_TCK" 3)
}

per_cpu_s() { calc "$1 / ($2 + 1e-9)" 0; }

WRK_LUA=$WORK/random-code.lua
cat >"$WRK_LUA" <<EOF
-- Picks a random code per request, the way the loadtest runs do.
local codes = {}
for line in io.lines("$CODES") do codes[#codes + 1] = "/" .. line end
math.randomseed(1)
request = function() return wrk.format("GET", codes[math.random(#codes)]) end
EOF

RESULTS=$WORK/results.tsv
printf 'server\tready_s\tpeak_rps\tpeak_p99_us\tpeak_req_per_cpu_s\tpeak_server_cpu\twrk_rps\twrk_p99\trate50\tp50_50_us\tp99_50_us\tp999_50_us\treq_per_cpu_s_50\trate90\tp50_90_us\tp99_90_us\tp999_90_us\tfixed_rate\tp50_fixed_us\tp99_fixed_us\tp999_fixed_us\trss_mb\trss_per_raw\treload_s\tshed\terrors\tother_cpu\n' >"$RESULTS"

# Waits (at most QUIET_WAIT_S) until the two CPUs have been nearly idle for a second, so a build
# running beside the comparison does not land in the middle of a measurement.
wait_for_quiet() {
    local deadline_s busy_before busy_after
    deadline_s=$(calc "$(now_s) + $QUIET_WAIT_S" 3)
    while (($(calc "$(now_s) < $deadline_s" 0))); do
        busy_before=$(busy_ticks)
        sleep 1
        busy_after=$(busy_ticks)
        if ((busy_after - busy_before < CLK_TCK / 10)); then
            return 0
        fi
    done
    note "the CPUs did not go quiet within ${QUIET_WAIT_S}s; measuring anyway (see the other CPU column)"
}

# A counter from a Prometheus endpoint (0 when absent): URL NAME
metric() {
    curl -s "$1" | awk -v name="$2" '$1 == name { printf "%.0f", $2; found = 1 } END { if (!found) print 0 }'
}

# Measures one running server: NAME PORT PID READY_S SERVING_PID RELOAD_S [METRICS_URL]
# With METRICS_URL (kurz's admin /metrics), also the share of click analytics events the server
# shed during the closed-loop peak (exact click counts are never shed).
measure() {
    local name=$1 port=$2 pid=$3 ready_s=$4 metrics_url=${7:-}
    local out=$WORK/$name
    wait_for_quiet
    note "$name: warm-up"
    run_load "$port" "$pid" "$out-warm.json" --duration 2s
    if [[ ${STARTUP_ONLY:-0} == 1 ]]; then
        local rss
        rss=$(rss_kb "$5")
        local row=("$name" "$ready_s")
        while ((${#row[@]} < 21)); do row+=("-"); done
        row+=("$((rss / 1024))" "$(calc "$rss * 1024 / $RAW_BYTES" 2)x" "$6" "-" "-" "$LOAD_OTHER_PCT%")
        (IFS=$'\t'; echo "${row[*]}") >>"$RESULTS"
        return 0
    fi

    note "$name: closed loop, $CONNECTIONS connections, $DURATION"
    local shed=- dropped_before clicks_before
    if [[ -n $metrics_url ]]; then
        dropped_before=$(metric "$metrics_url" kurz_click_events_dropped_total)
        clicks_before=$(metric "$metrics_url" kurz_clicks_total)
    fi
    run_load "$port" "$pid" "$out-peak.json" --duration "$DURATION"
    if [[ -n $metrics_url ]]; then
        local dropped clicks
        dropped=$(($(metric "$metrics_url" kurz_click_events_dropped_total) - dropped_before))
        clicks=$(($(metric "$metrics_url" kurz_clicks_total) - clicks_before))
        shed="$(calc "100 * $dropped / ($clicks > 0 ? $clicks : 1)" 0)%"
    fi
    local peak_rps peak_p99 seconds
    peak_rps=$(json_field "$out-peak.json" "round(d['rps'])")
    peak_p99=$(json_field "$out-peak.json" "d['latency_us']['p99']")
    seconds=$(json_field "$out-peak.json" "d['duration_s']")
    local peak_per_cpu peak_cpu
    peak_per_cpu=$(per_cpu_s "$LOAD_REQUESTS" "$LOAD_CPU_S")
    peak_cpu=$(calc "100 * $LOAD_CPU_S / $seconds" 0)%

    local wrk_rps=- wrk_p99=-
    if [[ ${SKIP_WRK:-0} != 1 ]]; then
        note "$name: wrk reference, closed loop, $CONNECTIONS connections, $DURATION"
        taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$WRK_LUA" \
            "http://127.0.0.1:$port" >"$out-wrk.txt" 2>&1 || true
        wrk_rps=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$out-wrk.txt")
        wrk_p99=$(awk '$1 == "99%" { print $2 }' "$out-wrk.txt")
    fi

    local errors
    errors=$(json_field "$out-peak.json" "d['errors']['total']")
    local other_max=$LOAD_OTHER_PCT
    local row=("$name" "$ready_s" "$peak_rps" "$peak_p99" "$peak_per_cpu" "$peak_cpu" "${wrk_rps:--}" "${wrk_p99:--}")
    local share rate label
    for share in 50 90 fixed; do
        if [[ $share == fixed ]]; then
            rate=$FIXED_RATE
            label="$rate req/s (the same for every server)"
        else
            rate=$((peak_rps * share / 100))
            label="$rate req/s ($share% of peak)"
        fi
        note "$name: open loop at $label, $DURATION"
        run_load "$port" "$pid" "$out-$share.json" --rate "$rate" --duration "$DURATION"
        other_max=$((LOAD_OTHER_PCT > other_max ? LOAD_OTHER_PCT : other_max))
        row+=("$rate ($(json_field "$out-$share.json" "round(d['rps'])"))" \
            "$(json_field "$out-$share.json" "d['latency_us']['p50']")" \
            "$(json_field "$out-$share.json" "d['latency_us']['p99']")" \
            "$(json_field "$out-$share.json" "d['latency_us']['p999']")")
        if [[ $share == 50 ]]; then
            row+=("$(per_cpu_s "$LOAD_REQUESTS" "$LOAD_CPU_S")")
        fi
        errors=$((errors + $(json_field "$out-$share.json" "d['errors']['total']")))
    done
    local serving_pid=$5 rss
    rss=$(rss_kb "$serving_pid")
    row+=("$((rss / 1024))" "$(calc "$rss * 1024 / $RAW_BYTES" 2)x" "$6" "$shed" "$errors" "$other_max%")
    (IFS=$'\t'; echo "${row[*]}") >>"$RESULTS"
}

# Starts a server on the server CPU, output to LOG; its PID is left in STARTED_PID.
start_pinned() {
    local log=$1
    shift
    taskset -c "$SERVER_CPU" "$@" >"$log" 2>&1 &
    STARTED_PID=$!
    STARTED_PIDS+=("$STARTED_PID")
}

stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# Keeps a measured server running for the paired rounds (or stops it when there are none):
# NAME PORT PID
KEPT_NAMES=()
KEPT_PORTS=()
KEPT_PIDS=()
keep_for_rounds() {
    if [[ ${STARTUP_ONLY:-0} == 1 ]] || ((PAIRED_ROUNDS == 0)); then
        stop_pid "$3"
        return 0
    fi
    KEPT_NAMES+=("$1")
    KEPT_PORTS+=("$2")
    KEPT_PIDS+=("$3")
}

ROUNDS=$WORK/rounds.tsv
# The paired rounds (see the top of this file); one line per run into ROUNDS.
paired_rounds() {
    local servers=${#KEPT_NAMES[@]}
    ((servers > 1)) || return 0
    wait_for_quiet
    local round turn index
    for round in $(seq "$PAIRED_ROUNDS"); do
        for turn in $(seq 0 $((servers - 1))); do
            index=$(((round + turn) % servers))
            note "paired round $round of $PAIRED_ROUNDS: ${KEPT_NAMES[$index]}, $ROUND_DURATION"
            run_load "${KEPT_PORTS[$index]}" "${KEPT_PIDS[$index]}" "$WORK/round.json" \
                --duration "$ROUND_DURATION"
            printf '%s\t%s\t%s\t%s\n' "$round" "${KEPT_NAMES[$index]}" \
                "$(per_cpu_s "$LOAD_REQUESTS" "$LOAD_CPU_S")" "$LOAD_OTHER_PCT" >>"$ROUNDS"
        done
    done
}

# --- nginx -------------------------------------------------------------------------------------

run_nginx() {
    local dir=$WORK/nginx
    mkdir -p "$dir/temp"
    awk -F'\t' '{ printf "\"/%s\" \"%s\";\n", $1, $2 }' "$LINKS_TSV" >"$dir/map.conf"
    # The hash needs more slots than keys (4,194,304 for 1M links in ANCHORS.md).
    local hash_max=1
    while ((hash_max < LINKS * 4)); do hash_max=$((hash_max * 2)); done
    cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path $dir/temp/body;
    proxy_temp_path $dir/temp/proxy;
    fastcgi_temp_path $dir/temp/fastcgi;
    uwsgi_temp_path $dir/temp/uwsgi;
    scgi_temp_path $dir/temp/scgi;
    map_hash_max_size $hash_max;
    map_hash_bucket_size 256;
    map \$uri \$destination {
        default "";
        include $dir/map.conf;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT backlog=4096;
        location / {
            if (\$destination = "") { return 404; }
            return 302 \$destination;
        }
    }
}
EOF
    note "nginx: starting with $LINKS links"
    local start_s pid ready_s
    start_s=$(now_s)
    start_pinned "$dir/stdout.log" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log"
    pid=$STARTED_PID
    ready_s=$(wait_for_redirect "$NGINX_PORT" "$start_s" "$pid") ||
        die "nginx did not serve a redirect; see $dir/error.log: $(tail -3 "$dir/error.log")"
    local worker
    worker=$(ps --ppid "$pid" -o pid= | head -1 | tr -d ' ')

    local reload_start reload_s=- new_worker=$worker
    if [[ ${STARTUP_ONLY:-0} == 1 ]]; then
        measure nginx "$NGINX_PORT" "$pid" "$ready_s" "$worker" "$reload_s"
        keep_for_rounds nginx "$NGINX_PORT" "$pid"
        return 0
    fi
    note "nginx: reload (rebuilds the map)"
    reload_start=$(now_s)
    kill -HUP "$pid"
    while true; do
        new_worker=$(ps --ppid "$pid" -o pid= | tr -d ' ' | grep -vx "$worker" | head -1 || true)
        if [[ -n $new_worker ]] && ! kill -0 "$worker" 2>/dev/null; then
            break
        fi
        if (($(calc "$(now_s) - $reload_start > $READY_TIMEOUT_S" 0))); then
            die "nginx reload did not finish"
        fi
        sleep 0.02
    done
    reload_s=$(calc "$(now_s) - $reload_start" 2)
    measure nginx "$NGINX_PORT" "$pid" "$ready_s" "$new_worker" "$reload_s"
    keep_for_rounds nginx "$NGINX_PORT" "$pid"
}

# --- HAProxy -----------------------------------------------------------------------------------

run_haproxy() {
    local dir=$WORK/haproxy
    mkdir -p "$dir"
    awk -F'\t' '{ printf "/%s %s\n", $1, $2 }' "$LINKS_TSV" >"$dir/links.map"
    cat >"$dir/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout client 300s
    timeout server 300s
    timeout connect 5s
frontend redirects
    bind 127.0.0.1:$HAPROXY_PORT
    http-request redirect location %[path,map($dir/links.map)] code 302 if { path,map($dir/links.map) -m found }
    http-request return status 404
EOF
    note "haproxy: starting with $LINKS links"
    local start_s pid ready_s
    start_s=$(now_s)
    start_pinned "$dir/haproxy.log" haproxy -db -f "$dir/haproxy.cfg"
    pid=$STARTED_PID
    ready_s=$(wait_for_redirect "$HAPROXY_PORT" "$start_s" "$pid") ||
        die "haproxy did not serve a redirect: $(tail -3 "$dir/haproxy.log")"
    measure haproxy "$HAPROXY_PORT" "$pid" "$ready_s" "$pid" "-"
    keep_for_rounds haproxy "$HAPROXY_PORT" "$pid"
}

# --- kurz --------------------------------------------------------------------------------------

run_kurz() {
    if [[ ! -x $KURZ ]]; then
        note "kurz: skipped: no $KURZ (build it with cargo build --release)"
        return 0
    fi
    if ! "$KURZ" serve --help 2>/dev/null | grep -q -- '--admin-listen' ||
        ! "$KURZ" import --help 2>/dev/null | grep -q -- '--data-dir'; then
        note "kurz: skipped: $KURZ does not support 'import --data-dir' and 'serve --listen --admin-listen --workers' yet"
        return 0
    fi
    local dir=$WORK/kurz-data
    note "kurz: importing $LINKS links"
    "$KURZ" import --data-dir "$dir" "$LINKS_TSV" >"$WORK/kurz-import.log" 2>&1 ||
        die "kurz import failed: $(tail -3 "$WORK/kurz-import.log")"
    local start_s pid ready_s
    start_s=$(now_s)
    start_pinned "$WORK/kurz-serve.log" "$KURZ" serve --data-dir "$dir" \
        --listen "127.0.0.1:$KURZ_PORT" --admin-listen "127.0.0.1:$KURZ_ADMIN_PORT" --workers 1
    pid=$STARTED_PID
    ready_s=$(wait_for_redirect "$KURZ_PORT" "$start_s" "$pid") ||
        die "kurz did not serve a redirect: $(tail -3 "$WORK/kurz-serve.log")"
    local readyz
    readyz=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$KURZ_ADMIN_PORT/readyz" || true)
    [[ $readyz == 200 ]] || note "kurz: /readyz on the admin port answered $readyz after the first redirect"
    measure kurz "$KURZ_PORT" "$pid" "$ready_s" "$pid" "-" "http://127.0.0.1:$KURZ_ADMIN_PORT/metrics"
    keep_for_rounds kurz "$KURZ_PORT" "$pid"
    if [[ ${STARTUP_ONLY:-0} != 1 ]] && ((PAIRED_ROUNDS > 0)); then
        # Its own copy of the imported data: a data dir serves one process at a time.
        "$KURZ" import --data-dir "$WORK/kurz-bare-data" "$LINKS_TSV" >"$WORK/kurz-bare-import.log" 2>&1 ||
            die "kurz import failed: $(tail -3 "$WORK/kurz-bare-import.log")"
        start_s=$(now_s)
        start_pinned "$WORK/kurz-bare-serve.log" "$KURZ" serve --data-dir "$WORK/kurz-bare-data" \
            --listen "127.0.0.1:$KURZ_BARE_PORT" --admin-listen "127.0.0.1:$KURZ_BARE_ADMIN_PORT" \
            --workers 1 --no-click-analytics
        pid=$STARTED_PID
        wait_for_redirect "$KURZ_BARE_PORT" "$start_s" "$pid" >/dev/null ||
            die "kurz-bare did not serve a redirect: $(tail -3 "$WORK/kurz-bare-serve.log")"
        keep_for_rounds kurz-bare "$KURZ_BARE_PORT" "$pid"
    fi
}

# --- the floor ---------------------------------------------------------------------------------

# A C epoll loop that answers every request with fixed bytes (floor.c): the kernel's share of a
# redirect, which no server can go below on this machine.
run_floor() {
    if ! command -v cc >/dev/null; then
        note "floor: skipped: no C compiler"
        return 0
    fi
    cc -O2 -o "$WORK/floor" "$ROOT/loadtest/compare/floor.c" || die "floor.c did not compile"
    local start_s pid ready_s
    start_s=$(now_s)
    start_pinned "$WORK/floor.log" "$WORK/floor" "$FLOOR_PORT"
    pid=$STARTED_PID
    ready_s=$(wait_for_redirect "$FLOOR_PORT" "$start_s" "$pid") || die "the floor server did not answer"
    measure floor "$FLOOR_PORT" "$pid" "$ready_s" "$pid" "-"
    keep_for_rounds floor "$FLOOR_PORT" "$pid"
}

run_nginx
run_haproxy
run_kurz
run_floor
paired_rounds

# --- table -------------------------------------------------------------------------------------

echo
echo "$LINKS links ($((RAW_BYTES / 1000000)) MB of code+URL), server on CPU $SERVER_CPU, loadtest on CPU $CLIENT_CPU, $CONNECTIONS connections, $DURATION per run"
echo "latencies in microseconds; rates in requests per second; req/CPU-s = requests per server CPU-second;"
echo "other CPU = most of the two CPUs that other processes used during any measured run of that"
echo "server (a noisy machine; the row is only trustworthy near 0%)"
python3 - "$RESULTS" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
columns = [
    ("server", "server"), ("ready s", "ready_s"), ("peak (closed)", "peak_rps"),
    ("p99 @peak", "peak_p99_us"), ("req/CPU-s @peak", "peak_req_per_cpu_s"),
    ("server CPU", "peak_server_cpu"), ("wrk peak", "wrk_rps"), ("wrk p99", "wrk_p99"),
    ("50% rate (achieved)", "rate50"), ("p50", "p50_50_us"), ("p99", "p99_50_us"),
    ("p99.9", "p999_50_us"), ("req/CPU-s", "req_per_cpu_s_50"),
    ("90% rate (achieved)", "rate90"), ("p50", "p50_90_us"), ("p99", "p99_90_us"),
    ("p99.9", "p999_90_us"), ("fixed rate (achieved)", "fixed_rate"), ("p50", "p50_fixed_us"),
    ("p99", "p99_fixed_us"), ("p99.9", "p999_fixed_us"), ("RSS MiB", "rss_mb"), ("RSS/raw", "rss_per_raw"),
    ("reload s", "reload_s"), ("analytics shed @peak", "shed"), ("errors", "errors"),
    ("other CPU", "other_cpu"),
]
print("| " + " | ".join(title.strip() for title, _ in columns) + " |")
print("|" + "---|" * len(columns))
for row in rows:
    print("| " + " | ".join(row[key] for _, key in columns) + " |")
EOF
if [[ -s $ROUNDS ]]; then
    echo
    echo "paired rounds: requests per server CPU-second, closed loop, $ROUND_DURATION a run, every server in turn"
    python3 - "$ROUNDS" <<'EOF'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    round_, name, per_cpu_s, other = line.rstrip("\n").split("\t")
    runs.setdefault(name, {})[int(round_)] = (float(per_cpu_s), other)
order = ["nginx", "haproxy", "kurz", "kurz-bare", "floor"]
names = sorted(runs, key=lambda name: order.index(name) if name in order else len(order))
others = [name for name in names if name != "nginx"] if "nginx" in runs else []
print("| round | " + " | ".join(names) + "".join(f" | {name}/nginx" for name in others) + " |")
print("|" + "---|" * (1 + len(names) + len(others)))
ratios = {name: [] for name in others}
for round_ in sorted(runs[names[0]]):
    cells = [f"{runs[name][round_][0]:.0f} (other {runs[name][round_][1]}%)" for name in names]
    for name in others:
        ratios[name].append(runs[name][round_][0] / runs["nginx"][round_][0])
        cells.append(f"{ratios[name][-1]:.2f}x")
    print(f"| {round_} | " + " | ".join(cells) + " |")
cells = [f"{statistics.median(value for value, _ in runs[name].values()):.0f}" for name in names]
cells += [f"{statistics.median(ratios[name]):.2f}x ({min(ratios[name]):.2f}-{max(ratios[name]):.2f})"
          for name in others]
print("| median | " + " | ".join(cells) + " |")
EOF
fi
