#!/usr/bin/env bash
# Before/after of a change, measured the way BENCHMARKS.md's A/B tables are: the base revision is
# built in its own worktree and target directory, then base and current code run alternately
# (interleaved rounds, so machine noise hits both alike).
#
#   scripts/bench-ab.sh <base-rev>                        # 3 rounds, 100k rows, HTTP sink
#   scripts/bench-ab.sh <base-rev> --rounds 5 --rows 50000 --sink file
#   scripts/bench-ab.sh <base-rev> --same-input   # both builds read the base's emulator's rows
#                                                 # (when the emulator's rows changed too)
#
# Prints one line per run (connector CPU-s per 100k rows, ratio to the serde_json floor, rows/s)
# and the medians. The base build is kept under target/bench-ab/ (reused when the same revision
# is asked again).
set -euo pipefail
cd "$(dirname "$0")/.."

[ $# -ge 1 ] || { sed -n '2,13p' "$0"; exit 2; }
base="$(git rev-parse --verify "$1^{commit}")"
shift
rounds=3
rows=100000
sink=http
same_input=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --rows) rows="$2"; shift 2 ;;
    --sink) sink="$2"; shift 2 ;;
    --same-input) same_input=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "bench-ab.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

work="target/bench-ab/${base:0:12}"
if [ ! -x "$work/target/release/shield-bench" ]; then
  rm -rf "$work/tree"
  git worktree prune
  git worktree add --detach "$work/tree" "$base" >/dev/null
  (cd "$work/tree" && CARGO_TARGET_DIR="$PWD/../target" \
    cargo build --release -p shield-bench -p databricks-emulator)
  git worktree remove --force "$work/tree"
fi
cargo build --release -p shield-bench -p databricks-emulator

run() {
  "$1" throughput --rows "$rows" --reps 1 --sinks "$sink" --redact false 2>/dev/null |
    tail -n 1 |
    python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print("%.2f %.3f %.0f" % (d["connector_cpu_s_per_100k_rows"], d["floor_ratio_cpu"], d["rows_per_s"]))'
}

results=()
for i in $(seq "$rounds"); do
  b="$(run "$work/target/release/shield-bench")"
  if [ "$same_input" = 1 ]; then
    n="$(SHIELD_BENCH_EMULATOR="$PWD/$work/target/release/databricks-emulator" run target/release/shield-bench)"
  else
    n="$(run target/release/shield-bench)"
  fi
  echo "round $i  base ${base:0:9}: $b   current: $n   (CPU-s per 100k rows, floor ratio, rows/s)"
  results+=("base $b" "new $n")
done
printf '%s\n' "${results[@]}" | python3 -c '
import sys, statistics
runs = {"base": [], "new": []}
for line in sys.stdin:
    who, cpu, ratio, rps = line.split()
    runs[who].append((float(cpu), float(ratio)))
for who in ("base", "new"):
    cpu = statistics.median(r[0] for r in runs[who])
    ratio = statistics.median(r[1] for r in runs[who])
    print(f"median {who}: {cpu:.2f} CPU-s per 100k rows, {ratio:.3f} of the floor")
'
