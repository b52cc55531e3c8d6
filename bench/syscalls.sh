#!/usr/bin/env bash
# bench/syscalls.sh -- kernel operations per message, pymta and Postfix in the same run: strace -f
# attached to every process of each MTA (after a warm-up, so the queues are churned) while
# smtp-source relays SYSCALLS_N messages of 2 KB (SYSCALLS_SIZE) over 10 sessions (SYSCALLS_CONC)
# through it to an smtp-sink. Prints, per message: system calls, file creates (open with O_CREAT),
# fsync + fdatasync, renames, and the most frequent calls (bench/syscall_count.py); then, where
# perf has the syscall tracepoints, fsyncs per message of the same run untraced (full speed).
# strace slows both peers a lot: the counts mean something here, the rates do not.
# Loopback only; every process is started and stopped by its PID; every wait is bounded.
# PYMTA_PROCESSES (default 2): [smtp] processes.
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
SHARED_BENCH="${SHARED_BENCH:-$ROOT/../shared/bench}"
[ -x "$SHARED_BENCH/sink-relay.sh" ] || { echo "error: shared bench harness not found at $SHARED_BENCH" >&2; exit 2; }
. "$SHARED_BENCH/common.sh"
. "$HERE/pymta_config.sh"
command -v strace >/dev/null || die "strace not installed"

N="${SYSCALLS_N:-1000}" SIZE="${SYSCALLS_SIZE:-2048}" CONC="${SYSCALLS_CONC:-10}" WARM="${SYSCALLS_WARMUP:-2000}"
PY_PORT="${PY_PORT:-2580}" PF_PORT="${PF_PORT:-2581}" SINK_PORT="${SINK_PORT:-2582}"
OUT="$BENCH_TMP/syscalls"
rm -rf "$OUT"; mkdir -p "$OUT"
PF_DIR="${PF_DIR:-/tmp/pmbench/syscalls-postfix}"
TWISTD="${TWISTD:-twistd}"

tree_pids() {  # PID and its descendants, one per line
    echo "$1"
    local child
    for child in $(ps -o pid= --ppid "$1"); do tree_pids "$child"; done
}

# traced NAME PID: warm-up, then N messages with strace -f on the tree of PID; the trace in $OUT/NAME.trace
traced() {
    local name=$1 pid=$2 args=(-s "$SIZE" -c "$CONC" -p "$SINK_PORT" -t "127.0.0.1:$3" -T 300)
    "$SHARED_BENCH/sink-relay.sh" -n "$WARM" "${args[@]}" -L "$name/warmup" >/dev/null || die "$name warm-up failed"
    eval "$4"  # the queue drained
    local attach=()
    for p in $(tree_pids "$pid"); do attach+=(-p "$p"); done
    strace -f -qq -y -o "$OUT/$name.trace" "${attach[@]}" & local tracer=$!
    sleep 2  # attached (strace -p returns at once; attaching a few processes takes well under this)
    "$SHARED_BENCH/sink-relay.sh" -n "$N" "${args[@]}" -L "$name/traced" >&2 || die "$name traced run failed"
    eval "$4"  # deliveries finished: their bookkeeping is counted too
    sleep 1
    kill -INT "$tracer"; wait "$tracer" 2>/dev/null
    # The same run untraced, at full speed, where group commit shares fsyncs as it does in service:
    # fsync and fdatasync counted system-wide by perf's syscall tracepoints (smtp-source and
    # smtp-sink make none; what else runs on the machine adds its own few).
    if command -v perf >/dev/null && perf list 2>/dev/null | grep -q 'syscalls:sys_enter_fsync'; then
        perf stat -a -x, -o "$OUT/$name.perf" -e syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync & local perf=$!
        sleep 1
        "$SHARED_BENCH/sink-relay.sh" -n "$N" "${args[@]}" -L "$name/untraced" >&2 || die "$name untraced run failed"
        eval "$4"
        kill -INT "$perf"; wait "$perf" 2>/dev/null
        awk -F, -v n="$N" -v name="$name" '$3 ~ /sys_enter_f/ {s += $1} END {printf "%s untraced: %.2f fsync+fdatasync per message\n", name, s / n}' "$OUT/$name.perf" >>"$OUT/untraced.txt"
    fi
}

PY_STATE="$OUT/pymta"
mkdir -p "$PY_STATE"
pymta_bench_config "$PY_STATE" "$PY_PORT" "$SINK_PORT" relay >"$OUT/pymta.toml"
WAIT_PY="for i in \$(seq 300); do [ -z \"\$(find '$PY_STATE/queue/incoming' '$PY_STATE/queue/active' '$PY_STATE/queue/deferred' -type f -print -quit 2>/dev/null)\" ] && break; sleep 0.1; done"
port_free 127.0.0.1 "$PY_PORT" || die "127.0.0.1:$PY_PORT already in use"
"$TWISTD" -n --pidfile= pymta --config "$OUT/pymta.toml" >"$OUT/pymta.log" 2>&1 & PY_PID=$!
trap 'stop_pid "$PY_PID" 15' EXIT
wait_port 127.0.0.1 "$PY_PORT" 30 || die "pymta did not listen (see $OUT/pymta.log)"
echo "== pymta" >&2
traced pymta "$PY_PID" "$PY_PORT" "$WAIT_PY"
stop_pid "$PY_PID" 15

echo "== postfix" >&2
"$SHARED_BENCH/postfix-instance.sh" destroy "$PF_DIR" >/dev/null 2>&1
"$SHARED_BENCH/postfix-instance.sh" setup "$PF_DIR" "$PF_PORT" "$SINK_PORT" >/dev/null || exit 2
"$SHARED_BENCH/postfix-instance.sh" start "$PF_DIR" >/dev/null || exit 2
trap '"$SHARED_BENCH/postfix-instance.sh" destroy "$PF_DIR" >/dev/null 2>&1' EXIT
PF_PID=$("$SHARED_BENCH/postfix-instance.sh" master-pid "$PF_DIR")
traced postfix "$PF_PID" "$PF_PORT" "$SHARED_BENCH/postfix-instance.sh wait-empty $PF_DIR 60 >/dev/null"

python3 "$HERE/syscall_count.py" "$N" pymta="$OUT/pymta.trace" postfix="$OUT/postfix.trace"
[ -f "$OUT/untraced.txt" ] && { echo; cat "$OUT/untraced.txt"; }
