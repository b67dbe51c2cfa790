#!/usr/bin/env bash
# Builds the workspace binaries in release and runs every benchmark of BENCHMARKS.md:
#   scripts/bench.sh                 # everything (100k-row runs x3, 12-cycle cost, two 1M-row runs)
#   scripts/bench.sh --skip-large    # without the 1M-row process runs (minutes faster)
#   scripts/bench.sh --reps 5 --rows 100000 --large-rows 1000000
# Results: JSON lines on stdout and appended to target/bench-results.jsonl (override with BENCH_OUT).
# Progress goes to stderr. Needs ~12 GB free in $TMPDIR for the 1M-row file-sink run.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${BENCH_OUT:-target/bench-results.jsonl}"
cargo build --release -p shield-bench -p databricks-shield -p databricks-emulator
echo "# $(date -u +%FT%TZ) $(nproc) cores, $(uname -srm)" >&2
exec target/release/shield-bench --out "$out" all "$@"
