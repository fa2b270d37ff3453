#!/usr/bin/env bash
# Runs the test binaries that start GPU executors (hashgrid-executor's and hashgrid-tests')
# RUNS times in all (default 300), JOBS at a time (default 2: CI's two cores, kept busy), and
# fails if any run dies by a signal or fails. It guards against the crash at exit of #16: a
# process exiting while a worker thread still tears down its Vulkan device (SIGSEGV after
# every test passed). `inference` (minutes per run, real models) is left out.
#
#   scripts/crashcheck.sh [RUNS]        JOBS=2 by default; logs of failed runs are printed
#
# With CRASHES_ONLY=1 (what .ci/run uses) only a run killed by a signal fails the check; test
# failures are printed and counted. Under two binaries at a time a few liveness waits
# (the DHT walk, book convergence) can time out: 1 run in 300 on the 2-core VM.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-300}
jobs=${JOBS:-2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The workspace's own build of the test binaries (the same features as `cargo test
# --workspace`, so nothing is rebuilt after it), keeping hashgrid-executor's and
# hashgrid-tests'.
cargo test --locked --workspace --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable") \
            or not m.get("profile", {}).get("test"):
        continue
    pkg = m["manifest_path"].replace("\\", "/").split("/")[-2]
    if pkg in ("executor", "tests") and m["target"]["name"] not in ("inference", "hashgrid_tests"):
        print(m["executable"])
' >"$work/bins"
mapfile -t bins <"$work/bins"
n=${#bins[@]}
if [ "$n" -eq 0 ]; then
  echo "crashcheck: no test binaries found" >&2
  exit 1
fi
for ((i = 0; i < runs; i++)); do
  echo "$i ${bins[$((i % n))]}"
done >"$work/plan"

start=$(date +%s)
# Each run: its exit status (128 + N when killed by signal N) and its log.
xargs -P "$jobs" -L 1 sh -c '"$2" -q >"$0/$1.log" 2>&1; echo "$? $1 $2" >>"$0/results"' "$work" <"$work/plan"
took=$(($(date +%s) - start))

ok=$(awk '$1 == 0' "$work/results" | wc -l)
signalled=$(awk '$1 >= 128' "$work/results" | wc -l)
failed=$(awk '$1 != 0 && $1 < 128' "$work/results" | wc -l)
echo "crashcheck: $runs runs of $n test binaries, $jobs at a time, ${took}s: $ok passed, $failed failed, $signalled killed by a signal"
if [ "$ok" -ne "$runs" ]; then
  awk '$1 != 0' "$work/results" | while read -r rc i bin; do
    echo "--- run $i: $(basename "$bin") exited $rc:"
    grep -A 6 -E "panicked at|^Error: " "$work/$i.log" || tail -n 30 "$work/$i.log"
  done
  if [ "$signalled" -ne 0 ] || [ "${CRASHES_ONLY:-0}" != 1 ]; then
    exit 1
  fi
fi
