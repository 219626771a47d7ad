#!/usr/bin/env python3
"""Markdown tables for BENCHMARKS.md from benchmark CSVs (gpu_bench example or the CLI).

  python3 bench/report.py table RESULT.csv          # one row per configuration
  python3 bench/report.py variants A.csv B.csv ...  # key configurations side by side
  python3 bench/report.py classes A.csv B.csv ...   # speed-up by row class, each vs the first
"""
import csv
import math
import sys

KEY = [("grid", 1, 4096, 16, 0), ("grid", 2, 4096, 16, 0), ("grid", 1, 4096, 64, 0),
       ("grid", 1, 4096, 128, 0), ("grid", 2, 4096, 128, 0), ("short", 1, 1024, 16, 0),
       ("imbalanced", 4, 0, 16, 0)]


def rows(path):
    with open(path) as f:
        return [r for r in csv.DictReader(f)]


def key(r):
    return (r["tag"], int(r["s_q"]), int(r["mean_sk"]), int(r["h_q"]), int(r["varlen"]))


def geomean(xs):
    xs = [x for x in xs if x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def table(path):
    print("| config (tag/s_q/mean/h_q/varlen) | b | ms | GB/s | TFLOPS | % copy ceiling | floor ms | FlashMLA ms | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows(path):
        sp = float(r["speedup"]) if r.get("speedup") else float("nan")
        print(f"| {'/'.join(map(str, key(r)))} | {r['b']} | {float(r['ms']):.4f} | {float(r['gbps']):.0f} | "
              f"{float(r['tflops']):.1f} | {float(r['pct_copy_ceiling']):.1f}% | {float(r['floor_ms']):.4f} | "
              f"{r.get('anchor_ms') or '-'} | {sp:.3f}x |")
    rs = rows(path)
    for tag in ("grid", "short", "imbalanced", "mtp"):
        s = [float(r["speedup"]) for r in rs if r["tag"] == tag and r.get("speedup")]
        if s:
            print(f"\n{tag}: geometric mean speed-up {geomean(s):.3f}x over {len(s)} configurations, "
                  f"{sum(x < 1 for x in s)} slower than FlashMLA")


def variants(paths):
    print("| config | " + " | ".join(p.split("/")[-1].replace(".csv", "") for p in paths) + " |")
    print("|---|" + "---:|" * len(paths))
    data = [{key(r): r for r in rows(p)} for p in paths]
    for k in KEY:
        cells = []
        for d in data:
            r = d.get(k)
            cells.append(f"{float(r['ms']):.4f} ms, {float(r['gbps']):.0f} GB/s, {float(r['tflops']):.0f} TF" if r else "-")
        print(f"| {'/'.join(map(str, k))} | " + " | ".join(cells) + " |")
    cells = []
    for d in data:
        s = [float(r["speedup"]) for k, r in d.items() if k[0] == "grid" and k[2] == 4096 and r.get("speedup")]
        cells.append(f"{geomean(s):.3f}x" if s else "-")
    print("| geomean vs FlashMLA, grid at mean 4096 (16 configs) | " + " | ".join(cells) + " |")


# Row classes (rows = s_q * h_q): the grid's memory-bound (<= 16, 32), one-tile (64) and
# compute-bound (>= 128) shapes, and every configuration beyond the grid.
def grid_rows(test):
    return lambda k: k[0] == "grid" and test(k[1] * k[3])


CLASSES = [("grid", grid_rows(lambda n: True)), ("<=16", grid_rows(lambda n: n <= 16)), ("32", grid_rows(lambda n: n == 32)),
           ("64", grid_rows(lambda n: n == 64)), (">=128", grid_rows(lambda n: n >= 128)), ("beyond", lambda k: k[0] != "grid")]


def classes(paths):
    """Geometric-mean speed-up over FlashMLA per row class, and each CSV's ratio to the first."""
    print("| csv | " + " | ".join(name for name, _ in CLASSES) + " |")
    print("|---|" + "---:|" * len(CLASSES))
    base = None
    for p in paths:
        d = {key(r): float(r["speedup"]) for r in rows(p) if r.get("speedup")}
        g = [geomean([v for k, v in d.items() if sel(k)]) for _, sel in CLASSES]
        cells = [f"{x:.3f}x" + (f" ({x / b - 1:+.1%})" if base else "") for x, b in zip(g, base or g)]
        base = base or g
        print(f"| {p.split('/')[-1].replace('.csv', '')} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    {"table": lambda: table(sys.argv[2]), "variants": lambda: variants(sys.argv[2:]), "classes": lambda: classes(sys.argv[2:])}[sys.argv[1]]()
