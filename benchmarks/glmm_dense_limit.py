"""Where a GLMM's sparse working systems overtake the dense ones (`finish.GLMM_DENSE_LEVELS`).

    python benchmarks/glmm_dense_limit.py [--levels 400 1000 1500] [--repeats 3]

Poisson counts on 6,000 rows: log rate 0.2 + 0.5 x plus random intercepts of three crossed
factors, 3,000 levels, `--levels` levels (one problem each) and 30 levels, so that the
columns beside the largest factor number about the second factor's levels + 32. On each
problem `finish.GeneralizedMixedModel.fit` (glmer's two stages; the estimator's SGD and
encoding are left out) runs with dense working systems (the limit raised past the problem)
and with sparse ones (the limit lowered below it), in turn, `--repeats` times; medians, and
the largest difference in theta between the two paths (they optimise one function).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from results import append, markdown  # noqa: E402

import reffects.finish  # noqa: E402
from reffects.likelihoods import get_likelihood  # noqa: E402


def problem(second, rows=6000, seed=7):
    rng = np.random.default_rng(seed)
    levels = [3000, second, 30]
    codes = [rng.integers(0, g, rows) for g in levels]
    x = rng.normal(size=rows)
    log_rate = 0.2 + 0.5 * x
    for c, g, sd in zip(codes, levels, (0.6, 0.4, 0.3)):
        log_rate = log_rate + rng.normal(0.0, sd, g)[c]
    y = rng.poisson(np.exp(log_rate)).astype("float64")
    return y, np.column_stack([np.ones(rows), x]), codes, levels


def fit(y, design, codes, levels, sparse):
    reffects.finish.GLMM_DENSE_LEVELS = 0 if sparse else 10**9
    model = reffects.finish.GeneralizedMixedModel(
        get_likelihood("poisson"), y, np.ones(len(y)), design, codes, levels,
        np.zeros(2), np.zeros(2), 0.0,
    )  # fmt: skip
    assert model.sparse == sparse
    start = time.perf_counter()
    theta, _, _ = model.fit(np.ones(3), [np.zeros((g, 1)) for g in levels], np.zeros(2))
    return time.perf_counter() - start, theta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[400, 1000, 1500])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    limit = reffects.finish.GLMM_DENSE_LEVELS
    rows = []
    try:
        for second in args.levels:
            y, design, codes, levels = problem(second)
            columns = reffects.finish.dense_coefficients(levels, [1, 1, 1], 2)
            seconds, thetas = {False: [], True: []}, {}
            for _ in range(args.repeats):
                for sparse in (False, True):
                    spent, thetas[sparse] = fit(y, design, codes, levels, sparse)
                    seconds[sparse].append(spent)
            dense, sparse = np.median(seconds[False]), np.median(seconds[True])
            rows.append(
                {
                    "second factor's levels": second,
                    "columns beside the largest": columns,
                    "dense s (median)": dense,
                    "sparse s (median)": sparse,
                    "sparse / dense": sparse / dense,
                    "max |theta difference|": float(np.max(np.abs(thetas[True] - thetas[False]))),
                }
            )
            print(rows[-1], flush=True)
    finally:
        reffects.finish.GLMM_DENSE_LEVELS = limit
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if not args.no_append:
        append(
            "GLMM dense or sparse working systems",
            markdown(table, "{:.3g}"),
            f"Poisson, 6,000 rows, crossed factors of 3,000 / the row's / 30 levels, 2 fixed "
            f"effects; `GeneralizedMixedModel.fit` alone, each path {args.repeats} times in "
            f"turn. The package's limit: {limit} columns.",
        )


if __name__ == "__main__":
    main()
