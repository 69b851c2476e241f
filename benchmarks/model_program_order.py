"""A list-scheduling model of the fused kernels' program order (issue 10, no GPU needed).

Programs are dispatched in grid order to the first free slot of `sms` x `ctas` slots; a
program's cost is the key (forward, dQ) or query (dK/dV) tiles it walks, plus 2 for its loads and
stores. Printed: the makespan of each order as a multiple of the ideal (total cost / slots), for
the old block-fastest 2-D grid ("rows") and for LPT sections as _program_tile orders them.

usage: python3 benchmarks/model_program_order.py [--sms 132] [--l2-mb 50]
"""
from __future__ import annotations

import argparse
import heapq

SHAPES = [(8, 32, 8, 1024, 128, 32), (8, 32, 8, 4096, 128, 32), (4, 32, 8, 4096, 128, 256),
          (16, 16, 16, 1024, 64, 16), (1, 32, 8, 16384, 128, 64), (8, 32, 4, 1024, 64, 32),
          (2, 32, 4, 4096, 64, 128)]


def cdiv(a, b):
    return -(-a // b)


def makespan(costs, slots):
    free = [0.0] * slots
    end = 0.0
    for cost in costs:
        start = heapq.heappop(free)
        end = max(end, start + cost)
        heapq.heappush(free, start + cost)
    return end


def lpt_order(block_costs, rows, l2_rows, min_programs):
    """_program_tile's order: sections of rows, block-major, blocks in the given (LPT) order."""
    section = min(max(l2_rows, cdiv(min_programs, len(block_costs))), rows)
    section = cdiv(rows, cdiv(rows, section))
    ordered = block_costs
    out = []
    for first in range(0, rows, section):
        for cost in ordered:
            out += [cost] * min(section, rows - first)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--l2-mb", type=float, default=50)
    args = parser.parse_args(argv)
    budget = args.l2_mb * 1e6 / 2
    print(f"{'B,Hq,Hkv,S,D,P':>22}  {'kernel':>6}  {'rows':>6}  {'LPT':>6}   (makespan / ideal, {args.sms} SMs)")
    for b, h, hkv, s, d, p in SHAPES:
        group = h // hkv
        # forward / dQ: 128-query blocks over 64-key tiles, 2 CTAs per SM
        fwd = [cdiv(p, 64) + (m + 1) * 2 + 2 for m in range(cdiv(s, 128))]       # ascending (causal)
        # dK/dV: 128-key blocks over 64-query tiles of every head of the group, 1 CTA per SM;
        # 2 prefix programs of half the queries each, then own blocks longest first
        dkdv = [group * (s // 2) // 64 + 2] * (cdiv(p, 128) * 2) + \
               [group * ((s - n * 128) // 64) + 2 for n in range(cdiv(s, 128))]
        for name, costs, lpt, rows, row_bytes, ctas in (
                ("fwd", fwd, fwd[::-1], b * h, 2 * s * d * 2 / group, 2),
                ("dkdv", dkdv, dkdv, b * hkv, 2 * group * s * d * 2, 1)):
            slots = args.sms * ctas
            old = [c for _ in range(rows) for c in costs]
            new = lpt_order(lpt, rows, max(1, int(budget // row_bytes)), 4 * args.sms)
            ideal = sum(old) / slots
            print(f"{','.join(map(str, (b, h, hkv, s, d, p))):>22}  {name:>6}  "
                  f"{makespan(old, slots) / ideal:6.3f}  {makespan(new, slots) / ideal:6.3f}")


if __name__ == "__main__":
    main()
