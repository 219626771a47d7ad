#!/usr/bin/env python3
"""Where a kernel's warps spend their time, from Nsight Compute's PC sampling.

  ncu -i REPORT.ncu-rep --page source --print-source sass --csv > SASS.csv
  python3 bench/ncu_samples.py SASS.csv [--top N]

Prints the share of all warp samples by SASS opcode, by mbarrier wait site (an out-of-line
retry loop, with the samples of the inline tests' branches into it) and the N
instructions with the most samples. BENCHMARKS.md's per-phase counts (rows 8, 12, 18) are
sums of these.
"""
import csv
import sys


def load(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    # Line 1 names the kernel; line 2 is the header.
    head = rows[1]
    a, src, n = head.index("Address"), head.index("Source"), head.index("Warp Stall Sampling (All Samples)")
    out = []
    for r in rows[2:]:
        if len(r) <= max(a, src, n):
            continue
        out.append((int(r[a], 16), r[src].strip(), int(r[n] or 0)))
    return rows[0][1] if len(rows[0]) > 1 else "?", out


def opcode(src):
    words = src.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else "?"


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    top = int(argv[argv.index("--top") + 1]) if "--top" in argv else 20
    name, ins = load(argv[0])
    total = sum(n for _, _, n in ins) or 1
    pct = lambda n: f"{100 * n / total:5.1f}%"
    print(f"{name}: {total} samples over {len(ins)} instructions")

    by_op = {}
    for _, s, n in ins:
        op = opcode(s)
        by_op[op] = by_op.get(op, 0) + n
    print("\nby opcode:")
    for op, n in sorted(by_op.items(), key=lambda x: -x[1])[:12]:
        print(f"  {pct(n)}  {op}")

    # mbarrier waits: ptxas emits a first test inline, then a predicated branch to an
    # out-of-line retry loop (a SYNCS test and a branch back). A wait site is such a loop:
    # its own samples (once) plus those of every branch into it, named by the first branch.
    index = {addr: i for i, (addr, _, _) in enumerate(ins)}
    sites = {}  # retry loop's index -> [samples, first branch's index, its address]
    for i, (addr, s, n) in enumerate(ins):
        if opcode(s) != "BRA" or not s.startswith("@"):
            continue
        try:
            j = index[int(s.split()[-1].rstrip(";"), 16)]
        except (ValueError, KeyError):
            continue
        body = ins[j : j + 4]
        if j > i and any(opcode(b) == "SYNCS" for _, b, _ in body):
            site = sites.setdefault(j, [sum(m for _, _, m in body), i, addr])
            site[0] += n
    print("\nmbarrier wait sites (branch to the retry loop: share, instruction index, address):")
    for n, i, addr in sorted(sites.values(), reverse=True)[:12]:
        print(f"  {pct(n)}  #{i:<5d} 0x{addr:x}")

    print(f"\ntop {top} instructions:")
    for i, (addr, s, n) in sorted(enumerate(ins), key=lambda x: -x[1][2])[:top]:
        print(f"  {pct(n)}  #{i:<5d} 0x{addr:x}  {s[:80]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
