#!/usr/bin/env bash
# bench/cluster.sh -- the relay's end-to-end rate for one node with [cluster] backend = "local" and
# one node with backend = "redis" in the same run (smtp-source -> pymta -> smtp-sink, Debian's
# postfix tools; Debian's redis-server), and the Redis commands per delivered message (from Redis's
# own INFO stats, which count the commands a Lua script runs; the network calls are the evalsha
# and zrem lines printed for the redis runs). The destination has a message rate and a connection cap, so every message takes
# a rate token and every delivery a connection lease: the path the cluster shares.
# CLUSTER_N messages (default 3000) of CLUSTER_SIZE octets (2048) over CLUSTER_SESSIONS (10),
# CLUSTER_RUNS runs each (3), alternating. Loopback only; every process is stopped by its PID.
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
N="${CLUSTER_N:-3000}" SIZE="${CLUSTER_SIZE:-2048}" SESSIONS="${CLUSTER_SESSIONS:-10}" RUNS="${CLUSTER_RUNS:-3}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
for tool in /usr/sbin/smtp-source /usr/sbin/smtp-sink redis-server redis-cli; do
    command -v "$tool" >/dev/null || { echo "error: $tool not installed (postfix, redis-server)" >&2; exit 2; }
done
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
OUT="$(mktemp -d /tmp/pymta-cluster-bench.XXXXXX)"
REDIS_PORT=$(free_port) SINK_PORT=$(free_port)
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$OUT"; }
trap cleanup EXIT
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no --dir "$OUT" --loglevel warning &
PIDS+=($!)
/usr/sbin/smtp-sink -u nobody -c "127.0.0.1:$SINK_PORT" 256 >"$OUT/sink.out" 2>&1 &
PIDS+=($!)
for i in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

run_once() {  # backend -> prints "msgs_per_s redis_commands"
    local backend=$1 port state
    port=$(free_port); state="$OUT/state-$backend-$RANDOM"; mkdir -p "$state"
    cat >"$OUT/pymta.toml" <<CFG
hostname = "mx.bench.example"
state_dir = "$state"
[smtp]
listen = ["tcp:$port:interface=127.0.0.1"]
[domains]
local = ["bench.example"]
relay_from = ["127.0.0.0/8"]
[outbound]
smarthost = "127.0.0.1:$SINK_PORT"
max_connections = 100
max_connections_per_domain = 20
[shaping.default]
message_rate = "100000/s"
connections = 20
[cluster]
backend = "$backend"
redis = "redis://127.0.0.1:$REDIS_PORT/0"
node = "bench1"
CFG
    PYTHONPATH="$ROOT" "$PY" -c "from twisted.scripts.twistd import run; run()" -n --pidfile= pymta \
        --config "$OUT/pymta.toml" >"$OUT/twistd-$backend.log" 2>&1 &
    local pid=$!
    for i in $(seq 300); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    sleep 1  # the node joins Redis (its first heartbeat) before mail comes
    local before after t0 t1
    redis-cli -p "$REDIS_PORT" config resetstat >/dev/null
    before=$(redis-cli -p "$REDIS_PORT" info stats | awk -F: '/^total_commands_processed/ {print $2+0}')
    t0=$(date +%s.%N)
    /usr/sbin/smtp-source -s "$SESSIONS" -m "$N" -l "$SIZE" -f s@bench.example -t r@remote.example \
        "127.0.0.1:$port" >/dev/null 2>&1
    for i in $(seq 1200); do
        [ -z "$(find "$state/queue/incoming" "$state/queue/active" "$state/queue/deferred" -type f -print -quit 2>/dev/null)" ] && break
        sleep 0.05
    done
    t1=$(date +%s.%N)
    after=$(redis-cli -p "$REDIS_PORT" info stats | awk -F: '/^total_commands_processed/ {print $2+0}')
    [ "$backend" = redis ] && redis-cli -p "$REDIS_PORT" info commandstats | grep '^cmdstat' | grep -v 'config|' \
        | sed 's/^cmdstat_\([a-z]*\):calls=\([0-9]*\).*/\1=\2/' | tr '\n' ' ' | sed 's/^/  commands: /' >&2 && echo >&2
    kill "$pid"; wait "$pid" 2>/dev/null
    echo "$(echo "$N / ($t1 - $t0)" | bc -l) $((after - before - 1))"
}

declare -A RATE OPS
for r in $(seq "$RUNS"); do
    for backend in local redis; do
        read -r rate ops < <(run_once "$backend")
        RATE[$backend]+="$rate "; OPS[$backend]+="$ops "
        printf "run %d %-5s %8.1f msgs/s  %6d Redis commands (%.2f per message)\n" "$r" "$backend" "$rate" "$ops" \
            "$(echo "$ops / $N" | bc -l)" >&2
    done
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
L=$(echo "${RATE[local]}" | median) R=$(echo "${RATE[redis]}" | median) O=$(echo "${OPS[redis]}" | median)
printf "median: local %.1f msgs/s, redis %.1f msgs/s (%.1f %% of local), %.2f Redis commands per message\n" \
    "$L" "$R" "$(echo "100 * $R / $L" | bc -l)" "$(echo "$O / $N" | bc -l)"
