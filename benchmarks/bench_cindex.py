"""Time steph's Harrell C-index against scikit-survival's on the same synthetic inputs.

    python benchmarks/bench_cindex.py [--sizes 1000 10000 50000] [--repeats 3]

For each size: synthetic integer-day survival times (so tied times occur), ~40 % events,
continuous risks with some exactly tied values; both implementations run on the same
arrays, the best of ``--repeats`` wall times is reported, and the values and pair counts
are checked to be identical. scikit-survival (GPL) is a dev-only dependency and is only
imported here and in the tests.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from steph.survival.metrics import concordance_index, concordance_index_details


def _best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _data(n: int, seed: int, event_rate: float):
    rng = np.random.default_rng(seed)
    t = np.round(rng.exponential(1000.0, size=n))  # integer days -> tied times
    e = rng.random(n) < event_rate
    risk = -t / 1000.0 + rng.normal(size=n)
    tied = rng.random(n) < 0.1
    risk[tied] = np.round(risk[tied])  # ~10 % of the risks on a few exact levels
    return t, e, risk


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    p.add_argument("--repeats", type=int, default=3, help="best of N runs (default 3)")
    p.add_argument("--sksurv-repeats", type=int, default=1, help="best of N sksurv runs (slow)")
    p.add_argument("--event-rate", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-sksurv", action="store_true", help="time steph only")
    args = p.parse_args(argv)

    sk_cindex = None
    if not args.no_sksurv:
        try:
            from sksurv.metrics import concordance_index_censored as sk_cindex
        except ImportError:
            print("scikit-survival not installed: timing steph only", file=sys.stderr)

    header = f"{'n':>8} {'steph (s)':>10} {'sksurv (s)':>11} {'speed-up':>9} {'C-index':>10}  equal"
    print(header)
    print("-" * len(header))
    ok = True
    for n in args.sizes:
        t, e, r = _data(n, args.seed, args.event_rate)
        concordance_index(t[:50], e[:50] | (np.arange(50) == 0), r[:50])  # warm-up
        ours_s, ours = _best_time(
            lambda t=t, e=e, r=r: concordance_index_details(t, e, r), args.repeats
        )
        if sk_cindex is None:
            print(f"{n:>8} {ours_s:>10.4f} {'-':>11} {'-':>9} {ours.cindex:>10.6f}  -")
            continue
        sk_s, sk = _best_time(lambda t=t, e=e, r=r: sk_cindex(e, t, r), args.sksurv_repeats)
        equal = ours.cindex == sk[0] and (
            ours.concordant,
            ours.discordant,
            ours.tied_risk,
            ours.tied_time,
        ) == tuple(int(x) for x in sk[1:])
        ok &= bool(equal)
        print(
            f"{n:>8} {ours_s:>10.4f} {sk_s:>11.4f} {sk_s / ours_s:>8.0f}x {ours.cindex:>10.6f}  "
            f"{'yes' if equal else 'NO'}"
        )
    if not ok:
        print("MISMATCH between steph and scikit-survival", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
