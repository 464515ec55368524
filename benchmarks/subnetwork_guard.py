"""A subnetwork that never hurts: many sparse dummies, a linear truth and a nonlinear one.

    python benchmarks/subnetwork_guard.py [--draws 3] [--train-rows 9000] [--epochs N]
        [--no-append]

Data (`problems.dummies_and_continuous`): 40 sparse 0/1 columns (each 1 in 2-20% of rows),
3 standard normal columns, 300 groups of lognormal size, offsets ~ N(0, 0.7^2), noise
N(0, 1), the same number of test rows as training rows. Linear truth: y is linear in the 43
columns plus the offset and the noise. Nonlinear truth: plus sin(2 c0) + 0.5 c1 c2. A new
draw (and random_state) per repetition; every method fits every draw, in turn.

Methods, all `RandomEffectsRegressor(group_cols=["g"])`:
- the linear mixed model at its defaults;
- `hidden_units=(64, 32)` at its defaults (the guard chooses the subnetwork's weight on 10%
  of the training rows; essentially binary columns stay out of the subnetwork);
- the same with `subnetwork_cols` = all 43 columns;
- both with the weight forced to 1 (the guard's choice replaced, as before it existed; SGD
  still trains on 90% of the rows).
"""

import argparse
import contextlib
import functools
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from problems import dummies_and_continuous  # noqa: E402
from results import append, markdown  # noqa: E402

import reffects.estimators  # noqa: E402
import reffects.training_recipe  # noqa: E402
from reffects import RandomEffectsRegressor  # noqa: E402

HIDDEN = (64, 32)
LINEAR = "linear mixed model (defaults)"


@contextlib.contextmanager
def weight_forced_to_one():
    """The estimator's guard with 1 as its only candidate weight, kept whatever its gain
    over w = 0 (the two-standard-error rule, `_clearly_better`, switched off)."""
    chooser = reffects.estimators.choose_subnetwork_weight
    clearly_better = reffects.training_recipe._clearly_better
    reffects.estimators.choose_subnetwork_weight = functools.partial(chooser, candidates=(1.0,))
    reffects.training_recipe._clearly_better = lambda *args: True
    try:
        yield
    finally:
        reffects.estimators.choose_subnetwork_weight = chooser
        reffects.training_recipe._clearly_better = clearly_better


def methods(columns, epochs=None):
    deep = (
        {"hidden_units": HIDDEN} if epochs is None else {"hidden_units": HIDDEN, "epochs": epochs}
    )
    every = {**deep, "subnetwork_cols": columns}
    return {
        LINEAR: ({}, False),
        "(64, 32), defaults (guarded)": (deep, False),
        "(64, 32), every column (guarded)": (every, False),
        "(64, 32), defaults, weight forced to 1": (deep, True),
        "(64, 32), every column, weight forced to 1": (every, True),
    }


def run(truth, args):
    results = []
    for draw in range(args.draws):
        X, y, X_test, y_test = dummies_and_continuous(
            args.train_rows, nonlinear=truth == "nonlinear", seed=draw
        )
        columns = [c for c in X.columns if c != "g"]
        linear_mse = None
        for name, (params, forced) in methods(columns, args.epochs).items():
            start = time.perf_counter()
            est = RandomEffectsRegressor(group_cols=["g"], random_state=draw, **params)
            with weight_forced_to_one() if forced else contextlib.nullcontext():
                est.fit(X, y)
            mse = float(np.mean((y_test - est.predict(X_test)) ** 2))
            seconds = time.perf_counter() - start
            linear_mse = mse if name == LINEAR else linear_mse
            results.append(
                {
                    "truth": truth,
                    "method": name,
                    "draw": draw,
                    "mse": mse,
                    "ratio": mse / linear_mse,
                    "weight": est.subnetwork_weight_,
                    "seconds": seconds,
                }
            )
            print(
                f"{truth} draw {draw} {name}: MSE {mse:.4f} ({mse / linear_mse:.3f} x linear), "
                f"w {est.subnetwork_weight_}, {seconds:.1f} s",
                flush=True,
            )
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--train-rows", type=int, default=9000)
    parser.add_argument("--epochs", type=int, default=None, help="default: the estimator's")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    frame = pd.DataFrame(run("linear", args) + run("nonlinear", args))
    table = (
        frame.groupby(["truth", "method"], sort=False)
        .agg(
            **{
                "held-out MSE (median)": ("mse", "median"),
                "MSE / linear (median)": ("ratio", "median"),
                "MSE / linear (each)": ("ratio", lambda r: " ".join(f"{v:.3f}" for v in r)),
                "weight w (each)": (
                    "weight",
                    lambda w: " ".join("" if pd.isna(v) else f"{v:g}" for v in w),
                ),
                "fit s (median)": ("seconds", "median"),
            }
        )
        .reset_index()
    )
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(table.to_string(index=False, float_format="{:.4f}".format))
    if not args.no_append:
        append(
            "A subnetwork that never hurts: sparse dummies, linear and nonlinear truth",
            markdown(table, "{:.4f}"),
            f"{args.draws} draws of {args.train_rows:,} training and as many test rows; every "
            "method fits every draw, the methods in turn. 'weight w' is `subnetwork_weight_` "
            "(0: the linear mixed model). Goal: every defaults row at most the linear mixed "
            "model's held-out MSE (within noise on the linear truth).",
        )


if __name__ == "__main__":
    main()
