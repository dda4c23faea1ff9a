#!/usr/bin/env bash
# Side-by-side: the same workloads through haproxy chains and through
# ringpeer, each beside direct TCP in the same invocation.
#  - haproxy, 3 hops, plain TCP;
#  - haproxy, 3 hops, TLS 1.3 on the two inner links (as in DESIGN.md);
#  - ringpeer: client -> proxy -> agent -> target and
#    client -> A -> peer -> B -> agent -> target, mTLS on every link.
# Each haproxy hop is its own process with one thread. Results go to
# perf/results/<date>-haproxy/. Usage: perf/haproxy-chains.sh [--runs N]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=5
[ "${1:-}" = "--runs" ] && runs=$2
command -v haproxy >/dev/null || { apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; }
ulimit -n 65536 2>/dev/null || true
ulimit -l unlimited 2>/dev/null || true
cargo build --release --quiet
bin=$PWD/target/release/ringpeer
out=perf/results/$(date -u +%Y-%m-%d)-haproxy
mkdir -p "$out"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

"$bin" certs init --dir "$work/certs" --cluster bench >/dev/null
cat "$work/certs/proxy-a.pem" "$work/certs/proxy-a-key.pem" > "$work/hop.pem"
"$bin" target echo --listen 127.0.0.1:17001 2>/dev/null & pids+=($!)
"$bin" target sink --listen 127.0.0.1:17002 2>/dev/null & pids+=($!)

# hop NAME ECHO_IN SINK_IN ECHO_OUT SINK_OUT IN_TLS OUT_TLS
hop() {
  local cfg="$work/$1.cfg" bind_opt="" srv_opt=""
  [ "$6" = tls ] && bind_opt="ssl crt $work/hop.pem ssl-min-ver TLSv1.3"
  [ "$7" = tls ] && srv_opt="ssl verify required ca-file $work/certs/ca.pem ssl-min-ver TLSv1.3"
  cat > "$cfg" <<CFG
global
  nbthread 1
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe_echo
  bind 127.0.0.1:$2 $bind_opt
  default_backend be_echo
backend be_echo
  server s 127.0.0.1:$4 $srv_opt
frontend fe_sink
  bind 127.0.0.1:$3 $bind_opt
  default_backend be_sink
backend be_sink
  server s 127.0.0.1:$5 $srv_opt
CFG
  haproxy -f "$cfg" -db >/dev/null 2>&1 & pids+=($!)
}
# Plain chain: 18101 -> 18102 -> 18103 -> targets (sink on 182xx).
hop p1 18101 18201 18102 18202 plain plain
hop p2 18102 18202 18103 18203 plain plain
hop p3 18103 18203 17001 17002 plain plain
# TLS on the two inner links: 19101 -tls-> 19102 -tls-> 19103 -> targets.
hop t1 19101 19201 19102 19202 plain tls
hop t2 19102 19202 19103 19203 tls tls
hop t3 19103 19203 17001 17002 tls plain
sleep 1

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo '-dirty')"
  echo "kernel: $(uname -r)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') x $(nproc)"
  echo "haproxy: $(haproxy -v | head -1)"
  echo "runs: $runs"
} > "$out/machine.txt"
common=(--runs "$runs" --direct-echo 127.0.0.1:17001 --direct-sink 127.0.0.1:17002)
"$bin" bench "${common[@]}" --external-echo 127.0.0.1:18101 --external-sink 127.0.0.1:18201 \
  --label "haproxy 3 hops" --json "$out/haproxy-3hop.json" 2>/dev/null | tee "$out/haproxy-3hop.txt" | grep -v '^[{} ]'
"$bin" bench "${common[@]}" --external-echo 127.0.0.1:19101 --external-sink 127.0.0.1:19201 \
  --label "haproxy 3 hops, TLS inner" --json "$out/haproxy-3hop-tls.json" 2>/dev/null | tee "$out/haproxy-3hop-tls.txt" | grep -v '^[{} ]'
"$bin" bench --runs "$runs" --json "$out/ringpeer.json" 2>/dev/null | tee "$out/ringpeer.txt" | grep -v '^[{} ]'
echo "recorded in $out"
