#!/usr/bin/env bash
# Server CPU per GB of echoed stream for several `tcp.buffer_size` values of one echod build,
# beside the C epoll floor: what docs/PERFORMANCE.md's buffer-size table and the default
# (config/echod.toml) rest on. Every size and the floor run REPEATS times, interleaved, the
# server on SERVER_CPUS, echoload on LOAD_CPUS; the table shows medians.
#
# Usage: benches/buffer_sizes.sh
#   SIZES="16384 32768 65536"  buffer sizes to measure
#   REPEATS=3 SECS=2           runs per server and load, seconds per run
#   PORT=17600                 the loopback port the servers listen on (PORT+1: metrics)
#   SERVER_CPUS=0 LOAD_CPUS=1  taskset CPU lists
#   ECHOD_BIN=… ECHOLOAD_BIN=… FLOOR_BIN=…  use these builds instead of building them
# Only loopback is used; every server started here is stopped by PID.
set -euo pipefail

SIZES=${SIZES:-16384 32768 65536}
REPEATS=${REPEATS:-3}
SECS=${SECS:-2}
PORT=${PORT:-17600}

cd "$(dirname "$0")/.."
fail() { echo "buffer_sizes.sh: FAILED: $*" >&2; exit 1; }
# shellcheck source=benches/lib.sh
. benches/lib.sh
if [ -z "${ECHOD_BIN:-}" ]; then
    cargo build --release --quiet --bin echod
    ECHOD_BIN=${CARGO_TARGET_DIR:-target}/release/echod
fi
build_shared_bench
OUT=$(mktemp -d)
SERVER=
cleanup() { [ -z "$SERVER" ] || kill "$SERVER" 2>/dev/null || true; rm -rf "$OUT"; }
trap cleanup EXIT
echod_config "$OUT/echod.toml" "$PORT" $((PORT + 1)) 1000

LOADS=("bulk --window 1073741824 --conns 1" "bulk --window 1073741824 --conns 8"
    "bulk --window 65536 --conns 1" "bulk --window 65536 --conns 8")
SERVERS=(floor $SIZES)

# run SERVER LOAD: one run; appends "SERVER<TAB>LOAD<TAB>s/GB" to results.tsv.
run() {
    if [ "$1" = floor ]; then
        taskset -c "$SERVER_CPUS" "$FLOOR_BIN" "$PORT" "$PORT" >/dev/null 2>&1 &
    else
        ECHOD_TCP__BUFFER_SIZE=$1 taskset -c "$SERVER_CPUS" "$ECHOD_BIN" --config "$OUT/echod.toml" \
            >"$OUT/echod.log" 2>&1 &
    fi
    SERVER=$!
    wait_tcp "$PORT" "$SERVER"
    local result
    # shellcheck disable=SC2086 # LOAD holds echoload's arguments
    result=$(taskset -c "$LOAD_CPUS" "$ECHOLOAD_BIN" $2 --addr "127.0.0.1:$PORT" --secs "$SECS" \
        --server-pid "$SERVER" | grep '^RESULT') || fail "echoload $2 against $1 failed"
    kill "$SERVER"
    wait "$SERVER" 2>/dev/null || true
    SERVER=
    awk -v s="$1" -v l="$2" '{
        for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        if (v["mismatches"] != 0 || v["errors"] != 0 || v["gbytes_per_s"] <= 0) exit 1
        printf "%s\t%s\t%.4f\n", s, l, v["server_cpu"] / v["gbytes_per_s"]
    }' <<<"$result" >>"$OUT/results.tsv" || fail "echoload $2 against $1: $result"
}

for _ in $(seq "$REPEATS"); do
    for load in "${LOADS[@]}"; do
        for server in "${SERVERS[@]}"; do run "$server" "$load"; done
    done
done

printf '| echoload |'
for server in "${SERVERS[@]}"; do printf ' %s |' "$server"; done
printf '\n|---|'
for _ in "${SERVERS[@]}"; do printf -- '---:|'; done
printf '\n'
for load in "${LOADS[@]}"; do
    printf '| `%s` |' "$load"
    for server in "${SERVERS[@]}"; do
        awk -F'\t' -v s="$server" -v l="$load" '$1 == s && $2 == l { print $3 }' "$OUT/results.tsv" |
            sort -n | awk '{ v[NR] = $1 } END { printf " %.3f |", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
    done
    printf '\n'
done
echo "(server CPU s per GB echoed, median of $REPEATS × ${SECS} s; server on CPU $SERVER_CPUS, echoload on CPU $LOAD_CPUS; buffer sizes in bytes)"
