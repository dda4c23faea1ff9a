#!/usr/bin/env python3
"""Summary of perf/before-after.sh results.

Reads OUTDIR/{before,after}-N.json (ringpeer bench reports; each figure is
already the median of that bench's --runs) and OUTDIR/{before,after}-N.time
(GNU time: wall user sys). Prints, per path, the median over rounds with its
min-max for before and after, the after/before ratio of the medians and the
min-max of the per-round (paired) ratios.

Usage: perf/before_after_summary.py OUTDIR
"""
import json
import re
import statistics
import sys
from pathlib import Path

DRIFT = 0.10  # flag direct-TCP medians that differ by more than this

PATH_METRICS = [
    # label, getter, unit, better
    ("p50 one-way", lambda p: p["one_way"]["p50_us"], "us", "lower"),
    ("p99 one-way", lambda p: p["one_way"]["p99_us"], "us", "lower"),
    ("p99.9 one-way", lambda p: p["one_way"]["p999_us"], "us", "lower"),
    ("bulk 1 stream", lambda p: p["bulk_gbps"], "Gbit/s", "higher"),
    ("bulk 16 streams", lambda p: p["bulk16_gbps"], "Gbit/s", "higher"),
    ("setup rate", lambda p: p["setup_per_s"], "/s", "higher"),
]
DIRECT_BLOCKING = [
    ("blocking p50 one-way", lambda p: p["p50_us"], "us", "lower"),
    ("blocking p99 one-way", lambda p: p["p99_us"], "us", "lower"),
]
RATIO_KEYS = [("p50", "p50", "lower"), ("p99", "p99", "lower"), ("p99.9", "p999", "lower"),
              ("bulk 1x", "bulk", "higher"), ("bulk 16x", "bulk16", "higher"),
              ("setup", "setup", "higher")]


def load(out):
    sides = {"before": {}, "after": {}}
    for f in sorted(out.glob("*-*.json")):
        m = re.fullmatch(r"(before|after)-(\d+)\.json", f.name)
        if not m:
            continue
        try:
            rep = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            print(f"! {f.name}: unreadable ({e})")
            continue
        t = out / f"{m[1]}-{m[2]}.time"
        cpu = wall = None
        if t.exists():
            # GNU time may put "Command exited with non-zero status" first.
            last = t.read_text().strip().splitlines()[-1].split()
            wall, cpu = float(last[0]), float(last[1]) + float(last[2])
        sides[m[1]][int(m[2])] = {"rep": rep, "cpu": cpu, "wall": wall}
    return sides


def fmt(v):
    if v is None:
        return "-"
    a = abs(v)
    return f"{v:.0f}" if a >= 1000 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"


def row(label, unit, better, b_vals, a_vals, paired):
    def stat(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return None, "-"
        return statistics.median(vals), f"{fmt(min(vals))}-{fmt(max(vals))}"
    bm, br = stat(b_vals)
    am, ar = stat(a_vals)
    ratio = am / bm if bm and am is not None else None
    pr = [a / b for b, a in paired if a is not None and b]
    prs = f"{min(pr):.2f}-{max(pr):.2f}" if pr else "-"
    rs = f"{ratio:.2f}x" if ratio is not None else "-"
    name = f"{label} ({unit}, {better} better)"
    print(f"  {name:<40} {fmt(bm):>8} {br:>17} {fmt(am):>8} {ar:>17} {rs:>7} {prs:>11}")
    return ratio


def header():
    print(f"  {'metric':<40} {'before':>8} {'(min-max)':>17} {'after':>8} {'(min-max)':>17} "
          f"{'a/b':>7} {'per-round':>11}")


def section(title, sides, rounds, metrics, getter):
    print(title)
    header()
    out = {}
    for label, get, unit, better in metrics:
        vals = {}
        for s in ("before", "after"):
            vals[s] = {}
            for n in rounds:
                r = sides[s].get(n)
                try:
                    vals[s][n] = get(getter(r)) if r else None
                except (KeyError, TypeError):
                    vals[s][n] = None
        paired = [(vals["before"][n], vals["after"][n]) for n in rounds]
        out[label] = row(label, unit, better, list(vals["before"].values()),
                         list(vals["after"].values()), paired)
    print()
    return out


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    sides = load(out)
    rounds = sorted(set(sides["before"]) | set(sides["after"]))
    if not rounds:
        sys.exit(f"no before-N.json / after-N.json in {out}")
    machine = out / "machine.txt"
    if machine.exists():
        for line in machine.read_text().splitlines():
            if line.split(":")[0] in ("date", "before", "after", "kernel", "cpu"):
                print(line)
    nb, na = len(sides["before"]), len(sides["after"])
    rep0 = next(iter((sides["before"] or sides["after"]).values()))["rep"]
    print(f"rounds: {len(rounds)} (before ok: {nb}, after ok: {na}); each bench --runs "
          f"{rep0.get('runs')} --iters {rep0.get('iters')} --size {rep0.get('size')} "
          f"--bulk-mib {rep0.get('bulk_mib')} (shards {rep0.get('shards')}, h2 {rep0.get('h2')})")
    print("figures: median over rounds of each bench's medians; (min-max) over rounds;")
    print("a/b = after median / before median; per-round = min-max of after_N / before_N")
    print()

    section("two-proxy path: client->A->peer->B->agent->target (mTLS)", sides, rounds,
            PATH_METRICS, lambda r: r["rep"]["two_proxy"])
    section("one-proxy path: client->B->agent->target (mTLS)", sides, rounds,
            PATH_METRICS, lambda r: r["rep"]["proxy"])
    section("whole bench process (all paths, incl. direct)", sides, rounds,
            [("CPU user+sys", lambda r: r["cpu"], "s", "lower"),
             ("wall", lambda r: r["wall"], "s", "lower")], lambda r: r)
    section("normalized to the same run's direct TCP (two-proxy/direct, bench's own ratio)",
            sides, rounds,
            [(f"{k} ratio", (lambda key: lambda p: p[key])(j), "x", b) for k, j, b in RATIO_KEYS],
            lambda r: r["rep"]["ratio_two_proxy"])
    section("normalized to the same run's direct TCP (one-proxy/direct, bench's own ratio)",
            sides, rounds,
            [(f"{k} ratio", (lambda key: lambda p: p[key])(j), "x", b) for k, j, b in RATIO_KEYS],
            lambda r: r["rep"]["ratio"])
    d = section("control: direct TCP, glommio client (same code in both; drift check)", sides,
                rounds, PATH_METRICS, lambda r: r["rep"]["direct"])
    d.update(section("control: direct TCP, blocking client+echo", sides, rounds,
                     DIRECT_BLOCKING, lambda r: r["rep"]["direct_blocking"]))
    drift = [f"{k} {v:.2f}x" for k, v in d.items() if v is not None and abs(v - 1) > DRIFT]
    if drift:
        print(f"DRIFT: direct TCP differs by more than {DRIFT:.0%} between before and after runs: "
              + ", ".join(drift) + " -- treat differences of that size on the proxy paths as noise.")
    else:
        print(f"drift check: every direct TCP median within {DRIFT:.0%} between before and after runs.")

    # Errors / warnings printed by the benches.
    esc = re.compile(r"\x1b\[[0-9;]*m")
    for f in sorted(out.glob("*-*.log")):
        bad = [esc.sub("", l) for l in f.read_text(errors="replace").splitlines()
               if re.search(r"\b(WARN|ERROR)\b|panick", esc.sub("", l))]
        rc = (out / f.name.replace(".log", ".rc"))
        rcv = rc.read_text().strip() if rc.exists() else "?"
        if bad or rcv != "0":
            print(f"{f.name}: exit {rcv}, {len(bad)} WARN/ERROR lines"
                  + (f"; first: {bad[0][:200]}" if bad else ""))


if __name__ == "__main__":
    main()
