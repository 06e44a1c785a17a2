#!/usr/bin/env bash
# The pause of an upgrade in place against the number of open connections: for each
# COUNT, a release echod holds COUNT idle connections (examples/hold_connections), its
# binary is replaced and SIGHUP'd, and the script prints how long new connections waited
# (the old image's "paused_ms" up to the exec, and the new image's "upgrade complete …
# paused_us" until it accepts again: echod_last_upgrade_pause_seconds), and when the
# held connections were served again ("connections_served_us", from the same start;
# they hand themselves over before the pause begins). Loopback only; each run is
# bounded (60 s).
#
#   benches/upgrade_pause.sh [COUNT ...]      (default: 200 1000 10000)
#   REPEATS=3 benches/upgrade_pause.sh 10000   (medians of 3)
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "upgrade_pause.sh: $*" >&2; exit 1; }
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(200 1000 10000)
repeats=${REPEATS:-1}

cargo build --release --quiet --bin echod --example hold_connections
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

ulimit -n "$(ulimit -Hn)"
printf '%-12s %-8s %-9s %-8s\n' connections exec_ms pause_ms held_ms
for count in "${counts[@]}"; do
    execs=(); readies=(); helds=()
    for _ in $(seq "$repeats"); do
        cp target/release/echod "$work/echod"
        cat >"$work/echod.toml" <<TOML
[tcp]
listen = ["127.0.0.1:0"]
max_connections = $((count + 100))
max_connections_per_ip = $((count + 100))
[udp]
listen = []
[metrics]
listen = []
TOML
        "$work/echod" --config "$work/echod.toml" 2>"$work/log" &
        daemon=$!; pids+=("$daemon")
        for _ in $(seq 100); do grep -q "echod ready" "$work/log" && break; sleep 0.1; done
        addr=$(sed -n 's/.*echod ready: TCP \([^ ]*\) .*/\1/p' "$work/log" | head -1)
        [ -n "$addr" ] || fail "echod did not start: $(cat "$work/log")"
        mkfifo "$work/hold.in"
        target/release/examples/hold_connections "$addr" "$count" <"$work/hold.in" >"$work/hold.out" &
        holder=$!; pids+=("$holder")
        exec 7>"$work/hold.in"
        for _ in $(seq 600); do grep -q "^ready" "$work/hold.out" && break; sleep 0.1; done
        grep -q "^ready $count" "$work/hold.out" || fail "could not open $count connections"
        cp target/release/echod "$work/echod.new" && mv "$work/echod.new" "$work/echod"
        kill -HUP "$daemon"
        for _ in $(seq 600); do grep -q "upgrade complete" "$work/log" && break; sleep 0.1; done
        grep -q "upgrade complete" "$work/log" || fail "no upgrade: $(tail -5 "$work/log")"
        execs+=("$(sed -n 's/.*executing the new binary.*paused_ms=\([0-9]*\).*/\1/p' "$work/log")")
        us=$(sed -n 's/.*upgrade complete.*paused_us=\([0-9]*\).*/\1/p' "$work/log")
        readies+=("$((us / 1000))")
        us=$(sed -n 's/.*upgrade complete.*connections_served_us=\([0-9]*\).*/\1/p' "$work/log")
        helds+=("$((us / 1000))")
        exec 7>&-
        kill "$holder" "$daemon" 2>/dev/null || true
        wait "$holder" "$daemon" 2>/dev/null || true
        rm -f "$work/hold.in" "$work/log"
    done
    median() { printf '%s\n' "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }
    printf '%-12s %-8s %-9s %-8s\n' "$count" "$(median "${execs[@]}")" "$(median "${readies[@]}")" "$(median "${helds[@]}")"
done
