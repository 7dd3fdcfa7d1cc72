#!/bin/sh
# Runs one libFuzzer target for a bounded time; what it finds goes to a
# scratch corpus (never the committed seeds), and every crash, leak, timeout
# or out-of-memory input is copied into tests/fuzz/regress/ so that the
# replay in `make test` keeps it as a regression test. Exit status 1 when it
# found any.
#   run.sh FUZZER SECONDS SCRATCH_DIR SEEDS_DIR DICT
set -u
fuzzer=$1 seconds=$2 scratch=$3 seeds=$4 dict=$5
here=$(dirname "$0")
mkdir -p "$scratch/corpus" "$scratch/artifacts"
"$fuzzer" -max_total_time="$seconds" -max_len=16384 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -dict="$dict" -artifact_prefix="$scratch/artifacts/" "$scratch/corpus" "$seeds" 2>"$scratch/log"
status=$?
grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ *DONE)' "$scratch/log" || tail -3 "$scratch/log"
found=0
for f in "$scratch"/artifacts/*; do
    [ -e "$f" ] || continue
    found=$((found + 1))
    cp "$f" "$here/regress/$(basename "$f")"
    echo "$(basename "$fuzzer"): found $(basename "$f"), copied to tests/fuzz/regress/ (replayed by make test):"
    grep -E 'ERROR|SUMMARY|property broken' "$scratch/log" | head -5
done
if [ "$found" -gt 0 ] || [ "$status" -ne 0 ]; then
    echo "$(basename "$fuzzer"): FAILED (exit $status, $found inputs); the log is $scratch/log"
    exit 1
fi
echo "$(basename "$fuzzer"): no crash in $seconds s; corpus $(ls "$scratch/corpus" | wc -l) inputs in $scratch/corpus"
