# The pymta configuration the benchmarks run (source, don't execute):
#   pymta_bench_config STATE_DIR PORT SINK_PORT relay|accept
# relay: delivers everything to the smtp-sink on SINK_PORT; accept: only accepts into the queue
# (no delivery, no accounting log). Both fsync, with PYMTA_PROCESSES (default 2) processes.
pymta_bench_config() {
    local state=$1 port=$2 sink=$3 mode=$4 queue="" tail=""
    if [ "$mode" = accept ]; then
        queue="deliver = false"
        tail=$'[log]\naccounting = false'
    fi
    cat <<CFG
hostname = "mx.bench.example"
state_dir = "$state"
[smtp]
listen = ["tcp:$port:interface=127.0.0.1"]
processes = ${PYMTA_PROCESSES:-2}
max_message_size = 67108864
[domains]
local = ["bench.example"]
relay_from = ["127.0.0.0/8"]
[queue]
$queue
fsync = true
[outbound]
smarthost = "127.0.0.1:$sink"
max_connections = 100
max_connections_per_domain = 50
$tail
CFG
}
