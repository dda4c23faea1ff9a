#!/usr/bin/env bash
# Memory at scale: `ringpeer bench --tunnels N --streams M` (src/tools/scale.rs)
# against real proxy and agent processes of BIN. Proxy phase: N agent tunnels
# (N identities, mTLS) and M idle streams (one echoed byte each) held by one
# load process; proxy VmRSS per idle tunnel and per open idle stream. Agent
# phase: M idle streams through one real agent (each with its socket to an
# echo target), agent VmRSS per stream beside the kernel's socket memory.
# The agent phase is capped by RLIMIT_NOFILE (two sockets per stream on this
# machine); the tool raises the limit as far as the kernel lets it and says so.
# Usage: perf/scale-memory.sh BIN [TUNNELS] [STREAMS] [RUNS] [OUTDIR]
set -euo pipefail
bin=$(readlink -f "$1")
tunnels=${2:-10000}
streams=${3:-100000}
runs=${4:-1}
out=${5:-perf/results/$(date -u +%F)-scale-memory}
mkdir -p "$out"
commit=$(git -C "$(dirname "$0")" rev-parse --short HEAD 2>/dev/null || echo unknown)
{
  echo "date: $(date -u +%FT%TZ)"
  echo "binary: $bin (commit $commit, release build)"
  echo "kernel: $(uname -r)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x $(nproc)"
  echo "memory: $(free -g | awk '/Mem:/ {print $2}') GiB"
  echo "nofile: hard $(ulimit -Hn), fs.nr_open $(cat /proc/sys/fs/nr_open)"
  echo "command: perf/scale-memory.sh BIN $tunnels $streams $runs"
} > "$out/machine.txt"
for i in $(seq 1 "$runs"); do
  echo "== run $i ($(date -u +%T))" | tee -a "$out/runs.txt"
  "$bin" bench --tunnels "$tunnels" --streams "$streams" --json "$out/run-$i.json" 2>"$out/run-$i.log" \
    | grep -E '^(proxy|agent):' | tee -a "$out/runs.txt"
  grep -E '^scale:' "$out/run-$i.log" | tee -a "$out/runs.txt" || true
done
python3 - "$out" "$runs" <<'PY' | tee "$out/summary.txt"
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
rs = [json.load(open(f"{out}/run-{i}.json")) for i in range(1, runs + 1)]
med = lambda f: statistics.median(f(r) for r in rs)
r0 = rs[0]
print(f"medians over {runs} run(s); KiB of VmRSS")
print(f"proxy  per idle tunnel       {med(lambda r: r['proxy']['kib_per_tunnel']):7.1f}   goal <= 32   ({r0['tunnels']} tunnels)")
print(f"proxy  per open idle stream  {med(lambda r: r['proxy']['kib_per_stream']):7.1f}   goal <= 8    ({r0['streams']} streams over {r0['tunnels']} tunnels)")
a = r0['agent']
print(f"agent  per open idle stream  {med(lambda r: r['agent']['kib_per_stream']):7.1f}   goal <= 16 with its socket ({a['streams']} streams)")
print(f"kernel slab per stream (agent's and target's socket ends) {med(lambda r: r['agent']['slab_kib_per_stream']):5.1f}; sockstat TCP mem {med(lambda r: r['agent']['sockstat_kib_per_stream']):4.2f}")
print(f"proxy  per open idle stream, one tunnel (agent phase)   {med(lambda r: r['agent']['proxy_kib_per_stream']):5.1f}")
PY
