"""Linear mixed model at scale: reffects defaults vs statsmodels, mixedlm and GPBoost.

    pip install -r benchmarks/requirements.txt
    python benchmarks/lmm_tools.py [--rows 1000000] [--groups 125000] [--repeats 3] [--tools ...]

Simulated data with 10 features and skewed group sizes (the shared generator in
problems.py); 20% of rows held out at random plus every row of 2% of the groups, so the
held-out MSE covers seen and unseen groups. Each tool fits `--repeats` times, the tools in
turn round by round in one process (a burst of load on a shared machine hits every tool
alike), and the table quotes the median time; it scores the last fit on sigma_group, the noise
scale, the coefficients and the held-out MSE (every fit of a tool is the same fit: reffects
keeps random_state=0). The reference for "vs REML" columns is the exact REML fit of mixedlm.
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
from problems import grouped_regression  # noqa: E402
from results import append, markdown  # noqa: E402

from reffects import RandomEffectsRegressor  # noqa: E402

FEATURES = [f"x{j}" for j in range(10)]


def split(num_rows, num_groups, seed=0):
    features, groups, y = grouped_regression(num_rows, num_groups, num_features=10, seed=seed)
    frame = pd.DataFrame(features, columns=FEATURES)
    frame.insert(0, "g", groups)
    rng = np.random.default_rng(seed + 1)
    unseen = rng.random(num_groups) < 0.02
    test = unseen[groups] | (rng.random(num_rows) < 0.2)
    return frame[~test], y[~test], frame[test], y[test]


def fit_reffects(X, y, X_test):
    est = RandomEffectsRegressor(group_cols=["g"], random_state=0).fit(X, y)
    return {
        "sigma_group": est.variance_components_["g"],
        "noise": est.noise_scale_,
        "coef": est.coef_,
        "prediction": est.predict(X_test),
    }


def fit_statsmodels(X, y, X_test):
    import statsmodels.api as sm

    design = sm.add_constant(X[FEATURES].to_numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = sm.MixedLM(y, design, groups=X["g"].to_numpy()).fit(reml=True)
    effects = pd.Series({k: np.asarray(v)[0] for k, v in result.random_effects.items()})
    offsets = X_test["g"].map(effects).fillna(0.0).to_numpy()
    return {
        "sigma_group": float(np.sqrt(np.asarray(result.cov_re)[0, 0])),
        "noise": float(np.sqrt(result.scale)),
        "coef": np.asarray(result.fe_params)[1:],
        "prediction": sm.add_constant(X_test[FEATURES].to_numpy()) @ result.fe_params + offsets,
    }


def fit_mixedlm(X, y, X_test):
    import mixedlm

    data = X.assign(y=y, g=X["g"].astype(str))
    result = mixedlm.lmer("y ~ " + " + ".join(FEATURES) + " + (1|g)", data, REML=True)
    fixed = result.fixef()
    test = X_test.assign(g=X_test["g"].astype(str))
    return {
        "sigma_group": float(result.VarCorr().groups["g"].stddev["(Intercept)"]),
        "noise": float(result.sigma),
        "coef": np.array([fixed[f] for f in FEATURES]),
        "prediction": np.asarray(result.predict(newdata=test, allow_new_levels=True)),
    }


def fit_gpboost(X, y, X_test):
    import gpboost as gpb

    model = gpb.GPModel(group_data=X["g"].to_numpy(), likelihood="gaussian")
    design = np.column_stack([np.ones(len(X)), X[FEATURES].to_numpy()])
    model.fit(y=y, X=design)
    variances = model.get_cov_pars().iloc[0]
    test_design = np.column_stack([np.ones(len(X_test)), X_test[FEATURES].to_numpy()])
    prediction = model.predict(
        group_data_pred=X_test["g"].to_numpy(), X_pred=test_design, predict_var=False
    )["mu"]
    return {
        "sigma_group": float(np.sqrt(variances["Group_1"])),
        "noise": float(np.sqrt(variances["Error_var"])),
        "coef": np.asarray(model.get_coef()).ravel()[1:],
        "prediction": np.asarray(prediction),
    }


TOOLS = {
    "mixedlm (REML)": fit_mixedlm,
    "GPBoost": fit_gpboost,
    "statsmodels MixedLM (REML)": fit_statsmodels,
    "reffects defaults": fit_reffects,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="before the hold-out")
    parser.add_argument("--groups", type=int, default=125_000)
    parser.add_argument("--repeats", type=int, default=3, help="fits per tool, in turn")
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS))
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    X, y, X_test, y_test = split(args.rows, args.groups)
    results, seconds = {}, {name: [] for name in args.tools}
    for _ in range(args.repeats):
        for name in args.tools:
            start = time.perf_counter()
            results[name] = TOOLS[name](X, y, X_test)
            seconds[name].append(time.perf_counter() - start)
            print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
    reference = results.get("mixedlm (REML)") or next(iter(results.values()))
    reference_mse = np.mean((y_test - reference["prediction"]) ** 2)
    table = pd.DataFrame(
        [
            {
                "tool": name,
                "fit s (median)": float(np.median(seconds[name])),
                "fit s (each)": " ".join(f"{s:.2f}" for s in seconds[name]),
                "sigma_group": r["sigma_group"],
                "sigma vs REML": r["sigma_group"] / reference["sigma_group"] - 1,
                "noise": r["noise"],
                "max |coef - REML|": float(np.max(np.abs(r["coef"] - reference["coef"]))),
                "held-out MSE": float(np.mean((y_test - r["prediction"]) ** 2)),
                "MSE vs REML": np.mean((y_test - r["prediction"]) ** 2) / reference_mse - 1,
            }
            for name, r in results.items()
        ]
    )
    print(table.to_string(index=False, float_format="{:.4f}".format))
    if not args.no_append:
        append(
            f"Linear mixed model vs other tools ({len(y):,} training rows, "
            f"{X['g'].nunique():,} groups, 10 features)",
            markdown(table),
            f"Median of {args.repeats} fits per tool, the tools in turn round by round in one "
            "process. 'vs REML' columns compare with mixedlm's REML fit. Goal: sigma within "
            "1%, held-out MSE within 0.5%, faster than GPBoost.",
        )


if __name__ == "__main__":
    main()
