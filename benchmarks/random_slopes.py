"""Random slopes: the estimator vs lme4 (mixedlm) and on LMMNN's longitudinal simulation.

    python benchmarks/random_slopes.py [--groups 1500] [--repeats 3]
        [--units 10000] [--rows 100000] [--cells 4] [--slopes-repeats 2]
    python benchmarks/random_slopes.py --quick    # smoke size, print only, under a minute
    python benchmarks/random_slopes.py --part1-only --repeats 7   # part 1 alone

Part 1, intercept and two correlated slopes in 1,500 groups of unequal size: sizes uniform on
2..40, x0, x1 ~ N(0, 1), y = 1 + 0.5 x0 - 0.3 x1 + b0_g + b1_g x0 + b2_g x1 + N(0, 0.7^2),
(b0, b1, b2)_g ~ MVN(0, Sigma) with sds (0.8, 0.5, 0.3) and correlations
(b0, b1) 0.4, (b0, b2) -0.3, (b1, b2) 0.2 (seed 0). 20% of the rows are held out at random
(their groups are seen). `RandomEffectsRegressor(group_cols=["g"], random_slopes={"g": ["x0",
"x1"]})` at its defaults vs `mixedlm.lmer("y ~ x0 + x1 + (x0 + x1 | g)", REML=True)`, each
fitted `--repeats` times in alternation (reffects, mixedlm, reffects, ...) after one untimed
tiny fit of each; the time is the wall clock of the fit call alone (`fit` / `lmer`), and the
table quotes the median. Goals: held-out MSE within 0.5% of lmer's, fit time at most lmer's.

Part 2, LMMNN's random-slopes ("longitudinal") simulation, read from
github.com/gsimchoni/lmmnn (lmmnn/utils.py `generate_data(mode="slopes")` and
conf_files/conf_random_slopes.yaml) and Simchoni & Rosset, JMLR 24 (2023):

    x ~ Uniform(-1, 1)^10,  m = 1 + sum(x),  f(x) = m cos(m) + 2 x0 x1
    q units; unit sizes ~ Multinomial(N, p), p proportional to Poisson(3) + 1 per unit
    t = (index of the row within its unit) / (largest unit size - 1), in [0, 1]
    (b0, b1, b2)_u ~ MVN(0, Sigma), variances sigma2_b = (sigma2_0, sigma2_1, sigma2_2),
        corr(b0, b1) = corr(b0, b2) = 0.5, corr(b1, b2) = 0
    y = f(x) + t + t^2 + b0_u + b1_u t + b2_u t^2 + N(0, 1);  a random 80/20 split of rows

N = 100,000 and q = 10,000. The published LMMNN figure, test MSE 1.258 in 1,671 s, is the mean
over the four cells with sigma2_0 = 0.5 and sigma2_1, sigma2_2 in {0.5, 5} (5 draws each) of
their results/res_NL_100K_n5_slopes_q10000.csv; this script runs those four cells (`--cells`
takes the first k of them), a new draw per cell and repeat (seed (repeat, cell)). Methods,
fitted in turn on the same split:
(a) `RandomEffectsRegressor(group_cols=["u"], random_slopes={"u": ["t", "t2"]},
    hidden_units=(64, 32), subnetwork_cols=x0..x9)`: random intercept and slopes in t and t^2,
    a ReLU subnetwork of the 10 features; t and t^2 (t2) are linear fixed effects, as in the
    truth (LMMNN's network also sees t);
(b) the same with a random intercept only;
(c) the linear mixed model with the slopes, no subnetwork (estimator defaults);
and mixedlm's lmer of (c)'s model as its REML reference.
Published rows are quoted from the LMMNN repository's CSV (their draws, their machine) and
were not run here; their seconds go in a column of their own.
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

from reffects import RandomEffectsRegressor  # noqa: E402

TERMS = ["(Intercept)", "x0", "x1"]
TRUE_SD = np.array([0.8, 0.5, 0.3])
TRUE_CORR = np.array([[1.0, 0.4, -0.3], [0.4, 1.0, 0.2], [-0.3, 0.2, 1.0]])
TRUE_FIXED = {"(Intercept)": 1.0, "x0": 0.5, "x1": -0.3}
TRUE_NOISE = 0.7
PAIRS = [(0, 1), (0, 2), (1, 2)]

FEATURES = [f"x{j}" for j in range(10)]
LONGITUDINAL_TERMS = ["(Intercept)", "t", "t2"]
CELLS = [(0.5, 0.5, 0.5), (0.5, 0.5, 5.0), (0.5, 5.0, 0.5), (0.5, 5.0, 5.0)]
# Means over the 5 draws per cell of github.com/gsimchoni/lmmnn
# results/res_NL_100K_n5_slopes_q10000.csv (N 100,000, q 10,000, rho 0.5): exp_type "lmm"
# (LMMNN, its (100, 50, 25, 12) network, deep=TRUE) and "lme4" (deep=FALSE), test MSE and
# mean fit seconds on their machine. The mean of the four LMMNN cells is the paper's 1.258 in
# 1,671 s.
PUBLISHED = {
    (0.5, 0.5, 0.5): {"LMMNN": (1.2252, 1711.8), "lme4": (3.3353, 27.8)},
    (0.5, 0.5, 5.0): {"LMMNN": (1.2663, 1567.5), "lme4": (3.3303, 36.9)},
    (0.5, 5.0, 0.5): {"LMMNN": (1.2635, 1732.9), "lme4": (3.3274, 38.3)},
    (0.5, 5.0, 5.0): {"LMMNN": (1.2768, 1673.0), "lme4": (3.2061, 30.5)},
}
PUBLISHED_LMMNN_MEAN = (1.258, 1671.0)


# ------------------------------------------------------------------------------- part 1
def slopes_problem(num_groups, seed=0):
    """Part 1's data: a frame (g, x0, x1), y, the drawn effects b and the held-out mask."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 41, num_groups)
    groups = np.repeat(np.arange(num_groups), sizes)
    num_rows = len(groups)
    x = rng.normal(size=(num_rows, 2))
    covariance = np.outer(TRUE_SD, TRUE_SD) * TRUE_CORR
    b = rng.multivariate_normal(np.zeros(3), covariance, num_groups)
    fixed = np.array([TRUE_FIXED[k] for k in TERMS])
    design = np.column_stack([np.ones(num_rows), x])
    y = design @ fixed + np.sum(design * b[groups], axis=1)
    y += rng.normal(0.0, TRUE_NOISE, num_rows)
    frame = pd.DataFrame({"g": groups, "x0": x[:, 0], "x1": x[:, 1]})
    test = np.zeros(num_rows, bool)
    test[rng.permutation(num_rows)[: num_rows // 5]] = True
    return frame, y, b, test


def sds_and_corrs(covariance):
    covariance = np.asarray(covariance, float)
    sd = np.sqrt(np.diag(covariance))
    return sd, covariance / np.outer(sd, sd)


def fit_reffects_slopes(X, y):
    est = RandomEffectsRegressor(
        group_cols=["g"], random_slopes={"g": ["x0", "x1"]}, correlated_slopes=True, random_state=0
    )
    start = time.perf_counter()
    est.fit(X, y)
    seconds = time.perf_counter() - start
    sd, corr = sds_and_corrs(est.random_effects_covariance_["g"].loc[TERMS, TERMS])
    return seconds, {
        "sd": sd,
        "corr": corr,
        "noise": est.noise_scale_,
        "fixed": np.r_[est.intercept_, est.coef_],
        "predict": est.predict,
        "fit_time_": est.fit_time_,
    }


def fit_lmer_slopes(X, y):
    import mixedlm

    data = X.assign(y=y, g=X["g"].astype(str))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = mixedlm.lmer("y ~ x0 + x1 + (x0 + x1 | g)", data, REML=True)
    seconds = time.perf_counter() - start
    group = result.VarCorr().groups["g"]
    fixed = result.fixef()

    def predict(X_new):
        new = X_new.assign(g=X_new["g"].astype(str))
        return np.asarray(result.predict(newdata=new, allow_new_levels=True))

    return seconds, {
        "sd": np.array([group.stddev[k] for k in TERMS]),
        "corr": np.asarray(group.corr),
        "noise": float(result.sigma),
        "fixed": np.array([fixed[k] for k in TERMS]),
        "predict": predict,
    }


def part1(num_groups, repeats):
    frame, y, b, test = slopes_problem(num_groups)
    X, y_train, X_test, y_test = frame[~test], y[~test], frame[test], y[test]
    # One untimed tiny fit of each: one-off start-up costs are not charged to either tool.
    warm, warm_y, _, _ = slopes_problem(30, seed=1)
    fit_reffects_slopes(warm, warm_y)
    fit_lmer_slopes(warm, warm_y)
    tools = {"reffects": fit_reffects_slopes, "mixedlm lmer": fit_lmer_slopes}
    seconds, fits = {name: [] for name in tools}, {}
    for _ in range(repeats):
        for name, fit in tools.items():
            spent, fits[name] = fit(X, y_train)
            seconds[name].append(spent)
            print(f"part 1 | {name}: {spent:.2f} s", flush=True)

    realised_sd, realised_corr = sds_and_corrs(np.cov(b, rowvar=False))
    names = [f"sd {t}" for t in TERMS] + [f"corr {TERMS[i]}, {TERMS[j]}" for i, j in PAIRS]
    names += [f"fixed {t}" for t in TERMS] + ["noise sd"]

    def values(sd, corr, fixed, noise):
        return [*sd, *(corr[i, j] for i, j in PAIRS), *fixed, noise]

    true_fixed = [TRUE_FIXED[t] for t in TERMS]
    ours, lmer = fits["reffects"], fits["mixedlm lmer"]
    estimates = pd.DataFrame(
        {
            "parameter": names,
            "truth": values(TRUE_SD, TRUE_CORR, true_fixed, TRUE_NOISE),
            "realised (drawn b)": values(realised_sd, realised_corr, [np.nan] * 3, np.nan),
            "reffects": values(ours["sd"], ours["corr"], ours["fixed"], ours["noise"]),
            "mixedlm lmer": values(lmer["sd"], lmer["corr"], lmer["fixed"], lmer["noise"]),
        }
    )
    estimates["reffects - lmer"] = estimates["reffects"] - estimates["mixedlm lmer"]

    mse = {
        name: float(np.mean((y_test - fit["predict"](X_test)) ** 2)) for name, fit in fits.items()
    }
    median = {name: float(np.median(s)) for name, s in seconds.items()}
    speed = pd.DataFrame(
        [
            {
                "tool": name,
                "held-out MSE": mse[name],
                "MSE / lmer - 1": mse[name] / mse["mixedlm lmer"] - 1,
                "fit s (median)": median[name],
                "fit s (each)": " ".join(f"{s:.2f}" for s in seconds[name]),
                "time / lmer": median[name] / median["mixedlm lmer"],
            }
            for name in tools
        ]
    )
    shape = (len(y_train), len(y_test), num_groups)
    return estimates, speed, shape, ours["fit_time_"]


# ------------------------------------------------------------------------------- part 2
def longitudinal_problem(num_rows, num_units, variances, seed):
    """LMMNN's random-slopes simulation (lmmnn/utils.py, mode "slopes"); see the docstring."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (num_rows, 10))
    m = 1.0 + x.sum(axis=1)
    f = m * np.cos(m) + 2.0 * x[:, 0] * x[:, 1]
    weights = rng.poisson(3.0, num_units) + 1.0
    sizes = rng.multinomial(num_rows, weights / weights.sum())
    units = np.repeat(np.arange(num_units), sizes)
    t = np.concatenate([np.arange(k) for k in sizes]) / (sizes.max() - 1)
    sd = np.sqrt(np.asarray(variances))
    corr = np.array([[1.0, 0.5, 0.5], [0.5, 1.0, 0.0], [0.5, 0.0, 1.0]])
    b = rng.multivariate_normal(np.zeros(3), np.outer(sd, sd) * corr, num_units)
    z = np.column_stack([np.ones(num_rows), t, t**2])
    y = f + t + t**2 + np.sum(z * b[units], axis=1) + rng.normal(0.0, 1.0, num_rows)
    frame = pd.DataFrame(x, columns=FEATURES).assign(t=t, t2=t**2, u=units)
    test = np.zeros(num_rows, bool)
    test[rng.permutation(num_rows)[: num_rows // 5]] = True
    return frame, y, test


METHODS = {
    "(a) reffects slopes + (64, 32)": dict(
        random_slopes={"u": ["t", "t2"]}, hidden_units=(64, 32), subnetwork_cols=FEATURES
    ),
    "(b) reffects intercept + (64, 32)": dict(hidden_units=(64, 32), subnetwork_cols=FEATURES),
    "(c) reffects LMM with slopes": dict(random_slopes={"u": ["t", "t2"]}),
}
LMER = "mixedlm lmer of (c)"


def fit_longitudinal(name, X, y, X_test, epochs):
    if name == LMER:
        import mixedlm

        formula = "y ~ " + " + ".join(FEATURES) + " + t + t2 + (t + t2 | u)"
        data = X.assign(y=y, u=X["u"].astype(str))
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = mixedlm.lmer(formula, data, REML=True)
        seconds = time.perf_counter() - start
        group = result.VarCorr().groups["u"]
        sd = np.array([group.stddev[k] for k in LONGITUDINAL_TERMS])
        new = X_test.assign(u=X_test["u"].astype(str))
        prediction = np.asarray(result.predict(newdata=new, allow_new_levels=True))
        return seconds, prediction, sd, np.asarray(group.corr), float(result.sigma)
    params = METHODS[name]
    if params.get("hidden_units") and epochs is not None:
        params = {**params, "epochs": epochs}
    est = RandomEffectsRegressor(group_cols=["u"], random_state=0, **params)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few held-out units have no training rows
        est.fit(X, y)
    seconds = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prediction = est.predict(X_test)
    terms = list(est.random_effects_covariance_["u"].index)
    sd, corr = sds_and_corrs(est.random_effects_covariance_["u"].loc[terms, terms])
    return seconds, prediction, sd, corr, est.noise_scale_


def describe_sigma(sd, corr):
    text = "sd " + " ".join(f"{s:.3f}" for s in sd)
    if len(sd) == 3:
        text += "; corr " + " ".join(f"{corr[i, j]:.2f}" for i, j in PAIRS)
    return text


def part2(num_rows, num_units, cells, repeats, epochs, with_lmer):
    names = list(METHODS) + ([LMER] if with_lmer else [])
    runs = {(cell, name): {"mse": [], "seconds": []} for cell in cells for name in names}
    for repeat in range(repeats):
        for c, cell in enumerate(cells):
            frame, y, test = longitudinal_problem(num_rows, num_units, cell, seed=[repeat, c])
            X, y_train, X_test, y_test = frame[~test], y[~test], frame[test], y[test]
            for name in names:
                seconds, prediction, sd, corr, noise = fit_longitudinal(
                    name, X, y_train, X_test, epochs
                )
                run = runs[cell, name]
                run["mse"].append(float(np.mean((y_test - prediction) ** 2)))
                run["seconds"].append(seconds)
                run["sigma"], run["noise"] = describe_sigma(sd, corr), noise
                print(
                    f"part 2 | sigma2_b {cell} repeat {repeat} | {name}: MSE "
                    f"{run['mse'][-1]:.4f}, {seconds:.1f} s",
                    flush=True,
                )
    rows = []
    for cell in cells:
        label = ", ".join(f"{v:g}" for v in cell)
        for name in names:
            run = runs[cell, name]
            rows.append(
                {
                    "sigma2_b": label,
                    "method": name,
                    "test MSE (median)": float(np.median(run["mse"])),
                    "test MSE (each)": " ".join(f"{v:.4f}" for v in run["mse"]),
                    "fit s (median)": float(np.median(run["seconds"])),
                    "Sigma estimate (last draw)": run["sigma"],
                    "noise sd": run["noise"],
                    "published s (their machine)": np.nan,
                }
            )
        for name, (mse, seconds) in PUBLISHED[cell].items():
            rows.append(
                {
                    "sigma2_b": label,
                    "method": f"{name} (published, 5 draws, mean)",
                    "test MSE (median)": mse,
                    "published s (their machine)": seconds,
                }
            )
    label = f"mean of the {len(cells)} cells"
    for name in names:
        medians = [np.median(runs[cell, name]["mse"]) for cell in cells]
        seconds = [np.median(runs[cell, name]["seconds"]) for cell in cells]
        rows.append(
            {
                "sigma2_b": label,
                "method": name,
                "test MSE (median)": float(np.mean(medians)),
                "fit s (median)": float(np.mean(seconds)),
            }
        )
    if len(cells) == len(CELLS):
        mse, seconds = PUBLISHED_LMMNN_MEAN
        rows.append(
            {
                "sigma2_b": label,
                "method": "LMMNN (published: paper's figure)",
                "test MSE (median)": mse,
                "published s (their machine)": seconds,
            }
        )
    return pd.DataFrame(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=1500, help="part 1")
    parser.add_argument("--repeats", type=int, default=3, help="part 1 fits per tool")
    parser.add_argument("--units", type=int, default=10_000, help="part 2: q")
    parser.add_argument("--rows", type=int, default=100_000, help="part 2: N, before the split")
    parser.add_argument("--cells", type=int, default=4, choices=range(1, 5), help="part 2")
    parser.add_argument("--slopes-repeats", type=int, default=2, help="part 2 draws per cell")
    parser.add_argument(
        "--epochs", type=int, default=None, help="part 2 subnetwork fits; default: estimator's"
    )
    parser.add_argument("--no-lmer", action="store_true", help="part 2 without mixedlm")
    parser.add_argument("--part1-only", action="store_true", help="skip part 2 (minutes)")
    parser.add_argument("--quick", action="store_true", help="smoke size, print only")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.quick:
        args.groups, args.repeats, args.units, args.rows = 150, 1, 300, 3000
        args.cells, args.slopes_repeats, args.epochs, args.no_append = 1, 1, 2, True

    estimates, speed, (n_train, n_test, groups), fit_time = part1(args.groups, args.repeats)
    cells = CELLS[: args.cells]
    longitudinal = pd.DataFrame(columns=["part 2 not run (--part1-only)"])
    if not args.part1_only:
        longitudinal = part2(
            args.rows, args.units, cells, args.slopes_repeats, args.epochs, not args.no_lmer
        )
    with pd.option_context(
        "display.width", 250, "display.max_columns", 20, "display.max_colwidth", 60
    ):
        print(estimates.to_string(index=False, float_format="{:.4f}".format))
        print(speed.to_string(index=False, float_format="{:.4f}".format))
        print(longitudinal.to_string(index=False, float_format="{:.4f}".format))
    if not args.no_append:
        ratio = speed.set_index("tool")
        mse_gap = ratio.loc["reffects", "MSE / lmer - 1"]
        time_ratio = ratio.loc["reffects", "time / lmer"]
        tables = (
            f"**Part 1: intercept and two correlated slopes, {groups:,} groups of unequal "
            f"size** ({n_train:,} training rows, {n_test:,} held out)\n\n"
            + markdown(estimates, "{:.4f}")
            + "\n\n"
            + markdown(speed, "{:.4f}")
            + f"\n\n**Part 2: LMMNN's random-slopes simulation** (N = {args.rows:,}, "
            f"q = {args.units:,}, 80/20 split)\n\n" + markdown(longitudinal, "{:.4f}")
        )
        append(
            "Random slopes: (x0 + x1 | g) vs lmer; LMMNN's longitudinal simulation",
            tables,
            "Machine: a shared 2-core VM (load from other jobs varies). Part 1: both tools "
            f"fitted {args.repeats} times in alternation after one untimed tiny fit of each; "
            "'fit s' is the wall clock of `fit` / `lmer` alone, median of the fits "
            f"(reffects' own `fit_time_` of its last fit: {fit_time:.2f} s); 'realised' is "
            "the sds and correlations of the drawn b. Goals: held-out MSE within 0.5% of "
            f"lmer's (measured: {mse_gap:+.2e}, met: {abs(mse_gap) <= 0.005}); fit time at "
            f"most lmer's (measured: {time_ratio:.2f}x lmer's, met: {time_ratio <= 1}). "
            f"Part 2: {args.slopes_repeats} draw(s) per cell, every method fitted on each "
            "draw's split in turn; medians over the draws, then the mean over the cells. "
            "(a), (b): subnetwork (64, 32) on x0..x9, estimator defaults otherwise; (c): "
            "estimator defaults. Published rows are quoted from github.com/gsimchoni/lmmnn "
            "results/res_NL_100K_n5_slopes_q10000.csv (their own draws and machine, not run "
            "here; the LMMNN rows' mean is the paper's 1.258 in 1,671 s); their seconds are "
            "not comparable with ours.",
        )


if __name__ == "__main__":
    main()
