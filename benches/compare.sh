#!/usr/bin/env bash
# Compares echod with the floor (a minimal single-threaded C epoll echo,
# ../shared/bench/epoll-c/epoll_echo.c, built with `cc -O2`), the naive tokio echo
# (examples/naive_echo.rs, TCP and UDP on one port) and socat where it applies, in one run
# on this machine, with two load generators that verify every echoed byte: echod's own
# `echod bench`, and echoload (../shared/bench/echoload, independent of echod's code,
# built into target/echoload: ../shared is read-only). Every server runs under both.
#
# Servers are pinned to CPU 0 and the load generator to CPU 1 (to CPUs 2… when there are
# three or more), so they do not compete; a second echod pinned to CPUs 0,1 measures
# what a second worker thread brings (tokio sizes its pool from the CPUs it may use).
# Every scenario runs REPEATS times, interleaving the servers (the order rotates each
# repeat), and the table reports medians and ratios against the naive baseline, with the
# server's CPU time per message and per GB from /proc/PID/stat (utime+stime, and its
# reaped children's for socat's forks): over the whole `echod bench` run (connecting and
# closing included), and over echoload's measured window only (echoload reads it, with
# --server-pid). Ratios are against the floor (and the naive loop, and socat). Only
# loopback addresses are used; every process started here is stopped by PID on exit.
#
# A failed run fails the script: a bench that exits non-zero (mismatched echoes,
# connection errors, nothing echoed), a server that dies, or a holder that cannot open
# its connections stops everything with exit status 1 and names the run. Lost UDP
# datagrams are counted and reported, not a failure.
#
# Results land in $OUT: results.tsv, rss.tsv, raw.jsonl, runs/ (each run's JSON and
# stderr) and table.md (what docs/PERFORMANCE.md quotes).
#
# Usage: benches/compare.sh
#   REPEATS=3 DURATION=5s      repeats per scenario and server, length of each run
#   WARMUP=1s                  a verified warm-up run per TCP server first (0: none)
#   IDLE=10000                 the headline point of the idle-connection memory curve
#   CURVE="1000 5000 10000 15000 19000"   the other points (the open-files limit is the cap)
#   SCENARIOS="*"              names or globs (space or comma separated) of the scenarios
#                              to run: rt64-c1 rt64-c50 rt64-c500 win64k-c1 win64k-c8
#                              bulk-c1 bulk-c8 udp64-c1 udp64-c16 idle
#   BASE_PORT=17100            eleven consecutive loopback ports from here (sixteen with TLS=1)
#   BASE_BIN=…                 also run this other echod build (say, the commit before a
#                              change) as server "echod-base" in every TCP and UDP scenario,
#                              interleaved with the others, to measure a change in one run
#   URING=1                    also run examples/uring_echo (one thread, io_uring) as server
#                              "uring" in the TCP scenarios: what another I/O model buys
#   ECHOD_BIN=… EXAMPLES_DIR=… use these builds instead of `cargo build --release`
#   ECHOLOAD_BIN=… FLOOR_BIN=… use these builds of echoload and epoll_echo instead of
#                              building them from ../shared into target/
#   COMPARE_SELFTEST_CORRUPT=1 (tests only) serve the baseline with examples/corrupt_echo,
#                              which flips bytes, to prove that the script fails
set -euo pipefail

REPEATS=${REPEATS:-3}
DURATION=${DURATION:-5s}
WARMUP=${WARMUP:-1s}
IDLE=${IDLE:-10000}
CURVE=${CURVE:-1000 5000 10000 15000 19000}
SCENARIOS=${SCENARIOS:-*}
BASE_PORT=${BASE_PORT:-17100}
ECHOD_PORT=$BASE_PORT
METRICS_PORT=$((BASE_PORT + 1))
ECHOD2_PORT=$((BASE_PORT + 2))
METRICS2_PORT=$((BASE_PORT + 3))
NAIVE_PORT=$((BASE_PORT + 4))
SOCAT_PORT=$((BASE_PORT + 5))
SOCAT_UDP_PORT=$((BASE_PORT + 6))
BASE_ECHOD_PORT=$((BASE_PORT + 7))
BASE_METRICS_PORT=$((BASE_PORT + 8))
URING_PORT=$((BASE_PORT + 9))
FLOOR_PORT=$((BASE_PORT + 10)) # TCP and UDP
COMMAND="${BASE_BIN:+BASE_BIN=… }$(if [ "${URING:-0}" = 1 ]; then echo 'URING=1 '; fi)REPEATS=$REPEATS DURATION=$DURATION IDLE=$IDLE CURVE=\"$CURVE\" SCENARIOS=\"$SCENARIOS\" benches/compare.sh"

cd "$(dirname "$0")/.."
TARGET_DIR=${CARGO_TARGET_DIR:-target}
OUT=${OUT:-$TARGET_DIR/compare-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT/runs"

fail() { echo "compare.sh: FAILED: $*" >&2; exit 1; }
# shellcheck source=benches/lib.sh
. benches/lib.sh

if [ -n "${ECHOD_BIN:-}" ]; then
    BIN=$ECHOD_BIN
    EXAMPLES=${EXAMPLES_DIR:?EXAMPLES_DIR must name the directory of the example builds}
else
    cargo build --release --quiet --bin echod --example naive_echo \
        --example hold_connections --example corrupt_echo --example uring_echo
    BIN=$TARGET_DIR/release/echod
    EXAMPLES=$TARGET_DIR/release/examples
fi
build_shared_bench
ECHOLOAD=$ECHOLOAD_BIN FLOOR=$FLOOR_BIN
NAIVE=$EXAMPLES/naive_echo
HOLD=$EXAMPLES/hold_connections
URING_ECHO=$EXAMPLES/uring_echo
if [ "${COMPARE_SELFTEST_CORRUPT:-0}" = 1 ]; then
    echo "SELF-TEST: the naive baseline is served by examples/corrupt_echo (flips bytes); this run must fail" >&2
    NAIVE=$EXAMPLES/corrupt_echo
fi
[ "${URING:-0}" = 1 ] || URING_ECHO=
for exe in "$BIN" "$NAIVE" "$HOLD" "$ECHOLOAD" "$FLOOR" ${BASE_BIN:+"$BASE_BIN"} ${URING_ECHO:+"$URING_ECHO"}; do [ -x "$exe" ] || fail "no executable $exe"; done
command -v socat >/dev/null || fail "socat is required"

# Scenario selection: SCENARIOS holds names or globs.
read -ra PATTERNS <<<"${SCENARIOS//,/ }"
selected() {
    local p
    for p in "${PATTERNS[@]}"; do
        # shellcheck disable=SC2053 # the pattern is a glob on purpose
        [[ $1 == $p ]] && return 0
    done
    return 1
}

ulimit -n "$(ulimit -Hn)"
NPROC=$(nproc)
SERVER_CPU=() SERVER2_CPU=() LOAD_CPU=() TWO_CPUS=0
if command -v taskset >/dev/null && [ "$NPROC" -ge 2 ]; then
    # shellcheck disable=SC2054 # "0,1" is one CPU list
    SERVER_CPU=(taskset -c 0) SERVER2_CPU=(taskset -c 0,1) TWO_CPUS=1
    if [ "$NPROC" -ge 3 ]; then LOAD_CPU=(taskset -c "2-$((NPROC - 1))"); else LOAD_CPU=(taskset -c 1); fi
fi
CLK_TCK=$(getconf CLK_TCK)

# Every process started here is stopped by PID on exit.
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# The idle-connection curve: ascending, unique, IDLE included.
read -ra CURVE_POINTS <<<"$CURVE"
read -ra POINTS <<<"$(printf '%s\n' "${CURVE_POINTS[@]}" "$IDLE" | sort -n -u | xargs)"
MAX_POINT=${POINTS[-1]}
echod_config "$OUT/echod.toml" "$ECHOD_PORT" "$METRICS_PORT" $((MAX_POINT + 500))
echod_config "$OUT/echod2.toml" "$ECHOD2_PORT" "$METRICS2_PORT" $((MAX_POINT + 500))
echod_config "$OUT/echod-base.toml" "$BASE_ECHOD_PORT" "$BASE_METRICS_PORT" $((MAX_POINT + 500))

declare -A PID ADDR
start_server() { # NAME
    case $1 in
    echod) "${SERVER_CPU[@]}" "$BIN" --config "$OUT/echod.toml" >>"$OUT/echod.log" 2>&1 &
        ADDR[$1]=127.0.0.1:$ECHOD_PORT ;;
    echod-2cpu) "${SERVER2_CPU[@]}" "$BIN" --config "$OUT/echod2.toml" >>"$OUT/echod-2cpu.log" 2>&1 &
        ADDR[$1]=127.0.0.1:$ECHOD2_PORT ;;
    echod-base) "${SERVER_CPU[@]}" "$BASE_BIN" --config "$OUT/echod-base.toml" >>"$OUT/echod-base.log" 2>&1 &
        ADDR[$1]=127.0.0.1:$BASE_ECHOD_PORT ;;
    uring) "${SERVER_CPU[@]}" "$URING_ECHO" "$URING_PORT" >>"$OUT/uring.log" 2>&1 &
        ADDR[$1]=127.0.0.1:$URING_PORT ;;
    floor) "${SERVER_CPU[@]}" "$FLOOR" "$FLOOR_PORT" "$FLOOR_PORT" >>"$OUT/floor.log" 2>&1 &
        ADDR[$1]=127.0.0.1:$FLOOR_PORT ;;
    naive) "${SERVER_CPU[@]}" "$NAIVE" "$NAIVE_PORT" >>"$OUT/naive.log" 2>&1 &
        ADDR[$1]=127.0.0.1:$NAIVE_PORT ;;
    socat) "${SERVER_CPU[@]}" socat "TCP-LISTEN:$SOCAT_PORT,bind=127.0.0.1,fork,reuseaddr,backlog=1024" \
        EXEC:cat 2>>"$OUT/socat.log" &
        ADDR[$1]=127.0.0.1:$SOCAT_PORT ;;
    socat-udp) # serves the first peer only, so a fresh one for every UDP run
        "${SERVER_CPU[@]}" socat -T 30 "UDP-LISTEN:$SOCAT_UDP_PORT,bind=127.0.0.1,reuseaddr" PIPE \
            2>>"$OUT/socat.log" &
        ADDR[$1]=127.0.0.1:$SOCAT_UDP_PORT ;;
    esac
    PID[$1]=$!
    PIDS+=("${PID[$1]}")
    case $1 in socat-udp) sleep 0.3 ;; *) wait_tcp "${ADDR[$1]##*:}" "${PID[$1]}" ;; esac
}
stop_server() { # NAME
    kill "${PID[$1]}" 2>/dev/null || true
    wait "${PID[$1]}" 2>/dev/null || true
}
alive() { kill -0 "$1" 2>/dev/null; }

# CPU time of a process and its reaped children, in clock ticks: "user system".
cpu_ticks() { awk '{ print $14 + $16, $15 + $17 }' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
slab_kib() { awk '/^Slab:/ { print $2 }' /proc/meminfo; } # the kernel's object caches
workers() { grep -lx echod-worker /proc/"$1"/task/*/comm 2>/dev/null | wc -l; }
field() { grep -o "\"$1\":[0-9.e+-]*" <<<"$2" | head -1 | cut -d: -f2; }

printf 'scenario\tserver\trepeat\tmessages\tmsgs_per_s\tmb_per_s\tp50_us\tp99_us\tcpu_us_per_msg\tcpu_s_per_gb\tkernel_pct\tlost\tgenerator\n' \
    >"$OUT/results.tsv"

# run SCENARIO SERVER REPEAT BENCH_ARGS...: one verified bench run; any failure is fatal.
run() {
    local scenario=$1 server=$2 repeat=$3; shift 3
    local name=$server pid addr
    [ "$server" = socat ] && [[ $scenario == udp* ]] && { name=socat-udp; start_server socat-udp; }
    pid=${PID[$name]} addr=${ADDR[$name]}
    local what="$scenario/$server #$repeat (echod bench $addr -d $DURATION $*)"
    alive "$pid" || fail "$server (PID $pid) was gone before run $what"
    local u0 s0 u1 s1 rc=0 file=$OUT/runs/$scenario.$server.$repeat
    read -r u0 s0 < <(cpu_ticks "$pid")
    "${LOAD_CPU[@]}" "$BIN" bench "$addr" --json -d "$DURATION" "$@" >"$file.json" 2>"$file.err" || rc=$?
    if [ "$name" = socat-udp ]; then
        # socat's UDP server exits once a late reply meets the client's closed port
        # (ICMP port unreachable): its CPU is read the moment the run ends.
        alive "$pid" || fail "$server (PID $pid) died during run $what"
    else
        sleep 0.3 # let the server finish closing the connections
        alive "$pid" || fail "$server (PID $pid) died during run $what"
    fi
    read -r u1 s1 < <(cpu_ticks "$pid") || fail "$server (PID $pid) ended before run $what was measured"
    [ "$name" = socat-udp ] && stop_server socat-udp
    local json
    json=$(cat "$file.json")
    echo "$scenario $server $repeat $json" >>"$OUT/raw.jsonl"
    [ "$rc" = 0 ] || fail "run $what exited $rc: $(tail -n 3 "$file.err")"
    local msgs rate mbs p50 p99 bytes mism errs lost
    msgs=$(field messages "$json") rate=$(field messages_per_s "$json") mbs=$(field mb_per_s "$json")
    p50=$(field p50 "$json") p99=$(field p99 "$json") bytes=$(field bytes_received "$json")
    mism=$(field mismatches "$json") errs=$(field errors "$json") lost=$(field lost "$json")
    if [ -z "$msgs" ] || [ -z "$mism" ] || [ -z "$errs" ]; then
        fail "run $what printed no report: $json"
    fi
    if [ "$mism" != 0 ] || [ "$errs" != 0 ] || [ "$msgs" = 0 ]; then
        fail "run $what: $msgs echoes, $mism mismatches, $errs errors"
    fi
    local row
    row=$(awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$CLK_TCK" -v m="$msgs" -v b="$bytes" 'BEGIN {
        cpu = (u + s) / hz
        printf "%.3f\t%.4f\t%.1f", cpu * 1e6 / m, (b > 0 ? cpu / (b / 1e9) : 0), (u + s > 0 ? 100 * s / (u + s) : 0) }')
    printf '%s\t%s\t%s\t%s\t%.0f\t%.3f\t%.1f\t%.1f\t%s\t%s\tbench\n' "$scenario" "$server" "$repeat" "$msgs" \
        "$rate" "$mbs" "$p50" "$p99" "$row" "${lost:-0}" >>"$OUT/results.tsv"
    printf '  %-10s %-10s bench    #%s %10.0f msg/s %9.1f MB/s  p99 %9.1f µs  cpu %8s µs/msg %8s s/GB  lost %s\n' \
        "$scenario" "$server" "$repeat" "$rate" "$mbs" "$p99" "$(cut -f1 <<<"$row")" "$(cut -f2 <<<"$row")" "${lost:-0}"
}

# kv KEY LINE: the value of KEY=… in echoload's RESULT line.
kv() { tr ' ' '\n' <<<"$2" | awk -F= -v k="$1" '$1 == k { print $2; exit }'; }

# run_echoload SCENARIO SERVER REPEAT ECHOLOAD_ARGS...: one verified echoload run (it exits
# non-zero on any mismatched byte or I/O error); the server's CPU is echoload's own reading
# over its measured window (--server-pid), so connecting and closing are left out.
run_echoload() {
    local scenario=$1 server=$2 repeat=$3 mode=$4; shift 4
    local name=$server pid addr secs=${DURATION%s}
    [ "$server" = socat ] && [ "$mode" = udp ] && { name=socat-udp; start_server socat-udp; }
    pid=${PID[$name]} addr=${ADDR[$name]}
    local what="$scenario/$server #$repeat (echoload $mode --addr $addr --secs $secs $*)"
    alive "$pid" || fail "$server (PID $pid) was gone before run $what"
    local rc=0 file=$OUT/runs/$scenario.$server.$repeat.echoload
    "${LOAD_CPU[@]}" "$ECHOLOAD" "$mode" --addr "$addr" --secs "$secs" --server-pid "$pid" "$@" \
        >"$file.out" 2>"$file.err" || rc=$?
    sleep 0.3
    alive "$pid" || fail "$server (PID $pid) died during run $what"
    [ "$name" = socat-udp ] && stop_server socat-udp
    local res
    res=$(grep '^RESULT' "$file.out" | tail -n 1)
    echo "$scenario $server $repeat echoload $res" >>"$OUT/raw.jsonl"
    [ "$rc" = 0 ] || fail "run $what exited $rc (1: mismatch, 2: I/O errors): $res $(tail -n 3 "$file.err")"
    [ -n "$res" ] || fail "run $what printed no RESULT line"
    local el cpu rate bytes p50 p99 lost SIZE=64 prev=
    for a in "$@"; do [ "$prev" = --size ] && SIZE=$a; prev=$a; done
    el=$(kv secs "$res") cpu=$(kv server_cpu "$res") p50=$(kv p50_us "$res") p99=$(kv p99_us "$res")
    lost=$(kv lost "$res")
    case $mode in
    pingpong) rate=$(kv rps "$res") bytes=$(awk -v r="$rate" -v e="$el" -v s="$SIZE" 'BEGIN { print r * e * s }') ;;
    udp) rate=$(kv pps "$res") bytes=$(awk -v r="$rate" -v e="$el" -v s="$SIZE" 'BEGIN { print r * e * s }') ;;
    bulk) bytes=$(kv echoed_bytes "$res") rate=$(awk -v b="$bytes" -v e="$el" 'BEGIN { print b / 65536 / e }') ;;
    esac
    [ -n "$rate" ] && [ -n "$cpu" ] || fail "run $what: no rate or server_cpu in $res"
    awk -v r="$rate" 'BEGIN { exit !(r > 0) }' || fail "run $what: nothing echoed: $res"
    local row
    # messages, msg/s, MB/s, p50, p99, CPU µs per message, CPU s per GB (kernel share unknown)
    row=$(awk -v r="$rate" -v e="$el" -v b="$bytes" -v c="$cpu" -v p50="${p50:-0}" -v p99="${p99:-0}" 'BEGIN {
        printf "%.0f\t%.0f\t%.3f\t%.1f\t%.1f\t%.3f\t%.4f\t–", r * e, r, b / e / 1e6, p50, p99, c * 1e6 / r, (b > 0 ? c * e / (b / 1e9) : 0) }')
    printf '%s\t%s\t%s\t%s\t%s\techoload\n' "$scenario" "$server" "$repeat" "$row" "${lost:-0}" >>"$OUT/results.tsv"
    printf '  %-10s %-10s echoload #%s %10.0f msg/s %9.1f MB/s  p99 %9.1f µs  cpu %8s µs/msg %8s s/GB  lost %s\n' \
        "$scenario" "$server" "$repeat" "$rate" "$(cut -f3 <<<"$row")" "$(cut -f5 <<<"$row")" \
        "$(cut -f6 <<<"$row")" "$(cut -f7 <<<"$row")" "${lost:-0}"
}

# name|servers|`echod bench` arguments|echoload arguments. socat forks two processes per
# connection, so it is left out at 500 connections; its UDP echo serves one peer, so it is
# left out at 16 sockets. The windowed scenarios differ between the two generators:
# `echod bench` keeps four 16 KiB messages in flight, echoload 64 KiB of a stream written
# in 64 KiB chunks. "Unbounded" for echoload is a 1 GiB window: the socket buffers bound it.
ALL_SCENARIOS=(
    "rt64-c1|echod floor naive socat|-s 64 -C 1|pingpong --size 64 --conns 1"
    "rt64-c50|echod floor naive socat echod-2cpu|-s 64 -C 50|pingpong --size 64 --conns 50"
    "rt64-c500|echod floor naive echod-2cpu|-s 64 -C 500|pingpong --size 64 --conns 500"
    "win64k-c1|echod floor naive socat|-s 16384 -p 4 -C 1|bulk --window 65536 --conns 1"
    "win64k-c8|echod floor naive socat echod-2cpu|-s 16384 -p 4 -C 8|bulk --window 65536 --conns 8"
    "bulk-c1|echod floor naive socat|-m bulk -C 1|bulk --window 1073741824 --conns 1"
    "bulk-c8|echod floor naive socat echod-2cpu|-m bulk -C 8|bulk --window 1073741824 --conns 8"
    "udp64-c1|echod floor naive socat|-m udp -s 64 -C 1|udp --size 64 --sockets 1"
    "udp64-c16|echod floor naive echod-2cpu|-m udp -s 64 -C 16|udp --size 64 --sockets 16"
)
RUN_SCENARIOS=() NEEDED=" "
for entry in "${ALL_SCENARIOS[@]}"; do
    IFS='|' read -r scenario servers _ _ <<<"$entry"
    selected "$scenario" || continue
    [ "$TWO_CPUS" = 1 ] || servers=${servers/ echod-2cpu/}
    [ -z "${BASE_BIN:-}" ] || servers=${servers/echod /echod echod-base }
    [ "${URING:-0}" != 1 ] || [[ $scenario == udp* ]] || servers=${servers/naive/naive uring}
    RUN_SCENARIOS+=("$scenario|$servers|$(cut -d'|' -f3- <<<"$entry")")
    for s in $servers; do [[ $NEEDED == *" $s "* ]] || NEEDED+="$s "; done
done

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
STARTED=$(date -u '+%Y-%m-%d %H:%M UTC')
if [ ${#RUN_SCENARIOS[@]} -gt 0 ]; then
    echo "== throughput, latency and CPU ($REPEATS × $DURATION per scenario and server; output in $OUT)"
    for s in $NEEDED; do start_server "$s"; done
    for s in $NEEDED; do # warm-up, verified like every run
        [ "$WARMUP" = 0 ] && break
        "${LOAD_CPU[@]}" "$BIN" bench "${ADDR[$s]}" -d "$WARMUP" -C 10 --json >/dev/null 2>"$OUT/warmup.$s.err" ||
            fail "warm-up of $s: $(tail -n 3 "$OUT/warmup.$s.err")"
    done
    for repeat in $(seq "$REPEATS"); do
        for entry in "${RUN_SCENARIOS[@]}"; do
            IFS='|' read -r scenario servers args eargs <<<"$entry"
            read -ra order <<<"$servers"
            read -ra args <<<"$args"
            read -ra eargs <<<"$eargs"
            n=${#order[@]}
            for i in $(seq 0 $((n - 1))); do # rotate the order each repeat
                server=${order[$(((i + repeat - 1) % n))]}
                # the generators alternate too, so neither always follows the same server
                if [ $(((i + repeat) % 2)) = 0 ]; then
                    run "$scenario" "$server" "$repeat" "${args[@]}"
                    run_echoload "$scenario" "$server" "$repeat" "${eargs[@]}"
                else
                    run_echoload "$scenario" "$server" "$repeat" "${eargs[@]}"
                    run "$scenario" "$server" "$repeat" "${args[@]}"
                fi
            done
        done
    done
    WORKERS1=$(workers "${PID[echod]}")
    WORKERS2=$([[ $NEEDED == *" echod-2cpu "* ]] && workers "${PID[echod-2cpu]}" || echo 0)
    for s in $NEEDED; do stop_server "$s"; done
fi

printf 'server\trepeat\tconnections\tsources\tbefore_kib\tafter_kib\tbytes_per_conn\tslab_bytes_per_socket\n' >"$OUT/rss.tsv"
# One fresh server; the holder grows its idle connections through POINTS, and the
# server's RSS is read at each point.
idle_curve() { # SERVER REPEAT
    start_server "$1"
    local pid=${PID[$1]} before after word got label sources n line slab0 slab
    sleep 0.5
    before=$(rss_kib "$pid") slab0=$(slab_kib)
    coproc HOLDER { exec "${LOAD_CPU[@]}" "$HOLD" "${ADDR[$1]}" "${POINTS[@]}" 2>>"$OUT/holder.err"; }
    # shellcheck disable=SC2153 # set by coproc
    local holder_pid=$HOLDER_PID in=${HOLDER[0]} out=${HOLDER[1]}
    PIDS+=("$holder_pid")
    for n in "${POINTS[@]}"; do
        line=
        read -r -t 300 line <&"$in" || true
        read -r word got label sources <<<"$line"
        [ "$word $got $label" = "ready $n sources" ] ||
            fail "idle connections to $1 #$2: holder stopped before $n ($(tail -n 1 "$OUT/holder.err"))"
        sleep 1
        alive "$pid" || fail "$1 (PID $pid) died holding $n idle connections"
        after=$(rss_kib "$pid") slab=$(slab_kib)
        # Both ends of every connection are sockets of this machine: 2 × n sockets.
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%.0f\t%.0f\n' "$1" "$2" "$n" "$sources" "$before" "$after" \
            "$(awk -v a="$after" -v b="$before" -v n="$n" 'BEGIN { print (a - b) * 1024 / n }')" \
            "$(awk -v a="$slab" -v b="$slab0" -v n="$n" 'BEGIN { print (a - b) * 1024 / (2 * n) }')" >>"$OUT/rss.tsv"
        printf '  %-6s #%s %6s connections (%s source addresses): RSS %s → %s KiB\n' \
            "$1" "$2" "$n" "$sources" "$before" "$after"
        echo next >&"$out"
    done
    exec {out}>&-
    wait "$holder_pid" || fail "idle connections to $1 #$2: holder exited $?"
    stop_server "$1"
}
# echoload's reading at IDLE connections, a fresh server each time: its own holder (each
# connection echoes one byte too), to cross-check the curve's figure.
printf 'server\trepeat\tconnections\tbytes_per_conn\n' >"$OUT/idle-echoload.tsv"
idle_echoload() { # SERVER REPEAT
    start_server "$1"
    sleep 0.5
    local rc=0 res file=$OUT/runs/idle.$1.$2.echoload
    "${LOAD_CPU[@]}" "$ECHOLOAD" idle --addr "${ADDR[$1]}" --conns "$IDLE" --pid "${PID[$1]}" --sources 4 \
        >"$file.out" 2>"$file.err" || rc=$?
    res=$(grep '^RESULT' "$file.out" | tail -n 1)
    [ "$rc" = 0 ] && [ -n "$res" ] || fail "echoload idle against $1 #$2 exited $rc: $res $(tail -n 3 "$file.err")"
    [ "$(kv conns "$res")" = "$IDLE" ] || fail "echoload idle against $1 #$2 held fewer than $IDLE: $res"
    printf '%s\t%s\t%s\t%.0f\n' "$1" "$2" "$IDLE" "$(awk -v k="$(kv kib_per_conn "$res")" 'BEGIN { print k * 1024 }')" \
        >>"$OUT/idle-echoload.tsv"
    printf '  %-6s #%s echoload idle: %s\n' "$1" "$2" "$res"
    stop_server "$1"
}
IDLE_SERVERS=(echod floor naive)
if selected idle; then
    echo "== memory per idle connection at ${POINTS[*]} connections (a fresh server each repeat)"
    for repeat in $(seq "$REPEATS"); do
        n=${#IDLE_SERVERS[@]}
        for i in $(seq 0 $((n - 1))); do
            s=${IDLE_SERVERS[$(((i + repeat - 1) % n))]}
            idle_curve "$s" "$repeat"
            idle_echoload "$s" "$repeat"
        done
    done
fi

# Medians per scenario and server, with ratios against the naive baseline.
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print ""; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
col() { # SCENARIO SERVER COLUMN [GENERATOR]: the median over the repeats
    awk -F'\t' -v s="$1" -v v="$2" -v c="$3" -v g="${4:-bench}" 'NR > 1 && $1 == s && $2 == v && $13 == g { print $c }' "$OUT/results.tsv" | median
}
sum() { awk -F'\t' -v s="$1" -v v="$2" -v g="${3:-bench}" 'NR > 1 && $1 == s && $2 == v && $13 == g { n += $12 } END { print n + 0 }' "$OUT/results.tsv"; }
spread() { # SCENARIO SERVER [GENERATOR]: (max − min) ÷ median of msg/s over the repeats, in %
    awk -F'\t' -v s="$1" -v v="$2" -v g="${3:-bench}" 'NR > 1 && $1 == s && $2 == v && $13 == g { print $5 }' "$OUT/results.tsv" |
        sort -g | awk -v m="$(col "$1" "$2" 5 "${3:-bench}")" '{ v[NR] = $1 } END { if (NR > 1 && m > 0) printf "%.0f %%", 100 * (v[NR] - v[1]) / m; else print "–" }'
}
# The figure a scenario is judged by, as a results.tsv column: CPU per GB for streams,
# CPU per message otherwise.
key_col() { case $1 in win* | bulk*) echo 10 ;; *) echo 9 ;; esac; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "" && b > 0) printf "%.2f×", a / b; else print "–" }'; }
GIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- src examples Cargo.toml Cargo.lock 2>/dev/null || GIT="$GIT (with local changes)"
{
    echo "Run of \`$COMMAND\` at $STARTED, commit $GIT."
    echo "Machine: $NPROC CPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), Linux $(uname -r);"
    echo "load average before: $LOAD_BEFORE; after: $(cut -d' ' -f1-3 /proc/loadavg)."
    if [ "$TWO_CPUS" = 1 ]; then
        echo "Servers on CPU 0 (echod-2cpu: CPUs 0,1), load generator on CPU ${LOAD_CPU[2]}."
    else
        echo "Nothing pinned (fewer than 2 CPUs or no taskset)."
    fi
    echo
    if [ ${#RUN_SCENARIOS[@]} -gt 0 ]; then
        echo "echod against the floor, the naive loop and socat: the server's CPU per round trip or datagram"
        echo "(rt, udp) or per GB echoed (win, bulk), and p99 latency at 500 connections; medians of"
        echo "$REPEATS; < 1 means echod spends less. Each under both load generators."
        echo
        echo "| scenario | figure | generator | echod | ÷ floor | ÷ naive | ÷ socat |"
        echo "|---|---|---|---:|---:|---:|---:|"
        for entry in "${RUN_SCENARIOS[@]}"; do
            IFS='|' read -r scenario servers _ <<<"$entry"
            k=$(key_col "$scenario")
            figure=$([ "$k" = 10 ] && echo "CPU s/GB" || echo "CPU µs/msg")
            for gen in echoload bench; do
                e=$(col "$scenario" echod "$k" "$gen")
                printf '| %s | %s | %s | %.3f | %s | %s | %s |\n' "$scenario" "$figure" "$gen" "$e" \
                    "$(ratio "$e" "$(col "$scenario" floor "$k" "$gen")")" \
                    "$(ratio "$e" "$(col "$scenario" naive "$k" "$gen")")" \
                    "$(ratio "$e" "$(col "$scenario" socat "$k" "$gen")")"
            done
            if [ "$scenario" = rt64-c500 ]; then
                for gen in echoload bench; do
                    e=$(col "$scenario" echod 8 "$gen")
                    printf '| %s | p99 µs | %s | %.0f | %s | %s | %s |\n' "$scenario" "$gen" "$e" \
                        "$(ratio "$e" "$(col "$scenario" floor 8 "$gen")")" \
                        "$(ratio "$e" "$(col "$scenario" naive 8 "$gen")")" "–"
                done
            fi
        done
        echo
        echo "Every run, medians (generator \`echoload\`: CPU over its measured window; \`bench\`: over the"
        echo "whole \`echod bench\` run; kernel % from /proc/PID/stat, bench runs only):"
        echo
        echo "| scenario | server | generator | msg/s | MB/s | p50 µs | p99 µs | CPU µs/msg | CPU s/GB | kernel % | CPU ÷ floor | msg/s spread |"
        echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for entry in "${RUN_SCENARIOS[@]}"; do
            IFS='|' read -r scenario servers _ <<<"$entry"
            k=$(key_col "$scenario")
            for gen in echoload bench; do
                floor_cpu=$(col "$scenario" floor "$k" "$gen")
                for server in echod echod-base floor naive uring socat; do
                    [[ " $servers " == *" $server "* ]] || continue
                    kern=$(col "$scenario" "$server" 11 "$gen")
                    printf '| %s | %s | %s | %.0f | %.1f | %.0f | %.0f | %.2f | %.2f | %s | %s | %s |\n' \
                        "$scenario" "$server" "$gen" "$(col "$scenario" "$server" 5 "$gen")" \
                        "$(col "$scenario" "$server" 6 "$gen")" "$(col "$scenario" "$server" 7 "$gen")" \
                        "$(col "$scenario" "$server" 8 "$gen")" "$(col "$scenario" "$server" 9 "$gen")" \
                        "$(col "$scenario" "$server" 10 "$gen")" "${kern:-–}" \
                        "$(ratio "$(col "$scenario" "$server" "$k" "$gen")" "$floor_cpu")" \
                        "$(spread "$scenario" "$server" "$gen")"
                done
            done
        done
        echo
        lost=()
        for entry in "${RUN_SCENARIOS[@]}"; do
            IFS='|' read -r scenario servers _ <<<"$entry"
            [[ $scenario == udp* ]] || continue
            for server in $servers; do
                lost+=("$scenario $server $(sum "$scenario" "$server") (echoload: $(sum "$scenario" "$server" echoload))")
            done
        done
        if [ ${#lost[@]} -gt 0 ]; then
            printf 'UDP datagrams lost (no echo within 5 s; counted, not a failure), total over the repeats: %s.\n' \
                "$(printf '%s, ' "${lost[@]}" | sed 's/, $//')"
            echo
        fi
        two=()
        for entry in "${RUN_SCENARIOS[@]}"; do
            IFS='|' read -r scenario servers _ <<<"$entry"
            [[ " $servers " == *" echod-2cpu "* ]] && two+=("$scenario")
        done
        if [ ${#two[@]} -gt 0 ]; then
            echo "echod on one CPU vs two CPUs (worker threads: $WORKERS1 and $WORKERS2; the second CPU is the load"
            echo "generator's, so this is what a second worker brings when it has to share that CPU):"
            echo
            echo "| scenario | msg/s, 1 CPU | msg/s, 2 CPUs | 2 ÷ 1 | CPU µs/msg, 1 CPU | CPU µs/msg, 2 CPUs | 2 ÷ 1 |"
            echo "|---|---:|---:|---:|---:|---:|---:|"
            for scenario in "${two[@]}"; do
                r1=$(col "$scenario" echod 5) r2=$(col "$scenario" echod-2cpu 5)
                c1=$(col "$scenario" echod 9) c2=$(col "$scenario" echod-2cpu 9)
                printf '| %s | %.0f | %.0f | %s | %.2f | %.2f | %s |\n' "$scenario" "$r1" "$r2" \
                    "$(ratio "$r2" "$r1")" "$c1" "$c2" "$(ratio "$c2" "$c1")"
            done
            echo
        fi
    fi
    if selected idle; then
        echo "Server RSS per idle connection (median of $REPEATS; (RSS with N connections − RSS before) ÷ N):"
        echo
        echo "| idle connections | echod | floor | naive | echod ÷ naive |"
        echo "|---:|---:|---:|---:|---:|"
        for n in "${POINTS[@]}"; do
            e=$(awk -F'\t' -v s=echod -v n="$n" 'NR > 1 && $1 == s && $3 == n { print $7 }' "$OUT/rss.tsv" | median)
            f=$(awk -F'\t' -v s=floor -v n="$n" 'NR > 1 && $1 == s && $3 == n { print $7 }' "$OUT/rss.tsv" | median)
            v=$(awk -F'\t' -v s=naive -v n="$n" 'NR > 1 && $1 == s && $3 == n { print $7 }' "$OUT/rss.tsv" | median)
            printf '| %s%s | %.0f B | %.0f B | %.0f B | %s |\n' "$n" "$([ "$n" = "$IDLE" ] && echo ' (headline)')" \
                "$e" "$f" "$v" "$(ratio "$e" "$v")"
        done
        echo
        echo "echoload's reading at $IDLE idle connections (its own holder, a fresh server each repeat, median):"
        for server in "${IDLE_SERVERS[@]}"; do
            printf '%s %.0f B' "$server" "$(awk -F'\t' -v s="$server" 'NR > 1 && $1 == s { print $4 }' "$OUT/idle-echoload.tsv" | median)"
            [ "$server" = "${IDLE_SERVERS[-1]}" ] && echo . || printf ', '
        done
        echo
        if [ ${#POINTS[@]} -ge 2 ]; then
            lo=${POINTS[0]} hi=${POINTS[-1]}
            echo "Growth between $lo and $hi connections, (RSS at $hi − RSS at $lo) ÷ $((hi - lo)), median of $REPEATS,"
            echo "and what that slope means for 1 000 000 idle connections (process memory only: the kernel's"
            echo "socket memory is not in RSS, and one process here may not open more than $(ulimit -Hn) files):"
            echo
            for server in "${IDLE_SERVERS[@]}"; do
                awk -F'\t' -v s="$server" -v lo="$lo" -v hi="$hi" 'NR > 1 && $1 == s && $3 == lo { a[$2] = $6 }
                    NR > 1 && $1 == s && $3 == hi { b[$2] = $6 }
                    END { for (r in b) if (r in a) print (b[r] - a[r]) * 1024 / (hi - lo) }' "$OUT/rss.tsv" |
                    median | awk -v s="$server" '{ printf "- %s: %.0f B per connection; × 1 000 000 = %.2f GiB\n", s, $1, $1 * 1e6 / 2^30 }'
            done
            echo
        fi
        echo "Kernel memory per idle TCP socket (the growth of /proc/meminfo's Slab, the kernel's object caches,"
        echo "divided by the 2 × N sockets of both ends, at $IDLE connections, median over both servers' runs; it"
        echo "moves with whatever else the machine does): $(awk -F'\t' -v n="$IDLE" 'NR > 1 && $3 == n { print $8 }' "$OUT/rss.tsv" | median | awk '{ printf "%.0f B", $1 }')."
        echo
        echo "Most source addresses the holder needed: $(awk -F'\t' 'NR > 1 && $4 > m { m = $4 } END { print m + 0 }' "$OUT/rss.tsv")."
        echo
    fi
    echo "Every run above echoed every byte intact (a failed run stops the script)."
} | tee "$OUT/table.md"

# Echo over TLS (TLS=1): echod's TLS listener against socat and ncat TLS echoes, and its
# TLS/plain cost; tls_comparison in benches/lib.sh.
if [ "${TLS:-0}" = 1 ]; then
    tls_comparison
fi
