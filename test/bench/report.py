#!/usr/bin/env python3
"""Parsing and reporting for compare.sh.

  report.py wrk FILE TICKS CLK_TCK DURATION   one wrk output -> tab-separated figures
  report.py line RESULTS                       the last result, one short line
  report.py table RESULTS                      human-readable tables
  report.py markdown RESULTS                   the same as Markdown
  report.py check RESULTS                      exit 1 if any run had errors

RESULTS is the tab-separated file compare.sh writes (a header line, then one line per run).
"""

import csv
import re
import sys

UNITS_US = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0, "m": 60_000_000.0}


def parse_wrk(path, ticks, clk_tck, duration):
    text = open(path, encoding="utf-8", errors="replace").read()

    m = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m),", text, re.M)
    if not m:
        raise SystemExit(f"{path}: no request count in wrk output")
    requests = int(m.group(1))
    elapsed = float(m.group(2)) * UNITS_US[m.group(3)] / 1e6

    m = re.search(r"^Requests/sec:\s*([\d.]+)", text, re.M)
    if not m:
        raise SystemExit(f"{path}: no Requests/sec in wrk output")
    rps = float(m.group(1))

    m = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    if not m:
        raise SystemExit(f"{path}: no 99% latency (was --latency given?)")
    p99_us = float(m.group(1)) * UNITS_US[m.group(2)]

    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    non2xx = int(m.group(1)) if m else 0

    m = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    sock = sum(int(g) for g in m.groups()) if m else 0

    cpu_s = int(ticks) / int(clk_tck)
    cpu_us_per_req = cpu_s * 1e6 / requests if requests else 0.0
    cpu_pct = 100.0 * cpu_s / (elapsed or float(duration))
    print("\t".join([
        str(requests), f"{rps:.0f}", f"{p99_us:.0f}", f"{cpu_us_per_req:.2f}",
        f"{cpu_pct:.0f}", str(non2xx), str(sock)]))


def load(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def fmt_latency(us):
    us = float(us)
    if us >= 1_000_000:
        return f"{us / 1e6:.2f} s"
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.0f} us"


def fmt_rps(rps):
    return f"{float(rps):,.0f}"


def errors(r):
    return int(r["non2xx"]) + int(r["sock_errors"])


def run_rows(rows):
    head = ["proxy", "mode", "conns", "req/s", "p99", "CPU us/req", "proxy CPU %",
            "non-2xx", "socket err"]
    body = []
    for r in rows:
        body.append([
            r["proxy"], r["mode"], r["conns"], fmt_rps(r["rps"]), fmt_latency(r["p99_us"]),
            f"{float(r['cpu_us_per_req']):.1f}", r["cpu_pct"], r["non2xx"], r["sock_errors"]])
    return head, body


def ratio_rows(rows):
    """breakwater / nginx for each (mode, conns) where both ran."""
    by = {(r["proxy"], r["mode"], r["conns"]): r for r in rows}
    head = ["mode", "conns", "req/s ratio (>1 better)", "p99 ratio (<1 better)",
            "CPU/req ratio (<1 better)"]
    body = []
    for r in rows:
        if r["proxy"] != "breakwater":
            continue
        n = by.get(("nginx", r["mode"], r["conns"]))
        if not n:
            continue

        def ratio(key):
            a, b = float(r[key]), float(n[key])
            return f"{a / b:.2f}" if b else "n/a"

        body.append([r["mode"], r["conns"], ratio("rps"), ratio("p99_us"),
                     ratio("cpu_us_per_req")])
    return head, body


def numeric(cell):
    return bool(re.match(r"^[\d,.]+( (us|ms|s))?$", cell))


def print_text(head, body):
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    def line(cells):
        out = []
        for i, c in enumerate(cells):
            out.append(str(c).rjust(widths[i]) if i > 0 and numeric(str(c)) or
                       (i > 0 and c == head[i] and i >= 2) else str(c).ljust(widths[i]))
        return "  ".join(out).rstrip()
    print(line(head))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print(line(b))


def print_markdown(head, body):
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|")
    for b in body:
        print("| " + " | ".join(str(c) for c in b) + " |")


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    cmd = argv[1]
    if cmd == "wrk":
        parse_wrk(*argv[2:6])
        return 0
    rows = load(argv[2])
    if cmd == "line":
        r = rows[-1]
        print(f"{fmt_rps(r['rps'])} req/s, p99 {fmt_latency(r['p99_us'])}, "
              f"{float(r['cpu_us_per_req']):.1f} CPU us/req ({r['cpu_pct']}% CPU), "
              f"non-2xx {r['non2xx']}, socket errors {r['sock_errors']}")
        return 0
    if cmd == "check":
        return 1 if any(errors(r) for r in rows) else 0
    show = print_text if cmd == "table" else print_markdown
    show(*run_rows(rows))
    head, body = ratio_rows(rows)
    if body:
        print()
        if cmd == "table":
            print("breakwater / nginx")
        else:
            print("**breakwater / nginx**")
            print()
        show(head, body)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
