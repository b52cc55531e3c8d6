#!/usr/bin/env bash
# bench/inbound.sh -- inbound acceptance: smtp-source -> pymta (into its queue, fsync on) and, in
# the same run, smtp-source -> a Debian Postfix instance accepting into its own queue (hold).
# 2 KB messages (INBOUND_SIZES), 1, 10 and 50 sessions (INBOUND_CONC), medians of INBOUND_RUNS runs
# after a warm-up; both queues have seen many deletions by then (every run's messages are deleted
# between runs: the churned steady state of a relay). The two run side by side and take turns,
# one run of each per configuration per round (bench/turns.sh). Prints msgs/s for both and
# pymta/Postfix.
#
#   bench/inbound.sh            (needs Debian postfix; uses ../shared/bench from the repository)
# Loopback only; every process is started and stopped by PID; every run is bounded in time.
# PYMTA_PROCESSES (default 2): listener processes ([smtp] processes), one per core here.
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
SHARED_BENCH="${SHARED_BENCH:-$ROOT/../shared/bench}"
[ -x "$SHARED_BENCH/peer-bench.sh" ] || { echo "error: shared bench harness not found at $SHARED_BENCH" >&2; exit 2; }
. "$SHARED_BENCH/common.sh"
. "$HERE/pymta_config.sh"
. "$HERE/turns.sh"

SIZES="${INBOUND_SIZES:-2048}"
CONC="${INBOUND_CONC:-1 10 50}"
RUNS="${INBOUND_RUNS:-5}"
N="${INBOUND_N:-2000}"
PY_PORT="${PY_PORT:-2560}" PF_PORT="${PF_PORT:-2561}" SINK_PORT="${SINK_PORT:-2562}"
OUT="$BENCH_TMP/inbound"
rm -rf "$OUT"; mkdir -p "$OUT"
JSON="$OUT/results.jsonl"
PF_DIR="${INBOUND_PF_DIR:-${PF_DIR:-/tmp/pmbench/inbound-postfix}}"  # another path lets two runs share the machine

# -- pymta: accept into the queue only (this process does not deliver; fsync on) --
PY_STATE="$OUT/pymta"
mkdir -p "$PY_STATE"
pymta_bench_config "$PY_STATE" "$PY_PORT" "$SINK_PORT" accept >"$OUT/pymta.toml"
PURGE_PY="find '$PY_STATE/queue/incoming' -type f -delete 2>/dev/null; true"
start_pymta "$PY_PORT" "$PF_DIR"

# -- Postfix: smtpd + cleanup + fsync into its hold queue --
"$SHARED_BENCH/postfix-instance.sh" setup "$PF_DIR" "$PF_PORT" "$SINK_PORT" >/dev/null || exit 2
"$SHARED_BENCH/postfix-instance.sh" hold "$PF_DIR" on >/dev/null
"$SHARED_BENCH/postfix-instance.sh" start "$PF_DIR" >/dev/null || exit 2
PF_PID=$("$SHARED_BENCH/postfix-instance.sh" master-pid "$PF_DIR")

pymta_run() {
    "$SHARED_BENCH/peer-bench.sh" -name pymta -port "$PY_PORT" -pid "$PY_PID" -sizes "$1" -conc "$2" -n2k "$N" \
        -n50k "$N" -runs 1 -warmup "$3" -between "$PURGE_PY" -json "$JSON" -sinkport "$SINK_PORT"
}
postfix_run() {
    "$SHARED_BENCH/peer-bench.sh" -name postfix -port "$PF_PORT" -pid "$PF_PID" -sizes "$1" -conc "$2" -n2k "$N" \
        -n50k "$N" -runs 1 -warmup "$3" -between "$SHARED_BENCH/postfix-instance.sh purge $PF_DIR >/dev/null" \
        -json "$JSON" -sinkport "$SINK_PORT"
}
echo "== pymta and postfix (accept into queue), $RUNS rounds" >&2
take_turns "$RUNS" "$SIZES" "$CONC" pymta_run postfix_run

python3 "$HERE/ratios.py" "$JSON" accept_mps
