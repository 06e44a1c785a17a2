#!/usr/bin/env bash
# What one echo server spends per echoed message — system calls, CPU time and context
# switches — from `perf stat` on the server process while `echod bench` (which verifies
# every echoed byte) sends a fixed number of messages. System-call counts do not move with
# the machine's load, so they separate two builds where compare.sh's CPU times are noisy.
#
# Usage: benches/syscalls.sh SERVER COUNT [ECHOD BENCH ARGUMENTS...]
#   SERVER   echod, naive (examples/naive_echo), uring (examples/uring_echo), or the path
#            of another echod build (say, the commit before a change)
#   COUNT    messages to echo (the bench's --count)
#   PORT=17500                 the loopback port the server listens on (and PORT+1 for
#                              echod's metrics)
#   SERVER_CPUS=0 LOAD_CPUS=1  taskset CPU lists for the server and the load generator
#   ECHOD_BIN=… EXAMPLES_DIR=… use these builds instead of `cargo build --release`
#
# Prints one line: SERVER syscalls/msg … cpu_us/msg … ctxsw/msg … msg/s …
# Example (three alternating runs, 50 connections, 64 B round trips):
#   for i in 1 2 3; do for s in naive echod; do benches/syscalls.sh $s 300000 -s 64 -C 50; done; done
# Only loopback is used; the server started here is stopped by PID on exit.
set -euo pipefail

SERVER=${1:?usage: benches/syscalls.sh SERVER COUNT [BENCH ARGUMENTS...]}
COUNT=${2:?usage: benches/syscalls.sh SERVER COUNT [BENCH ARGUMENTS...]}
shift 2
PORT=${PORT:-17500}

cd "$(dirname "$0")/.."
fail() { echo "syscalls.sh: FAILED: $*" >&2; exit 1; }
# shellcheck source=benches/lib.sh
. benches/lib.sh
command -v perf >/dev/null || fail "perf is required (Debian: linux-perf)"
if [ -n "${ECHOD_BIN:-}" ]; then
    BIN=$ECHOD_BIN
    EXAMPLES=${EXAMPLES_DIR:?EXAMPLES_DIR must name the directory of the example builds}
else
    cargo build --release --quiet --bin echod --example naive_echo --example uring_echo
    BIN=${CARGO_TARGET_DIR:-target}/release/echod
    EXAMPLES=${CARGO_TARGET_DIR:-target}/release/examples
fi

OUT=$(mktemp -d)
PID='' PERF=''
cleanup() {
    for pid in $PERF $PID; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$OUT"
}
trap cleanup EXIT

case $SERVER in
naive) taskset -c "$SERVER_CPUS" "$EXAMPLES/naive_echo" "$PORT" >"$OUT/server.log" 2>&1 & ;;
uring) taskset -c "$SERVER_CPUS" "$EXAMPLES/uring_echo" "$PORT" >"$OUT/server.log" 2>&1 & ;;
*)
    server_bin=$BIN
    [ "$SERVER" = echod ] || server_bin=$SERVER
    [ -x "$server_bin" ] || fail "no executable $server_bin"
    echod_config "$OUT/echod.toml" "$PORT" $((PORT + 1)) 5000
    taskset -c "$SERVER_CPUS" "$server_bin" --config "$OUT/echod.toml" >"$OUT/server.log" 2>&1 &
    ;;
esac
PID=$!
wait_tcp "$PORT" "$PID"
perf stat -x, -e raw_syscalls:sys_enter,task-clock,context-switches -p "$PID" -o "$OUT/perf.txt" &
PERF=$!
sleep 0.3
taskset -c "$LOAD_CPUS" "$BIN" bench "127.0.0.1:$PORT" --count "$COUNT" -d 120s --json "$@" \
    >"$OUT/bench.json" 2>"$OUT/bench.err" || fail "bench against $SERVER: $(tail -n 3 "$OUT/bench.err")"
kill -INT "$PERF"
wait "$PERF" 2>/dev/null || true
PERF=
grep -q '"mismatches":0' "$OUT/bench.json" || fail "mismatched echoes: $(cat "$OUT/bench.json")"
rate=$(grep -o '"messages_per_s":[0-9.]*' "$OUT/bench.json" | cut -d: -f2)
awk -F, -v n="$COUNT" -v name="$SERVER" -v rate="$rate" '
    /raw_syscalls:sys_enter/ { s = $1 } /task-clock/ { t = $1 } /context-switches/ { c = $1 }
    END {
        if (s == "" || t == "") { print "syscalls.sh: FAILED: perf counted nothing" > "/dev/stderr"; exit 1 }
        printf "%s syscalls/msg %.2f cpu_us/msg %.2f ctxsw/msg %.2f msg/s %.0f\n", name, s / n, t * 1000 / n, c / n, rate
    }' "$OUT/perf.txt"
