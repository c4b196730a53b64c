#!/bin/sh
# Runs every fuzz target for N seconds (default 600), one after another, each from its committed seeds
# (fuzz/seeds/TARGET) into a working corpus (fuzz/corpus/TARGET, not committed). A crash stops the script
# with libFuzzer's report; the input is left in fuzz/artifacts/TARGET.
set -eu
seconds=${1:-600}
cd "$(dirname "$0")"
targets=$(cargo +nightly fuzz list)
for target in $targets; do
    mkdir -p "corpus/$target"
    echo "== $target: $seconds s"
    nice -n 19 cargo +nightly fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=16384 -print_final_stats=1
done
