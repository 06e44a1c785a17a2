# shellcheck shell=bash
# Shared by the bench scripts (sourced after they define `fail`): the echod config they
# run on and the wait for a server to listen. Loopback only.

# Where the server and the load generator run (taskset CPU lists), unless set.
SERVER_CPUS=${SERVER_CPUS:-0}
LOAD_CPUS=${LOAD_CPUS:-1}

# echod_config FILE PORT METRICS_PORT MAX_CONNECTIONS: TCP and UDP echo on PORT, no UDP
# rate limit (a load generator is one source), metrics on METRICS_PORT, warnings only.
echod_config() {
    cat >"$1" <<TOML
[tcp]
listen = ["127.0.0.1:$2"]
max_connections = $4
max_connections_per_ip = $4
[udp]
listen = ["127.0.0.1:$2"]
[udp.rate_limit]
packets_per_second = 0
[metrics]
listen = ["127.0.0.1:$3"]
[log]
level = "warn"
TOML
}

# build_shared_bench: the independent load generator and the C epoll floor from
# ../shared/bench (read-only), into target/; ECHOLOAD_BIN and FLOOR_BIN name them
# (already set: those builds are used instead).
build_shared_bench() {
    if [ -z "${ECHOLOAD_BIN:-}" ]; then
        [ -f ../shared/bench/echoload/Cargo.toml ] || fail "no ../shared/bench/echoload (set ECHOLOAD_BIN)"
        cargo build --release --locked --quiet --manifest-path ../shared/bench/echoload/Cargo.toml \
            --target-dir target/echoload
        ECHOLOAD_BIN=target/echoload/release/echoload
    fi
    if [ -z "${FLOOR_BIN:-}" ]; then
        [ -f ../shared/bench/epoll-c/epoll_echo.c ] || fail "no ../shared/bench/epoll-c (set FLOOR_BIN)"
        mkdir -p target
        cc -O2 -o target/epoll_echo ../shared/bench/epoll-c/epoll_echo.c
        FLOOR_BIN=target/epoll_echo
    fi
}

# wait_tcp PORT [PID]: until something accepts on PORT (the runs verify the echo); fails
# after 10 s, or as soon as PID, the server expected there, has exited.
wait_tcp() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        if [ -n "${2:-}" ] && ! kill -0 "$2" 2>/dev/null; then
            fail "the server (PID $2) exited before listening on port $1"
        fi
        sleep 0.1
    done
    fail "nothing listens on port $1"
}

# tls_comparison: the TLS section of compare.sh (TLS=1), run after its plain scenarios
# with its helpers (run, col, median, ratio, cpu_ticks) and settings (BIN, OUT, REPEATS,
# DURATION, BASE_PORT, SERVER_CPU). echod's TLS listener against `socat
# OPENSSL-LISTEN:…,fork EXEC:cat` and `ncat --ssl -k -e /bin/cat` (both fork a `cat` per
# connection; their CPU includes the reaped children), and echod's plain port beside
# its TLS one for the TLS/plain cost, on five ports from BASE_PORT + 11. The load
# generator is `echod bench tls://… --ca`, which verifies the certificate and every
# echoed byte: bulk (throughput, CPU per GB) and connect mode (a full handshake, one
# 64 B echo and close_notify per connection: handshakes per second, CPU per handshake).
# ncat is left out of bulk: its -e relay stops echoing under a streaming load (no echo
# within 5 s, every run), so it is measured on handshakes only.
tls_comparison() {
    command -v openssl >/dev/null || fail "TLS=1 needs openssl (a throwaway certificate)"
    command -v ncat >/dev/null || fail "TLS=1 needs ncat"
    local port=$((BASE_PORT + 11)) dir=$OUT/tls
    mkdir -p "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1 \
        -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>>"$dir/openssl.log" ||
        fail "openssl could not make a certificate: $(tail -n 2 "$dir/openssl.log")"
    echod_config "$dir/echod.toml" "$port" $((port + 2)) 10000
    cat >>"$dir/echod.toml" <<TOML
[tls]
listen = ["127.0.0.1:$((port + 1))"]
cert_file = "$dir/cert.pem"
key_file = "$dir/key.pem"
TOML
    "${SERVER_CPU[@]}" "$BIN" --config "$dir/echod.toml" >>"$dir/echod.log" 2>&1 &
    PID[echod-tls]=$! PID[echod-plain]=$!
    ADDR[echod-plain]=127.0.0.1:$port ADDR[echod-tls]=tls://127.0.0.1:$((port + 1))
    "${SERVER_CPU[@]}" socat "OPENSSL-LISTEN:$((port + 3)),bind=127.0.0.1,fork,reuseaddr,backlog=1024,cert=$dir/cert.pem,key=$dir/key.pem,verify=0" \
        EXEC:cat 2>>"$dir/socat.log" &
    PID[socat-tls]=$! ADDR[socat-tls]=tls://127.0.0.1:$((port + 3))
    "${SERVER_CPU[@]}" ncat --ssl --ssl-cert "$dir/cert.pem" --ssl-key "$dir/key.pem" \
        -l -k -m 1000 127.0.0.1 $((port + 4)) -e /bin/cat 2>>"$dir/ncat.log" &
    PID[ncat-tls]=$! ADDR[ncat-tls]=tls://127.0.0.1:$((port + 4))
    PIDS+=("${PID[echod-tls]}" "${PID[socat-tls]}" "${PID[ncat-tls]}")
    wait_tcp $((port + 1)) "${PID[echod-tls]}"
    wait_tcp $((port + 3)) "${PID[socat-tls]}"
    wait_tcp $((port + 4)) "${PID[ncat-tls]}"
    local servers scenario args n i repeat entry
    # name|servers|bench arguments; echod-plain ignores --ca (a plain target).
    local tls_scenarios=(
        "tls-bulk-c4|echod-tls socat-tls echod-plain|-m bulk -C 4 --ca $dir/cert.pem"
        "tls-connect-c4|echod-tls socat-tls ncat-tls echod-plain|-m connect -s 64 -C 4 --ca $dir/cert.pem"
    )
    echo "== echo over TLS ($REPEATS × $DURATION per scenario and server; output in $OUT)"
    for repeat in $(seq "$REPEATS"); do
        for entry in "${tls_scenarios[@]}"; do
            IFS='|' read -r scenario servers args <<<"$entry"
            read -ra servers <<<"$servers"
            read -ra args <<<"$args"
            n=${#servers[@]}
            for i in $(seq 0 $((n - 1))); do
                run "$scenario" "${servers[$(((i + repeat - 1) % n))]}" "$repeat" "${args[@]}"
            done
        done
    done
    kill "${PID[echod-tls]}" "${PID[socat-tls]}" "${PID[ncat-tls]}" 2>/dev/null || true
    wait "${PID[echod-tls]}" "${PID[socat-tls]}" "${PID[ncat-tls]}" 2>/dev/null || true
    {
        echo
        echo "Echo over TLS: \`TLS=1 REPEATS=$REPEATS DURATION=$DURATION benches/compare.sh\` (medians of $REPEATS; TLS 1.3,"
        echo "P-256 certificate; echod-plain is the same echod's plain port; connect: a full handshake, one 64 B echo"
        echo "and close_notify per connection, so msg/s are handshakes per second):"
        echo
        echo "| scenario | server | msg/s | MB/s | p50 µs | p99 µs | CPU µs/msg | CPU s/GB | msg/s ÷ socat | msg/s ÷ ncat | CPU/msg ÷ socat |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        local s rate cpu
        for entry in "${tls_scenarios[@]}"; do
            IFS='|' read -r scenario servers _ <<<"$entry"
            for s in $servers; do
                rate=$(col "$scenario" "$s" 5) cpu=$(col "$scenario" "$s" 9)
                printf '| %s | %s | %.0f | %.1f | %.0f | %.0f | %.2f | %.2f | %s | %s | %s |\n' \
                    "$scenario" "$s" "$rate" "$(col "$scenario" "$s" 6)" "$(col "$scenario" "$s" 7)" \
                    "$(col "$scenario" "$s" 8)" "$cpu" "$(col "$scenario" "$s" 10)" \
                    "$(ratio "$rate" "$(col "$scenario" socat-tls 5)")" "$(ratio "$rate" "$(col "$scenario" ncat-tls 5)")" \
                    "$(ratio "$cpu" "$(col "$scenario" socat-tls 9)")"
            done
        done
        echo
        echo "TLS/plain cost for echod: bulk MB/s $(ratio "$(col tls-bulk-c4 echod-tls 6)" "$(col tls-bulk-c4 echod-plain 6)"),"
        echo "bulk CPU s/GB $(ratio "$(col tls-bulk-c4 echod-tls 10)" "$(col tls-bulk-c4 echod-plain 10)"),"
        echo "connections/s $(ratio "$(col tls-connect-c4 echod-tls 5)" "$(col tls-connect-c4 echod-plain 5)"),"
        echo "CPU per connection $(ratio "$(col tls-connect-c4 echod-tls 9)" "$(col tls-connect-c4 echod-plain 9)")."
        echo
        echo "Every TLS run above verified the server's certificate and echoed every byte intact."
    } | tee -a "$OUT/table.md"
}
