# The pymta configuration the benchmarks run (source, don't execute):
#   pymta_bench_config STATE_DIR PORT SINK_PORT relay|accept
# Prints bench/pymta_config.py's (the one place it is written): relay delivers everything to the
# smtp-sink on SINK_PORT; accept only accepts into the queue (no delivery, no accounting log). Both
# fsync, with PYMTA_PROCESSES (default 2) processes.
PYMTA_CONFIG_PY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/pymta_config.py"
pymta_bench_config() {
    python3 "$PYMTA_CONFIG_PY" "$1" "$2" "$3" "$4"
}
