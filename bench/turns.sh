# Alternating two peers in one bench (source, don't execute):
#   take_turns RUNS "SIZES" "CONC" FIRST SECOND
# Each of RUNS rounds calls, for every size and concurrency, FIRST and then SECOND with the
# arguments SIZE CONC WARMUP (WARMUP is 1 in the first round: one unmeasured run before it, 0
# after), so a drift of the machine during the bench (disk, page cache, neighbours) weighs on
# both peers alike instead of on whichever ran last.
take_turns() {
    local runs=$1 sizes=$2 conc=$3 first=$4 second=$5 round s c warm
    for round in $(seq "$runs"); do
        warm=0
        [ "$round" = 1 ] && warm=1
        for s in $sizes; do
            for c in $conc; do
                "$first" "$s" "$c" "$warm"
                "$second" "$s" "$c" "$warm"
            done
        done
    done
}

# start_pymta PORT PF_DIR: start pymta on $OUT/pymta.toml in the background (its PID in PY_PID)
# and, when the script exits, stop it and destroy the Postfix instance in PF_DIR (cleared first).
start_pymta() {
    port_free 127.0.0.1 "$1" || die "127.0.0.1:$1 already in use"
    twistd -n --pidfile= pymta --config "$OUT/pymta.toml" >"$OUT/pymta.server.log" 2>&1 &
    PY_PID=$!
    "$SHARED_BENCH/postfix-instance.sh" destroy "$2" >/dev/null 2>&1
    trap 'stop_pid "$PY_PID" 10; "$SHARED_BENCH/postfix-instance.sh" destroy "'"$2"'" >/dev/null 2>&1' EXIT
    wait_port 127.0.0.1 "$1" 30 || die "pymta did not listen on $1 (see $OUT/pymta.server.log)"
}
