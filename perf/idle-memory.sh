#!/usr/bin/env bash
# Memory per open idle stream: N TCP connections through `ringpeer forward`
# -> proxy -> agent -> echo target, each with one byte echoed (so every
# stream is established), then held open. Reports each process's RSS growth
# per stream (VmRSS after - before, / N). Separate processes, release build.
# Usage: perf/idle-memory.sh BIN [N]   (BIN: a ringpeer binary)
set -euo pipefail
bin=$(readlink -f "$1")
n=${2:-2000}
ulimit -n 65536 2>/dev/null || true
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
"$bin" certs init --dir "$work/certs" --cluster mem >/dev/null 2>&1
echo_port=$(port); client_port=$(port); tunnel_port=$(port); peer_port=$(port); fwd_port=$(port)
"$bin" target echo --listen "127.0.0.1:$echo_port" >/dev/null 2>&1 & pids+=($!)
cat > "$work/proxy.toml" <<CFG
cluster = "mem"
id = "proxy-a"
shards = 1
client_addr = "127.0.0.1:$client_port"
tunnel_addr = "127.0.0.1:$tunnel_port"
peer_addr = "127.0.0.1:$peer_port"
[tls]
ca = "$work/certs/ca.pem"
cert = "$work/certs/proxy-a.pem"
key = "$work/certs/proxy-a-key.pem"
[[grants]]
name = "bench"
clients = ["client"]
agents = ["*"]
services = ["*"]
CFG
cat > "$work/agent.toml" <<CFG
cluster = "mem"
id = "agent-1"
proxies = ["127.0.0.1:$tunnel_port"]
[tls]
ca = "$work/certs/ca.pem"
cert = "$work/certs/agent-1.pem"
key = "$work/certs/agent-1-key.pem"
[services]
echo = "127.0.0.1:$echo_port"
CFG
"$bin" proxy --config "$work/proxy.toml" --log warn >/dev/null 2>&1 & proxy=$!; pids+=($proxy)
sleep 0.5
"$bin" agent --config "$work/agent.toml" --log warn >/dev/null 2>&1 & agent=$!; pids+=($agent)
"$bin" forward --listen "127.0.0.1:$fwd_port" --to agent-1/echo --proxy "127.0.0.1:$client_port" --certs "$work/certs" --log warn >/dev/null 2>&1 & fwd=$!; pids+=($fwd)
sleep 1.5
python3 - "$fwd_port" "$n" "$proxy" "$agent" "$fwd" <<'PY'
import socket, sys, time
port, n, pids = int(sys.argv[1]), int(sys.argv[2]), dict(zip(["proxy", "agent", "forward"], map(int, sys.argv[3:6])))
def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])  # KiB
# Warm up with one stream (first-use allocations), then measure.
w = socket.create_connection(("127.0.0.1", port)); w.sendall(b"w"); assert w.recv(1) == b"w"
time.sleep(0.3)
before = {k: rss(p) for k, p in pids.items()}
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"x")
    socks.append(s)
for s in socks:
    s.settimeout(20)
    assert s.recv(1) == b"x"
time.sleep(1.0)
after = {k: rss(p) for k, p in pids.items()}
for k in pids:
    print(f"{k:8s} RSS {before[k]/1024:8.1f} MiB -> {after[k]/1024:8.1f} MiB: {(after[k]-before[k])/n:6.1f} KiB per open stream ({n} streams)")
PY
