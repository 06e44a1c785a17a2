#!/usr/bin/env bash
# Compares echod with the naive tokio echo (examples/naive_echo.rs) and socat, in one
# run on this machine, using `echod bench` (which verifies every echoed byte).
#
# Servers are pinned to CPU 0 and the load generator to CPU 1 (when there are two), so
# they do not compete. Every scenario runs REPEATS times, interleaving the servers, and
# the table reports medians and ratios against the naive baseline. Only loopback
# addresses are used. Results land in $OUT (TSV + raw JSON + a Markdown table).
#
# Usage: benches/compare.sh            (REPEATS=3 DURATION=5s IDLE=10000 by default)
set -euo pipefail

REPEATS=${REPEATS:-3}
DURATION=${DURATION:-5s}
IDLE=${IDLE:-10000}
BASE_PORT=${BASE_PORT:-17100}
ECHOD_PORT=$BASE_PORT
METRICS_PORT=$((BASE_PORT + 1))
NAIVE_PORT=$((BASE_PORT + 2))
SOCAT_PORT=$((BASE_PORT + 3))
SOCAT_UDP_PORT=$((BASE_PORT + 4))

cd "$(dirname "$0")/.."
TARGET_DIR=${CARGO_TARGET_DIR:-target}
OUT=${OUT:-$TARGET_DIR/compare-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

cargo build --release --quiet --bin echod --example naive_echo --example hold_connections
BIN=$TARGET_DIR/release/echod
NAIVE=$TARGET_DIR/release/examples/naive_echo
HOLD=$TARGET_DIR/release/examples/hold_connections
command -v socat >/dev/null || { echo "socat is required" >&2; exit 1; }

ulimit -n "$(ulimit -Hn)"
SERVER_CPU=() LOAD_CPU=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    SERVER_CPU=(taskset -c 0) LOAD_CPU=(taskset -c 1)
fi
CLK_TCK=$(getconf CLK_TCK)

# Every process started here is stopped by PID on exit.
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

cat >"$OUT/echod.toml" <<TOML
[tcp]
listen = ["127.0.0.1:$ECHOD_PORT"]
max_connections = $((IDLE + 2000))
max_connections_per_ip = $((IDLE + 2000))
[udp]
listen = ["127.0.0.1:$ECHOD_PORT"]
[udp.rate_limit]
packets_per_second = 0
[metrics]
listen = ["127.0.0.1:$METRICS_PORT"]
[log]
level = "warn"
TOML

wait_tcp() { # PORT: until something echoes there
    for _ in $(seq 100); do
        "$BIN" probe --tcp "127.0.0.1:$1" --timeout 1s >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "nothing echoes on port $1" >&2
    exit 1
}

start_echod() {
    "${SERVER_CPU[@]}" "$BIN" --config "$OUT/echod.toml" >>"$OUT/echod.log" 2>&1 &
    ECHOD_PID=$!; PIDS+=("$ECHOD_PID"); wait_tcp "$ECHOD_PORT"
}
start_naive() {
    "${SERVER_CPU[@]}" "$NAIVE" "$NAIVE_PORT" &
    NAIVE_PID=$!; PIDS+=("$NAIVE_PID"); wait_tcp "$NAIVE_PORT"
}
start_socat() {
    "${SERVER_CPU[@]}" socat "TCP-LISTEN:$SOCAT_PORT,bind=127.0.0.1,fork,reuseaddr,backlog=1024" EXEC:cat &
    SOCAT_PID=$!; PIDS+=("$SOCAT_PID"); wait_tcp "$SOCAT_PORT"
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# CPU time of a server and its reaped children (socat forks), in clock ticks.
cpu_ticks() { awk '{print $14 + $15 + $16 + $17}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
field() { grep -o "\"$1\":[0-9.e+-]*" <<<"$2" | head -1 | cut -d: -f2; }

printf 'scenario\tserver\trepeat\tmsgs_per_s\tmb_per_s\tp50_us\tp99_us\tcpu_us_per_msg\terrors\n' >"$OUT/results.tsv"

# run SCENARIO SERVER PID ADDR REPEAT -- bench args
run() {
    local scenario=$1 server=$2 pid=$3 addr=$4 repeat=$5; shift 5
    local t0 t1 json
    t0=$(cpu_ticks "$pid")
    json=$("${LOAD_CPU[@]}" "$BIN" bench "$addr" --json -d "$DURATION" "$@" 2>>"$OUT/bench.err" || true)
    sleep 0.3
    t1=$(cpu_ticks "$pid")
    echo "$scenario $server $repeat $json" >>"$OUT/raw.jsonl"
    if [ -z "$json" ]; then
        printf '%s\t%s\t%s\t0\t0\t0\t0\t0\tfailed\n' "$scenario" "$server" "$repeat" >>"$OUT/results.tsv"
        return
    fi
    local msgs rate mbs p50 p99 errors
    msgs=$(field messages "$json"); rate=$(field messages_per_s "$json")
    mbs=$(field mb_per_s "$json"); p50=$(field p50 "$json"); p99=$(field p99 "$json")
    errors=$(( $(field errors "$json") + $(field mismatches "$json") ))
    local cpu
    cpu=$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v m="$msgs" 'BEGIN { printf "%.2f", (m > 0 ? d / hz * 1e6 / m : 0) }')
    printf '%s\t%s\t%s\t%.0f\t%.2f\t%.1f\t%.1f\t%s\t%s\n' "$scenario" "$server" "$repeat" \
        "$rate" "$mbs" "$p50" "$p99" "$cpu" "$errors" >>"$OUT/results.tsv"
    printf '  %-14s %-6s #%s  %12.0f msg/s %10.2f MB/s  p99 %8.1f µs  cpu %s µs/msg\n' \
        "$scenario" "$server" "$repeat" "$rate" "$mbs" "$p99" "$cpu"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== throughput and latency ($REPEATS × $DURATION per scenario; output in $OUT)"
start_echod; start_naive; start_socat
for server in echod naive socat; do # warm-up
    case $server in echod) p=$ECHOD_PORT;; naive) p=$NAIVE_PORT;; socat) p=$SOCAT_PORT;; esac
    "${LOAD_CPU[@]}" "$BIN" bench "127.0.0.1:$p" -d 1s -C 10 --json >/dev/null
done

TCP_SCENARIOS=(
    "rt64-c1|-s 64 -C 1" "rt64-c50|-s 64 -C 50" "rt64-c500|-s 64 -C 500"
    "rt1k-c1|-s 1024 -C 1" "rt1k-c50|-s 1024 -C 50" "rt1k-c500|-s 1024 -C 500"
    "bulk-c1|-m bulk -C 1" "bulk-c10|-m bulk -C 10"
)
for repeat in $(seq "$REPEATS"); do
    for entry in "${TCP_SCENARIOS[@]}"; do
        scenario=${entry%%|*}; read -ra args <<<"${entry#*|}"
        run "$scenario" echod "$ECHOD_PID" "127.0.0.1:$ECHOD_PORT" "$repeat" "${args[@]}"
        run "$scenario" naive "$NAIVE_PID" "127.0.0.1:$NAIVE_PORT" "$repeat" "${args[@]}"
        run "$scenario" socat "$SOCAT_PID" "127.0.0.1:$SOCAT_PORT" "$repeat" "${args[@]}"
    done
    # UDP: socat serves one peer per process, so one socket each; echod also with 50.
    "${SERVER_CPU[@]}" socat -T 30 "UDP-LISTEN:$SOCAT_UDP_PORT,bind=127.0.0.1,reuseaddr" PIPE &
    socat_udp=$!; PIDS+=("$socat_udp"); sleep 0.3
    run udp64-c1 echod "$ECHOD_PID" "127.0.0.1:$ECHOD_PORT" "$repeat" -m udp -s 64 -C 1
    run udp64-c1 socat "$socat_udp" "127.0.0.1:$SOCAT_UDP_PORT" "$repeat" -m udp -s 64 -C 1
    run udp64-c50 echod "$ECHOD_PID" "127.0.0.1:$ECHOD_PORT" "$repeat" -m udp -s 64 -C 50
    stop "$socat_udp"
done
stop "$ECHOD_PID"; stop "$NAIVE_PID"; stop "$SOCAT_PID"

echo "== memory per idle connection ($IDLE connections, fresh server each time)"
printf 'server\trepeat\tbefore_kib\tafter_kib\tbytes_per_conn\n' >"$OUT/rss.tsv"
idle_rss() { # SERVER PID PORT REPEAT
    local before after
    sleep 0.5
    before=$(rss_kib "$2")
    coproc HOLDER { "${LOAD_CPU[@]}" "$HOLD" "127.0.0.1:$3" "$IDLE"; }
    local holder_pid=$HOLDER_PID line
    PIDS+=("$holder_pid")
    read -r line <&"${HOLDER[0]}"
    [ "$line" = "ready $IDLE" ] || { echo "holder failed: $line" >&2; exit 1; }
    sleep 1
    after=$(rss_kib "$2")
    exec {HOLDER[1]}>&-
    wait "$holder_pid" 2>/dev/null || true
    printf '%s\t%s\t%s\t%s\t%.0f\n' "$1" "$4" "$before" "$after" \
        "$(awk -v a="$after" -v b="$before" -v n="$IDLE" 'BEGIN { print (a - b) * 1024 / n }')" >>"$OUT/rss.tsv"
    printf '  %-6s #%s  RSS %s → %s KiB\n' "$1" "$4" "$before" "$after"
}
for repeat in $(seq "$REPEATS"); do
    start_echod; idle_rss echod "$ECHOD_PID" "$ECHOD_PORT" "$repeat"; stop "$ECHOD_PID"
    start_naive; idle_rss naive "$NAIVE_PID" "$NAIVE_PORT" "$repeat"; stop "$NAIVE_PID"
done

# Medians per scenario and server, with ratios against the naive baseline.
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
col() { awk -F'\t' -v s="$1" -v v="$2" -v c="$3" '$1 == s && $2 == v { print $c }' "$OUT/results.tsv" | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f×", a / b; else print "–" }'; }
{
    echo "| scenario | server | msg/s | MB/s | p50 µs | p99 µs | server CPU µs/msg | msg/s vs baseline |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|"
    for scenario in rt64-c1 rt64-c50 rt64-c500 rt1k-c1 rt1k-c50 rt1k-c500 bulk-c1 bulk-c10 udp64-c1 udp64-c50; do
        base=$(col "$scenario" naive 4)
        [ "$base" = 0 ] && base=$(col "$scenario" socat 4) # UDP: naive has none
        for server in echod naive socat; do
            rate=$(col "$scenario" "$server" 4)
            [ "$rate" = 0 ] && continue
            printf '| %s | %s | %.0f | %.1f | %.0f | %.0f | %.1f | %s |\n' "$scenario" "$server" "$rate" \
                "$(col "$scenario" "$server" 5)" "$(col "$scenario" "$server" 6)" "$(col "$scenario" "$server" 7)" \
                "$(col "$scenario" "$server" 8)" "$(ratio "$rate" "$base")"
        done
    done
    echo
    echo "Baseline: the naive echo; for UDP (which it lacks), socat."
    echo
    echo "| server | RSS per idle connection ($IDLE connections, median) |"
    echo "|---|---:|"
    for server in echod naive; do
        printf '| %s | %.0f B |\n' "$server" \
            "$(awk -F'\t' -v s="$server" '$1 == s { print $5 }' "$OUT/rss.tsv" | median)"
    done
    failed=$(awk -F'\t' 'NR > 1 && $9 != 0 { n++ } END { print n + 0 }' "$OUT/results.tsv")
    echo
    echo "Runs with errors or mismatches: $failed (see $OUT/raw.jsonl)."
    echo "Load average before: $LOAD_BEFORE; after: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) CPUs)."
} | tee "$OUT/table.md"
