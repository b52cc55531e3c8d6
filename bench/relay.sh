#!/usr/bin/env bash
# bench/relay.sh -- end-to-end relay: smtp-source -> pymta -> smtp-sink, and in the same run
# smtp-source -> Postfix (Debian; relayhost = the same smtp-sink port). 10,000 messages of 2 KB and
# 1,000 of 50 KB (RELAY_N2K / RELAY_N50K), at 10 and 50 sessions (RELAY_CONC), medians of RELAY_RUNS
# runs after a warm-up (the queues have seen many deletions by then: the churned steady state).
# The two MTAs run side by side (each idle while the other is measured) and take turns: each of
# RELAY_RUNS rounds runs every configuration once on pymta, then once on Postfix, so a drift of
# the machine (disk, page cache, neighbours) during the run weighs on both alike.
# Prints end-to-end msgs/s (until the sink has them all), CPU s per 1000 messages, and the ratios
# pymta/Postfix, of the medians and per round. Loopback only; every process is stopped by its
# PID; every run is bounded.
# PYMTA_PROCESSES (default 2): listener processes ([smtp] processes), one per core here.
# PYMTA_SPARE_FILES: [queue] spare_files (0: a new queue file per message, as before spares).
# PYMTA_BENCH_DKIM=1: pymta runs twice more, signing every message with [dkim.default] (RSA-2048,
# then Ed25519); prints pymta's CPU per message with and without signing, and the difference.
# PYMTA_BENCH_WEBHOOKS=1: pymta runs once more with a [[webhooks]] endpoint (batch_size 100) on a
# twisted.web receiver on loopback; prints the end-to-end rate with webhooks on against off.
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
SHARED_BENCH="${SHARED_BENCH:-$ROOT/../shared/bench}"
[ -x "$SHARED_BENCH/peer-bench.sh" ] || { echo "error: shared bench harness not found at $SHARED_BENCH" >&2; exit 2; }
. "$SHARED_BENCH/common.sh"
. "$HERE/pymta_config.sh"
. "$HERE/turns.sh"

SIZES="${RELAY_SIZES:-2048 51200}"
CONC="${RELAY_CONC:-10 50}"
RUNS="${RELAY_RUNS:-5}"
N2K="${RELAY_N2K:-10000}" N50K="${RELAY_N50K:-1000}"
PY_PORT="${PY_PORT:-2570}" PF_PORT="${PF_PORT:-2571}" SINK_PORT="${SINK_PORT:-2572}"
OUT="$BENCH_TMP/relay"
rm -rf "$OUT"; mkdir -p "$OUT"
JSON="$OUT/results.jsonl"
PF_DIR="${PF_DIR:-/tmp/pmbench/relay-postfix}"

PY_STATE="$OUT/pymta"
mkdir -p "$PY_STATE"
pymta_bench_config "$PY_STATE" "$PY_PORT" "$SINK_PORT" relay >"$OUT/pymta.toml"
PY_CFG="$(cat "$OUT/pymta.toml")"
DKIM_VARIANTS=""
if [ "${PYMTA_BENCH_DKIM:-0}" != 0 ]; then
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$OUT/dkim-rsa.pem" 2>/dev/null || exit 2
    openssl genpkey -algorithm ED25519 -out "$OUT/dkim-ed25519.pem" 2>/dev/null || exit 2
    DKIM_VARIANTS="rsa ed25519"
fi
WAIT_PY="for i in \$(seq 300); do [ -z \"\$(find '$PY_STATE/queue/incoming' '$PY_STATE/queue/active' '$PY_STATE/queue/deferred' -type f -print -quit 2>/dev/null)\" ] && break; sleep 0.1; done"

for ALG in $DKIM_VARIANTS; do
    rm -rf "$PY_STATE"; mkdir -p "$PY_STATE"
    printf '%s\n[dkim.default]\ndomain = "bench.example"\nselector = "b%s"\nkey = "%s"\n' \
        "$PY_CFG" "$ALG" "$OUT/dkim-$ALG.pem" >"$OUT/pymta.toml"
    echo "== pymta relay, DKIM $ALG" >&2
    "$SHARED_BENCH/peer-bench.sh" -name "pymta-dkim-$ALG" -port "$PY_PORT" -relay "$SINK_PORT" -sizes "$SIZES" \
        -conc "$CONC" -n2k "$N2K" -n50k "$N50K" -runs "$RUNS" -warmup 1 -between "$WAIT_PY" -json "$JSON" -- \
        twistd -n --pidfile= pymta --config "$OUT/pymta.toml"
done

if [ "${PYMTA_BENCH_WEBHOOKS:-0}" != 0 ]; then
    HOOK_PORT="${HOOK_PORT:-2573}"
    python3 "$HERE/webhooks.py" --serve "$HOOK_PORT" & HOOK_PID=$!
    rm -rf "$PY_STATE"; mkdir -p "$PY_STATE"
    printf '%s\n[[webhooks]]\nname = "bench"\nurl = "http://127.0.0.1:%s/hook"\nsecret = "bench-secret-0123456789"\nbatch_size = 100\n' \
        "$PY_CFG" "$HOOK_PORT" >"$OUT/pymta.toml"
    echo "== pymta relay, webhooks on" >&2
    "$SHARED_BENCH/peer-bench.sh" -name "pymta-webhooks" -port "$PY_PORT" -relay "$SINK_PORT" -sizes "$SIZES" \
        -conc "$CONC" -n2k "$N2K" -n50k "$N50K" -runs "$RUNS" -warmup 1 -between "$WAIT_PY" -json "$JSON" -- \
        twistd -n --pidfile= pymta --config "$OUT/pymta.toml"
    kill "$HOOK_PID" 2>/dev/null; wait "$HOOK_PID" 2>/dev/null
fi

echo "== pymta and postfix relay, $RUNS rounds" >&2
rm -rf "$PY_STATE"; mkdir -p "$PY_STATE"
printf '%s\n' "$PY_CFG" >"$OUT/pymta.toml"
start_pymta "$PY_PORT" "$PF_DIR"
"$SHARED_BENCH/postfix-instance.sh" setup "$PF_DIR" "$PF_PORT" "$SINK_PORT" >/dev/null || exit 2
"$SHARED_BENCH/postfix-instance.sh" start "$PF_DIR" >/dev/null || exit 2
PF_PID=$("$SHARED_BENCH/postfix-instance.sh" master-pid "$PF_DIR")
pymta_run() {
    "$SHARED_BENCH/peer-bench.sh" -name pymta -port "$PY_PORT" -pid "$PY_PID" -relay "$SINK_PORT" -sizes "$1" \
        -conc "$2" -n2k "$N2K" -n50k "$N50K" -runs 1 -warmup "$3" -between "$WAIT_PY" -json "$JSON"
}
postfix_run() {
    "$SHARED_BENCH/peer-bench.sh" -name postfix -port "$PF_PORT" -pid "$PF_PID" -relay "$SINK_PORT" -sizes "$1" \
        -conc "$2" -n2k "$N2K" -n50k "$N50K" -runs 1 -warmup "$3" \
        -between "$SHARED_BENCH/postfix-instance.sh wait-empty $PF_DIR 60" -json "$JSON"
}
take_turns "$RUNS" "$SIZES" "$CONC" pymta_run postfix_run

python3 "$HERE/ratios.py" "$JSON" e2e_mps
[ -n "$DKIM_VARIANTS" ] && python3 "$HERE/dkim_cost.py" "$JSON"
[ "${PYMTA_BENCH_WEBHOOKS:-0}" != 0 ] && python3 "$HERE/webhooks.py" --compare "$JSON"
exit 0
