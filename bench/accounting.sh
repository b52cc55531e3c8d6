#!/usr/bin/env bash
# bench/accounting.sh -- what durable accounting records cost at acceptance: smtp-source -> pymta
# (accept into the queue, fsync on, one process), with [log] accounting off and on, alternating,
# ACCT_RUNS runs each of ACCT_N 2 KB messages over ACCT_SESSIONS sessions. Prints msgs/s per run
# and the medians. With accounting on, each 250 also waits for the fsync of its received record
# (group-committed across sessions).
#
#   bench/accounting.sh        (needs Debian postfix's smtp-source; loopback only)
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PY="${PYTHON:-python3}"
RUNS="${ACCT_RUNS:-3}" N="${ACCT_N:-2000}" SESSIONS="${ACCT_SESSIONS:-10}" PORT="${ACCT_PORT:-2570}"
OUT="$(mktemp -d /tmp/pymta-acct-bench.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT

run_one() {  # run_one on|off -> prints msgs/s
    local mode="$1" state="$OUT/state-$1" pid start end
    rm -rf "$state"; mkdir -p "$state"
    cat >"$OUT/pymta-$mode.toml" <<CFG
hostname = "mx.bench.example"
state_dir = "$state"
[smtp]
listen = ["tcp:$PORT:interface=127.0.0.1"]
[domains]
local = ["bench.example"]
relay_from = ["127.0.0.0/8"]
[queue]
deliver = false
fsync = true
[log]
accounting = $([ "$mode" = on ] && echo true || echo false)
CFG
    (cd "$ROOT" && exec "$PY" -c "from twisted.scripts.twistd import run; run()" -n --pidfile= \
        pymta --config "$OUT/pymta-$mode.toml" >"$OUT/twistd-$mode.log" 2>&1) &
    pid=$!
    for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
    start=$(date +%s.%N)
    timeout 300 /usr/sbin/smtp-source -s "$SESSIONS" -l 2048 -m "$N" -f s@bench.example -t r@remote.example \
        "127.0.0.1:$PORT" >/dev/null 2>&1
    end=$(date +%s.%N)
    kill "$pid"; wait "$pid" 2>/dev/null
    "$PY" -c "print(f'{$N / ($end - $start):.0f}')"
}

declare -a on off
for i in $(seq "$RUNS"); do
    off+=("$(run_one off)"); on+=("$(run_one on)")
    echo "run $i: accounting off ${off[-1]} msgs/s, on ${on[-1]} msgs/s" >&2
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "median msgs/s over $RUNS runs ($N msgs, $SESSIONS sessions): accounting off $(median "${off[@]}"), on $(median "${on[@]}")"
