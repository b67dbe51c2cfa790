#!/usr/bin/env bash
# Soak: the SIGKILL crash test of tests/reliability_kill.rs, run long.
#
#   scripts/soak.sh --iterations 500            # 500 kill points, in rounds of 50
#   scripts/soak.sh --iterations 200 --seed 7   # reproducible
#   scripts/soak.sh --iterations 200 --release  # against the release binary
#
# Each round is one run of the test with a fresh emulator, stand-in and STATE_DIR, a different
# seed (base seed + round) and up to 50 kill points; it kills the real binary at random points
# (start-up, reads, in-flight batches, right after a confirmed batch, during the state commit),
# restarts it, and finally checks against the emulator's ground truth: nothing lost, no panic,
# duplicates only where a `WARN re-sending N records of an unconfirmed batch` line announced them.
# The totals at the end are what RELIABILITY.md reports. Exit code 1 on the first failed round
# (its seed is printed, so `RELIABILITY_SEED=<seed> cargo test --test reliability_kill` replays it).
set -euo pipefail
cd "$(dirname "$0")/.."

iterations=100
seed=$(date +%s)
profile=()
per_round=50
while [ $# -gt 0 ]; do
  case "$1" in
    --iterations) iterations="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --per-round) per_round="$2"; shift 2 ;;
    --release) profile=(--release); shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "soak.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$iterations" in ''|*[!0-9]*) echo "soak.sh: --iterations needs a number" >&2; exit 2 ;; esac

cargo test "${profile[@]}" -p databricks-shield --test reliability_kill --no-run >/dev/null 2>&1 \
  || cargo test "${profile[@]}" -p databricks-shield --test reliability_kill --no-run

left=$iterations
round=0
kills=0; execs=0; records=0; dups=0; announced=0
started=$(date +%s)
while [ "$left" -gt 0 ]; do
  n=$(( left < per_round ? left : per_round ))
  s=$(( seed + round ))
  out=$(RELIABILITY_KILLS=$n RELIABILITY_SEED=$s cargo test "${profile[@]}" -q -p databricks-shield \
        --test reliability_kill -- --nocapture 2>&1) || {
    echo "$out" | tail -40
    echo "soak: round $round FAILED (seed $s)" >&2
    exit 1
  }
  line=$(echo "$out" | grep 'kill test: seed=' | tail -1)
  if [ -z "$line" ]; then
    echo "$out" | tail -40
    echo "soak: round $round (seed $s) printed no 'kill test:' summary line" >&2
    exit 1
  fi
  get() { local v; v=$(echo "$line" | sed -n "s/.* $1=\([0-9]*\).*/\1/p"); echo "${v:-0}"; }
  kills=$(( kills + $(get kill_points) ))
  execs=$(( execs + $(get executions) ))
  records=$(( records + $(get records) ))
  dups=$(( dups + $(get duplicates) ))
  announced=$(( announced + $(get announced_records) ))
  echo "round $round: $line"
  left=$(( left - n ))
  round=$(( round + 1 ))
done
echo "soak: rounds=$round kill_points=$kills executions_checked=$execs records_received=$records" \
     "lost=0 panics=0 duplicates=$dups announced_resent_records=$announced" \
     "seconds=$(( $(date +%s) - started ))"
