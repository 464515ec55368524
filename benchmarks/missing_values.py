"""Missing feature values: the estimators' fill plus indicator against mean imputation.

    python benchmarks/missing_values.py [--rows 5000] [--repeats 5] [--no-append]

Simulated linear mixed model (`simulate`): 50 groups (offsets sd 0.5), three features,
x1 and x2 correlated (rho 0.5), x3 independent, y = 1 + x1 + 0.5 x2 + 0.3 x3 + b[g] + e
(noise sd 0.5). 20% of x1's values are removed, in the training rows and in held-out rows
from the same groups alike:

- MCAR: each value with probability 0.2;
- MAR: with probability sigmoid(a + 3 x2), a set so that 20% are removed: missingness
  depends on the observed x2, so the missing x1 are mostly large ones.

Methods, each `RandomEffectsRegressor(group_cols=["g"])` at its defaults (no SGD: the exact
finish), fitted once per draw, in turn, on the same rows:

- complete data: the fit before any value is removed, scored on the complete held-out
  rows (the floor for the missing-data methods);
- reffects (NaN in X): the rows as they are, NaN where a value is missing; the estimator
  fills it with the training mean and adds the indicator column `x1[missing]`;
- mean imputation: x1's missing values filled with its training mean before the fit and at
  predict, no indicator.

Reported: medians over the draws of held-out MSE on held-out rows with the same
missingness ("rows with NaN") and on the complete held-out rows ("complete rows": the same
rows before removal, which shows what the missing values did to the estimates).
"""

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from results import append, markdown  # noqa: E402
from scipy.optimize import brentq  # noqa: E402
from scipy.special import expit  # noqa: E402

from reffects import RandomEffectsRegressor  # noqa: E402

SHARE_MISSING = 0.2
NUM_GROUPS = 50


def simulate(num_rows, mechanism, seed, rho=0.5):
    """Training and held-out frames (x1 with NaN), their complete versions, and y's."""
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0.0, 0.5, NUM_GROUPS)

    def rows(n):
        g = rng.integers(0, NUM_GROUPS, n)
        x2 = rng.normal(size=n)
        x1 = rho * x2 + np.sqrt(1 - rho**2) * rng.normal(size=n)
        x3 = rng.normal(size=n)
        y = 1 + x1 + 0.5 * x2 + 0.3 * x3 + offsets[g] + rng.normal(0.0, 0.5, n)
        if mechanism == "MCAR":
            p = np.full(n, SHARE_MISSING)
        else:
            shift = brentq(lambda a: expit(a + 3 * x2).mean() - SHARE_MISSING, -20, 20)
            p = expit(shift + 3 * x2)
        complete = pd.DataFrame({"g": g, "x1": x1, "x2": x2, "x3": x3})
        missing = complete.assign(x1=np.where(rng.random(n) < p, np.nan, x1))
        return missing, complete, y

    return rows(num_rows), rows(num_rows)


def mse(y, prediction):
    return float(np.mean((y - prediction) ** 2))


def run_once(num_rows, mechanism, seed):
    (train, train_full, y), (test, test_full, y_test) = simulate(num_rows, mechanism, seed)
    results = {}

    def fit(frame):
        start = time.perf_counter()
        est = RandomEffectsRegressor(group_cols=["g"], random_state=seed).fit(frame, y)
        return est, time.perf_counter() - start

    complete, seconds = fit(train_full)
    score = mse(y_test, complete.predict(test_full))
    results["complete data"] = (np.nan, score, seconds)

    ours, seconds = fit(train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # x1 had missing values in fit: no warning expected
        results["reffects (NaN in X)"] = (
            mse(y_test, ours.predict(test)),
            mse(y_test, ours.predict(test_full)),
            seconds,
        )

    fill = train["x1"].mean()
    imputed, seconds = fit(train.fillna({"x1": fill}))
    results["mean imputation"] = (
        mse(y_test, imputed.predict(test.fillna({"x1": fill}))),
        mse(y_test, imputed.predict(test_full)),
        seconds,
    )
    indicator = float(ours.coef_[list(ours.feature_names_).index("x1[missing]")])
    return results, indicator


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=5000, help="training (and held-out) rows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)

    records = []
    for mechanism in ("MCAR", "MAR"):
        for seed in range(args.repeats):
            results, indicator = run_once(args.rows, mechanism, seed)
            for method, (with_nan, complete_rows, seconds) in results.items():
                records.append(
                    {
                        "missingness": mechanism,
                        "method": method,
                        "held-out MSE, rows with NaN": with_nan,
                        "held-out MSE, complete rows": complete_rows,
                        "x1[missing] coef": indicator if method.startswith("reffects") else None,
                        "fit s": seconds,
                    }
                )
    frame = pd.DataFrame(records)
    table = (
        frame.groupby(["missingness", "method"], sort=False).median(numeric_only=True).reset_index()
    )
    text = markdown(table)
    print(text)
    notes = (
        f"{args.rows:,} training and {args.rows:,} held-out rows, {NUM_GROUPS} groups, "
        f"{SHARE_MISSING:.0%} of x1 removed (MCAR: at random; MAR: more often where x2 is "
        f"large, x1 and x2 correlated 0.5); medians over {args.repeats} draws, each method "
        "fitted once per draw in turn. 'rows with NaN': held-out rows with the same "
        "missingness; 'complete rows': the same held-out rows before removal. The complete-data "
        "fit is scored on complete rows only. Machine: the shared 2-core development VM."
    )
    if not args.no_append:
        append("Missing feature values: fill and indicator against mean imputation", text, notes)


if __name__ == "__main__":
    main()
