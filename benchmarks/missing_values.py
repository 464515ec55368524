"""Missing feature values: the estimators' latent-variable model against imputation by hand.

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
  models the missing values as latent (`reffects.imputation`: x1, x2, x3 jointly Normal,
  fitted by EM), fills each with its conditional mean given the row's x2 and x3, adds the
  indicator column `x1[missing]`, and gives the rows with x1 missing a noise variance of
  their own (a ratio to the complete rows', estimated with the fit), which widens their
  predictive intervals;
- mean fill + indicator (by hand): x1's missing values filled with its training mean and
  the indicator added as a column before the fit and at predict (the estimator's handling
  before the latent-variable model);
- mean imputation: x1's missing values filled with its training mean, no indicator.

Reported: medians over the draws of held-out MSE on held-out rows with the same
missingness ("rows with NaN") and on the complete held-out rows ("complete rows": the same
rows before removal, which shows what the missing values did to the estimates); the
estimated noise sd (truth 0.5); and the share of held-out y inside the 90% predictive
interval (`predict_interval`), on the rows with a missing x1 and on the others.
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


def coverage(est, frame, y, rows):
    """The share of `y[rows]` inside `est`'s 90% predictive intervals of `frame`'s rows."""
    lower, upper = est.predict_interval(frame)
    inside = (y >= lower) & (y <= upper)
    return float(np.mean(inside[rows])), float(np.mean(inside[~rows]))


def run_once(num_rows, mechanism, seed):
    """Per method: (MSE on rows with NaN, MSE on complete rows, fit s, noise sd, 90%
    coverage on rows with a missing x1, on the others); and ours' indicator coefficient."""
    (train, train_full, y), (test, test_full, y_test) = simulate(num_rows, mechanism, seed)
    missing = test["x1"].isna().to_numpy()
    results = {}

    def fit(frame):
        start = time.perf_counter()
        est = RandomEffectsRegressor(group_cols=["g"], random_state=seed).fit(frame, y)
        return est, time.perf_counter() - start

    def score(est, seconds, with_nan, complete):
        with_nan_mse = np.nan if with_nan is None else mse(y_test, est.predict(with_nan))
        covered = (np.nan, np.nan) if with_nan is None else coverage(est, with_nan, y_test, missing)
        return (
            with_nan_mse,
            mse(y_test, est.predict(complete)),
            seconds,
            est.noise_scale_,
            *covered,
        )

    complete, seconds = fit(train_full)
    results["complete data"] = score(complete, seconds, None, test_full)

    ours, seconds = fit(train)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # x1 had missing values in fit
        results["reffects (NaN in X)"] = score(ours, seconds, test, test_full)

    fill = train["x1"].mean()

    def by_hand(frame):
        flagged = frame.assign(x1_missing=frame["x1"].isna().astype(float))
        return flagged.fillna({"x1": fill})

    flagged, seconds = fit(by_hand(train))
    results["mean fill + indicator (by hand)"] = score(
        flagged, seconds, by_hand(test), by_hand(test_full)
    )
    imputed, seconds = fit(train.fillna({"x1": fill}))
    results["mean imputation"] = score(imputed, seconds, test.fillna({"x1": fill}), test_full)
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
            for method, values in results.items():
                with_nan, complete_rows, seconds, noise, covered, covered_rest = values
                records.append(
                    {
                        "missingness": mechanism,
                        "method": method,
                        "held-out MSE, rows with NaN": with_nan,
                        "held-out MSE, complete rows": complete_rows,
                        "noise sd": noise,
                        "90% coverage, x1 missing": covered,
                        "90% coverage, x1 observed": covered_rest,
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
        "fit is scored on complete rows only. 'noise sd': `noise_scale_` (truth 0.5). "
        "'90% coverage': the share of held-out y inside `predict_interval(level=0.9)` on the "
        "held-out rows with NaN, split by whether x1 is missing. Machine: the shared 2-core "
        "development VM."
    )
    if not args.no_append:
        append("Missing feature values: latent inputs against imputation by hand", text, notes)


if __name__ == "__main__":
    main()
