"""Three classes: the multinomial classifier against LogisticRegression and one-vs-rest fits.

    python benchmarks/multiclass.py [--rows 6000] [--groups 100 1000] [--repeats 5]

Simulated multinomial mixed-model data (`simulate`): K classes (3 by default), the first the
reference, log odds eta_c = alpha_c + x . beta_c + b[g, c] with 3 standard-normal features
and per-class group sds 0.5 and 1.0 (evenly spaced from 0.5 to 1.0 for other K). Held-out
rows come from the same groups (new rows of groups seen in training). On each draw every
method is fitted once, in turn, on the same rows:

- reffects multinomial: `RandomEffectsClassifier(group_cols=["g"])` at its defaults (K > 2
  without a subnetwork: the multinomial Laplace finish, `reffects.multinomial_finish`, no
  SGD; with `--epochs`, that many epochs of SGD before it);
- reffects one-vs-rest: K binary `RandomEffectsClassifier` fits at their defaults (glmer's
  Laplace fit each), class c against the rest, probabilities normalised to sum to 1 (as
  scikit-learn's `OneVsRestClassifier` does);
- LogisticRegression (multinomial, lbfgs) on the features plus one-hot group columns, at
  C = 1 and with C chosen by 5-fold cross-validation on the training rows
  (`LogisticRegressionCV`, log loss);
- the truth: the simulated probabilities (the floor no method can beat on average).

Reported: medians over the draws of held-out accuracy, log loss and fit seconds (wall clock
of `fit`), and the multinomial fit's per-class sigma against the offsets' realised sds.
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
from scipy.special import softmax  # noqa: E402
from sklearn.compose import ColumnTransformer  # noqa: E402
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV  # noqa: E402
from sklearn.metrics import accuracy_score, log_loss  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import OneHotEncoder  # noqa: E402

from reffects import RandomEffectsClassifier  # noqa: E402

FEATURES = ["x0", "x1", "x2"]


def simulate(num_rows, num_groups, num_classes=3, seed=0):
    """X (a group column `g` and 3 features), string labels, the true probabilities and
    the realised offsets b, shape (num_groups, K - 1). Group sizes are equal on average."""
    rng = np.random.default_rng(seed)
    sigmas = np.linspace(0.5, 1.0, num_classes - 1)
    alpha = np.linspace(0.3, -0.2, num_classes - 1)
    beta = np.random.default_rng(1).normal(0.0, 0.7, (len(FEATURES), num_classes - 1))
    offsets = rng.normal(0.0, 1.0, (num_groups, num_classes - 1)) * sigmas
    groups = rng.integers(0, num_groups, num_rows)
    x = rng.normal(size=(num_rows, len(FEATURES)))
    eta = np.column_stack([np.zeros(num_rows), alpha + x @ beta + offsets[groups]])
    probabilities = softmax(eta, axis=1)
    codes = (rng.random(num_rows)[:, None] > np.cumsum(probabilities, axis=1)).sum(axis=1)
    codes = np.minimum(codes, num_classes - 1)  # a cumulative sum that rounds below 1
    labels = np.array([f"class{c}" for c in range(num_classes)])[codes]
    X = pd.DataFrame(x, columns=FEATURES)
    X.insert(0, "g", [f"g{g}" for g in groups])
    return X, labels, probabilities, offsets


def _logistic(C=None):
    encode = ColumnTransformer(
        [("groups", OneHotEncoder(handle_unknown="ignore"), ["g"])], remainder="passthrough"
    )
    if C is None:
        model = LogisticRegressionCV(Cs=10, cv=5, scoring="neg_log_loss", max_iter=2000)
    else:
        model = LogisticRegression(C=C, max_iter=2000)
    return make_pipeline(encode, model)


class _OneVsRest:
    """K binary reffects fits, class c against the rest; probabilities normalised."""

    def __init__(self, epochs=None, random_state=None):
        self.epochs, self.random_state = epochs, random_state

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        self.fits_ = [
            RandomEffectsClassifier(
                group_cols=["g"], epochs=self.epochs, random_state=self.random_state
            ).fit(X, np.where(y == c, "yes", "no"))
            for c in self.classes_
        ]
        return self

    def predict_proba(self, X):
        scores = np.column_stack([fit.predict_proba(X)[:, 1] for fit in self.fits_])
        return scores / scores.sum(axis=1, keepdims=True)


def methods(epochs, seed):
    """Name -> an unfitted model with `fit(X, y)` and `predict_proba(X)`."""
    setting = "defaults" if epochs is None else f"epochs={epochs}"
    return {
        f"reffects multinomial ({setting})": RandomEffectsClassifier(
            group_cols=["g"], epochs=epochs, random_state=seed
        ),
        f"reffects one-vs-rest (K binary fits, {setting})": _OneVsRest(
            epochs=epochs, random_state=seed
        ),
        "LogisticRegression, one-hot groups, C=1": _logistic(C=1.0),
        "LogisticRegressionCV, one-hot groups (C by 5-fold CV)": _logistic(),
    }


def run(num_rows, test_rows, num_groups, num_classes, repeats, epochs):
    scores, sigmas = [], []
    for draw in range(repeats):
        X, y, p, offsets = simulate(num_rows + test_rows, num_groups, num_classes, seed=draw)
        train, test = slice(0, num_rows), slice(num_rows, None)
        classes = np.unique(y)
        truth = p[test]
        scores.append(
            {
                "draw": draw,
                "method": "truth (simulated probabilities)",
                "accuracy": accuracy_score(y[test], classes[truth.argmax(axis=1)]),
                "log loss": log_loss(y[test], truth, labels=classes),
                "fit s": np.nan,
            }
        )
        for name, model in methods(epochs, seed=draw).items():
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # lbfgs convergence notes on a C grid
                model.fit(X[train], y[train])
            seconds = time.perf_counter() - start
            proba = model.predict_proba(X[test])
            scores.append(
                {
                    "draw": draw,
                    "method": name,
                    "accuracy": accuracy_score(y[test], classes[proba.argmax(axis=1)]),
                    "log loss": log_loss(y[test], proba, labels=classes),
                    "fit s": seconds,
                }
            )
            if name.startswith("reffects multinomial"):
                sigmas.append(
                    (model.variance_components_["g"].to_numpy(), offsets.std(axis=0, ddof=1))
                )
    return pd.DataFrame(scores), sigmas


def summarise(scores, label):
    table = scores.groupby("method", sort=False).agg(
        **{
            "accuracy (median)": ("accuracy", "median"),
            "log loss (median)": ("log loss", "median"),
            "log loss (each draw)": ("log loss", lambda v: " ".join(f"{x:.4f}" for x in v)),
            "fit s (median)": ("fit s", "median"),
        }
    )
    table.insert(0, "data", label)
    return table.reset_index()[
        [
            "data",
            "method",
            "accuracy (median)",
            "log loss (median)",
            "log loss (each draw)",
            "fit s (median)",
        ]
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6000, help="training rows")
    parser.add_argument("--test-rows", type=int, default=3000)
    parser.add_argument("--groups", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="data draws; each method once")
    parser.add_argument("--epochs", type=int, default=None, help="None: estimator defaults")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)

    tables, notes = [], []
    for num_groups in args.groups:
        label = (
            f"{args.classes} classes, {num_groups:,} groups, {args.rows:,} training rows "
            f"({args.rows / num_groups:.0f} per group)"
        )
        scores, sigmas = run(
            args.rows, args.test_rows, num_groups, args.classes, args.repeats, args.epochs
        )
        tables.append(summarise(scores, label))
        estimated = np.median([s for s, _ in sigmas], axis=0)
        realised = np.median([r for _, r in sigmas], axis=0)
        notes.append(
            f"{label}: multinomial sigma per class (median over draws) "
            + ", ".join(f"{s:.3f}" for s in estimated)
            + " against realised "
            + ", ".join(f"{r:.3f}" for r in realised)
        )
        print(notes[-1], flush=True)
    table = pd.concat(tables, ignore_index=True)
    text = markdown(table)
    print(text)
    if not args.no_append:
        append(
            "Multiclass: multinomial reffects vs LogisticRegression and one-vs-rest",
            text,
            "Machine: the shared 2-core development VM (other jobs running). "
            f"{args.repeats} data draws per row of groups; on each, every method fitted once "
            f"in turn on the same {args.rows:,} training rows and scored on {args.test_rows:,} "
            "held-out rows of the same groups; medians over the draws. 'fit s' is the wall "
            "clock of `fit` (one-vs-rest: all K binary fits). " + "; ".join(notes) + ".",
        )


if __name__ == "__main__":
    main()
