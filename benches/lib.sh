# shellcheck shell=bash
# Shared by the bench scripts (sourced after they define `fail`): the echod config they
# run on and the wait for a server to listen. Loopback only.

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
