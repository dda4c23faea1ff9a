#!/usr/bin/env bash
# Before/after comparison of two frozen ringpeer binaries, in one invocation.
#  - Alternates BEFORE, AFTER, BEFORE, AFTER, ... for ROUNDS rounds (default 3);
#    each is one `ringpeer bench --runs 3` (its own medians over 3 runs).
#  - Records each bench process's CPU time (user+sys, GNU time) per run.
#  - Writes OUTDIR/machine.txt (date, commits, kernel, CPU, command lines)
#    and OUTDIR/summary.txt (medians over rounds, min-max, after/before).
# Usage: perf/before-after.sh BEFORE_BIN AFTER_BIN OUTDIR [ROUNDS]
# The commits go into machine.txt from BEFORE_COMMIT / AFTER_COMMIT, e.g.
#   BEFORE_COMMIT=8a56c15 AFTER_COMMIT=e90103f perf/before-after.sh ...
# Bench sizing: ITERS (default 10000) and BULK_MIB (default 512) keep six
# benches at about 10 minutes on the 2-core VM.
set -uo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 BEFORE_BIN AFTER_BIN OUTDIR [ROUNDS]" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
before=$(readlink -f "$1")
after=$(readlink -f "$2")
out=$3
rounds=${4:-3}
iters=${ITERS:-10000}
bulk_mib=${BULK_MIB:-512}
runs=3
for b in "$before" "$after"; do
  [ -x "$b" ] || { echo "not executable: $b" >&2; exit 2; }
done
[ -x /usr/bin/time ] || { echo "needs GNU time at /usr/bin/time" >&2; exit 2; }
mkdir -p "$out"
ulimit -n 65536 2>/dev/null || true
ulimit -l unlimited 2>/dev/null || true # the binaries raise RLIMIT_MEMLOCK themselves

bench_args=(bench --runs "$runs" --iters "$iters" --bulk-mib "$bulk_mib")
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "before: $before commit ${BEFORE_COMMIT:-unknown} sha256 $(sha256sum "$before" | cut -c1-16)"
  echo "after: $after commit ${AFTER_COMMIT:-unknown} sha256 $(sha256sum "$after" | cut -c1-16)"
  echo "kernel: $(uname -r)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') x $(nproc)"
  echo "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "ulimit -l: $(ulimit -l)"
  echo "rounds: $rounds (order per round: before, after)"
  echo "invocation: $0 $*"
  echo "command lines (N = round):"
  echo "  /usr/bin/time -f '%e %U %S' -o $out/before-N.time $before ${bench_args[*]} --json $out/before-N.json"
  echo "  /usr/bin/time -f '%e %U %S' -o $out/after-N.time $after ${bench_args[*]} --json $out/after-N.json"
} > "$out/machine.txt"

failed=0
t0=$(date +%s)
for n in $(seq 1 "$rounds"); do
  for side in before after; do
    bin=$before
    [ "$side" = after ] && bin=$after
    echo "[$(date -u +%H:%M:%S)] round $n/$rounds: $side" >&2
    rm -f "$out/$side-$n.json"
    /usr/bin/time -f '%e %U %S' -o "$out/$side-$n.time" \
      "$bin" "${bench_args[@]}" --json "$out/$side-$n.json" \
      > "$out/$side-$n.txt" 2> "$out/$side-$n.log"
    rc=$?
    echo "$rc" > "$out/$side-$n.rc"
    if [ "$rc" -ne 0 ] || [ ! -s "$out/$side-$n.json" ]; then
      echo "  FAILED: rc=$rc (see $out/$side-$n.log)" >&2
      failed=$((failed + 1))
    fi
  done
done
t1=$(date +%s)
echo "total wall: $((t1 - t0)) s; failed benches: $failed" >> "$out/machine.txt"
echo "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/machine.txt"

python3 "$here/before_after_summary.py" "$out" | tee "$out/summary.txt"
[ "$failed" -eq 0 ]
