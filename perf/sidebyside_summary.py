#!/usr/bin/env python3
"""Summary of perf/sidebyside results.

Reads OUTDIR/raw/records.jsonl (one line per measured run: run, path, test,
relay CPU ticks per process) and the tools' raw outputs beside it
(RUN-PATH-pp.txt: sockperf ping-pong with --full-rtt; RUN-PATH-tp{1,8}.json:
iperf3 -J). Per path, takes the median over runs of each figure, then
prints a markdown table with absolute values and the ratios
ringpeer/haproxy, haproxy/direct and ringpeer/direct, followed by the
per-relay CPU breakdown and every run's figures. Also writes summary.json.

Relay CPU per round trip uses sockperf's [Total Run] ReceivedMessages
(warm-up included), because the CPU window spans the whole sockperf process.
Relay CPU per GiB uses iperf3's end.sum_received.bytes.

Usage: perf/sidebyside_summary.py OUTDIR CLK_TCK
"""
import json
import re
import statistics
import sys
from pathlib import Path

PATHS = ["direct", "haproxy", "ringpeer"]


def sockperf(path):
    text = path.read_text()
    total = re.search(r"\[Total Run\].*ReceivedMessages=(\d+)", text)
    pct = dict(re.findall(r"percentile (\d+\.\d+) =\s+([\d.]+)", text))
    if not total or "50.000" not in pct:
        raise ValueError(f"{path}: no sockperf summary")
    return {
        "round_trips": int(total.group(1)),
        "p50_us": float(pct["50.000"]),
        "p99_us": float(pct["99.000"]),
        "p999_us": float(pct["99.900"]),
    }


def iperf(path):
    doc = json.loads(path.read_text())
    if "error" in doc:
        raise ValueError(f"{path}: iperf3 error: {doc['error']}")
    r = doc["end"]["sum_received"]
    return {"bytes": r["bytes"], "gbps": r["bits_per_second"] / 1e9}


SYSCALL_COLUMNS = [
    ("raw_syscalls:sys_enter", "all syscalls"),
    ("syscalls:sys_enter_io_uring_enter", "io_uring_enter"),
    ("recv", "recv*/read"),
    ("send", "send*/write*"),
    ("syscalls:sys_enter_epoll_wait", "epoll_wait"),
    ("context-switches", "context switches"),
]


def perf_stat(path):
    """Counts from `perf stat -x,` output: {event: count}."""
    counts = {}
    for line in path.read_text().splitlines():
        f = line.split(",")
        if len(f) > 2 and f[0].strip().isdigit():
            counts[f[2]] = int(f[0])
    recv = ["syscalls:sys_enter_recvfrom", "syscalls:sys_enter_recvmsg", "syscalls:sys_enter_read"]
    send = ["syscalls:sys_enter_sendto", "syscalls:sys_enter_sendmsg", "syscalls:sys_enter_write",
            "syscalls:sys_enter_writev"]
    counts["recv"] = sum(counts.get(k, 0) for k in recv)
    counts["send"] = sum(counts.get(k, 0) for k in send)
    return counts


def syscall_table(out):
    """Per relay process: syscalls and context switches per 64 B round trip
    (a round trip is two relayed messages), from the --syscalls pass."""
    f = out / "raw/syscalls.jsonl"
    if not f.exists():
        return
    print("\nSyscalls and context switches per 64 B round trip, by relay process "
          "(one extra ping-pong per path under `perf stat`; a round trip relays two messages):\n")
    print("| path | process | " + " | ".join(c for _, c in SYSCALL_COLUMNS) + " |")
    print("|---|---|" + "---|" * len(SYSCALL_COLUMNS))
    for line in f.read_text().splitlines():
        rec = json.loads(line)
        path = rec["path"]
        try:
            rts = sockperf(out / f"raw/syscalls-{path}-pp.txt")["round_trips"]
        except (ValueError, FileNotFoundError) as e:
            print(f"| {path} | ({e}) |")
            continue
        total = {k: 0 for k, _ in SYSCALL_COLUMNS}
        for r in rec["relays"].split():
            name = r.split("=")[0]
            c = perf_stat(out / f"raw/syscalls-{path}-{name}.csv")
            for k in total:
                total[k] += c.get(k, 0)
            print(f"| {path} | {name} | " + " | ".join(f"{c.get(k, 0) / rts:.2f}" for k, _ in SYSCALL_COLUMNS) + " |")
        print(f"| {path} | **all relays** | " + " | ".join(f"{total[k] / rts:.2f}" for k, _ in SYSCALL_COLUMNS) + " |")


def main():
    out, hz = Path(sys.argv[1]), int(sys.argv[2])
    rows = [json.loads(l) for l in (out / "raw/records.jsonl").read_text().splitlines() if l.strip()]
    per_run = []  # dicts of figures
    errors = []
    for r in rows:
        base = out / "raw" / f"{r['run']}-{r['path']}-{r['test']}"
        cpu_s = sum(r["relay_ticks"].values()) / hz
        fig = dict(r)
        try:
            if r["test"] == "pp":
                fig.update(sockperf(base.with_suffix(".txt")))
                fig["cpu_us_per_rt"] = cpu_s * 1e6 / fig["round_trips"]
            else:
                fig.update(iperf(base.with_suffix(".json")))
                fig["cpu_s_per_gib"] = cpu_s / (fig["bytes"] / 2**30)
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            errors.append(f"run {r['run']} {r['path']} {r['test']}: {e}")
            continue
        fig["relay_cpu_s"] = cpu_s
        per_run.append(fig)

    def med(path, test, key):
        vals = [f[key] for f in per_run if f["path"] == path and f["test"] == test and key in f]
        return statistics.median(vals) if vals else None

    metrics = [
        # label, test, key, unit, relay-only
        ("relay CPU per 64 B round trip", "pp", "cpu_us_per_rt", "us", True),
        ("RTT p50", "pp", "p50_us", "us", False),
        ("RTT p99", "pp", "p99_us", "us", False),
        ("RTT p99.9", "pp", "p999_us", "us", False),
        ("relay CPU per GiB, 1 stream", "tp1", "cpu_s_per_gib", "s", True),
        ("relay CPU per GiB, 8 streams", "tp8", "cpu_s_per_gib", "s", True),
        ("throughput, 1 stream", "tp1", "gbps", "Gbit/s", False),
        ("throughput, 8 streams", "tp8", "gbps", "Gbit/s", False),
    ]

    def ratio(a, b):
        return f"{a / b:.2f}x" if a is not None and b else "n/a"

    def fmt(v):
        return "n/a" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")

    summary = {}
    lines = [
        "| metric | unit | direct | haproxy | ringpeer | ringpeer/haproxy | haproxy/direct | ringpeer/direct |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, test, key, unit, relay_only in metrics:
        v = {p: med(p, test, key) for p in PATHS}
        summary[label] = {"unit": unit, **v}
        d = "-" if relay_only else fmt(v["direct"])
        hd = "-" if relay_only else ratio(v["haproxy"], v["direct"])
        rd = "-" if relay_only else ratio(v["ringpeer"], v["direct"])
        lines.append(f"| {label} | {unit} | {d} | {fmt(v['haproxy'])} | {fmt(v['ringpeer'])} | "
                     f"{ratio(v['ringpeer'], v['haproxy'])} | {hd} | {rd} |")
    n = max((f["run"] for f in per_run), default=0)
    machine = dict(l.split(": ", 1) for l in (out / "machine.txt").read_text().splitlines() if ": " in l)
    print(f"# Side-by-side: direct TCP, haproxy chain, ringpeer ({machine.get('date', '?')})\n")
    for k in ["commit", "kernel", "cpu", "ringpeer", "quiet"]:
        print(f"- {k}: {machine.get(k, '?')}")
    print()
    print(f"Medians over {n} runs (relay CPU: utime+stime of the relay processes; "
          "'-' where direct TCP has no relay).\n")
    print("\n".join(lines))

    # Per-relay CPU breakdown (median seconds per run, and per unit of work).
    print("\nRelay CPU by process (median over runs): CPU seconds during the run, "
          "and us per round trip (pp) or s per GiB (tp1, tp8).\n")
    print("| path | test | process | CPU s | per unit |")
    print("|---|---|---|---|---|")
    for path in ["haproxy", "ringpeer"]:
        for test in ["pp", "tp1", "tp8"]:
            figs = [f for f in per_run if f["path"] == path and f["test"] == test]
            if not figs:
                continue
            for proc in figs[0]["relay_ticks"]:
                secs = statistics.median(f["relay_ticks"][proc] / hz for f in figs)
                if test == "pp":
                    unit = statistics.median(f["relay_ticks"][proc] / hz * 1e6 / f["round_trips"] for f in figs)
                    u = f"{unit:.2f} us/rt"
                else:
                    unit = statistics.median(f["relay_ticks"][proc] / hz / (f["bytes"] / 2**30) for f in figs)
                    u = f"{unit:.3f} s/GiB"
                print(f"| {path} | {test} | {proc} | {secs:.2f} | {u} |")

    print("\nEvery run:\n")
    print("| run | path | test | quiet | load1 | round trips / GiB | p50 us | p99 us | p99.9 us | Gbit/s | relay CPU s | per unit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for f in sorted(per_run, key=lambda f: (f["test"], f["path"], f["run"])):
        q = "yes" if f["quiet_before"] and f["quiet_after"] else "NO"
        if f["test"] == "pp":
            print(f"| {f['run']} | {f['path']} | pp | {q} | {f['load1']} | {f['round_trips']} | {f['p50_us']:.1f} | "
                  f"{f['p99_us']:.1f} | {f['p999_us']:.1f} | - | {f['relay_cpu_s']:.2f} | {f['cpu_us_per_rt']:.2f} us/rt |")
        else:
            print(f"| {f['run']} | {f['path']} | {f['test']} | {q} | {f['load1']} | {f['bytes'] / 2**30:.2f} GiB | - | - | - | "
                  f"{f['gbps']:.2f} | {f['relay_cpu_s']:.2f} | {f['cpu_s_per_gib']:.3f} s/GiB |")
    syscall_table(out)
    if errors:
        print("\nRuns without figures:\n")
        for e in errors:
            print(f"- {e}")
    (out / "summary.json").write_text(json.dumps({"medians": summary, "runs": per_run, "errors": errors}, indent=1))


if __name__ == "__main__":
    main()
