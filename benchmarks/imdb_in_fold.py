"""IMDb variants of the default subnetwork, scored inside a training fold (no test fold touched).

    python benchmarks/imdb_in_fold.py [--data ../shared/data/imdb] [--fold 1]
        [--variants defaults longer every-column]

A fold's training rows (Sigrist's folds, `benchmarks/imdb.py`) are split 90/10 at random
(seed 1000 + fold); `RandomEffectsRegressor(group_cols=FACTORS, hidden_units=(64, 32),
random_state=fold)` with each variant's parameters is fitted on the 90% and scored on the
10% (MSE). This is where changes to the defaults are judged before a run on the test folds.
Variants:

- `defaults`: every other parameter at its default (two SGD schedules, batches of 256 and
  1,024, the guard's weight; the subnetwork sees the 3 continuous features);
- `longer`: one schedule, batches of 1,024 for 116 epochs (6,380 steps on fold 1, against
  the default's 73 epochs, 4,015 steps), the same learning rate's cosine decay;
- `every-column`: one schedule, batches of 1,024 for 58 epochs, with `subnetwork_cols` =
  all 160 features (the word counts too);
- `every-column-dropout`, `every-column-l2`: the same with `dropout=0.3`, or with
  `l2_regularization=100` (a Normal(0, 0.1) prior on each weight of the subnetwork).
- `word-index`: the 157 word columns replaced by one column, their linear predictor
  under the linear mixed model fitted (at defaults) on the same 90%; the estimator at its
  defaults then gives that index to the subnetwork with the 3 continuous features, so the
  words can interact with them through one learned direction (the seconds include the
  linear fit).
- `group-means`: each factor's mean of the 3 continuous features over the fitting rows
  and its log row count added as columns (a level not among them: the fitting rows'
  mean and log 1), which reach the linear part and, at the defaults, the subnetwork
  (contextual effects, as Mundlak's group means).
- `seeds-3`: three fits at the defaults with `random_state` fold, fold + 100 and
  fold + 200, their predictions averaged (each seed's MSE is printed too).

Each prints one line (MSE, `subnetwork_weight_`, the guard's best validation NLL, seconds);
nothing is appended to RESULTS.md.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import imdb  # noqa: E402
import numpy as np  # noqa: E402

from reffects import RandomEffectsRegressor  # noqa: E402


def split(folder, fold):
    """The 90% and 10% of fold `fold`'s training rows (features with the factor columns, y)."""
    frame, y, folds = imdb.load(folder)
    train = np.zeros(len(y), dtype=bool)
    train[folds[fold - 1]] = True
    X, y = frame[train].reset_index(drop=True), y[train]
    scored = np.random.default_rng(1000 + fold).random(len(y)) < 0.1
    return X[~scored], y[~scored], X[scored], y[scored]


def variant_params(name, X_fit):
    """The estimator parameters of variant `name` for the fitting rows `X_fit`."""
    features = [c for c in X_fit.columns if c not in imdb.FACTORS]
    return {
        "defaults": {},
        "longer": {"batch_size": 1024, "epochs": 116},
        "every-column": {"batch_size": 1024, "epochs": 58, "subnetwork_cols": features},
        "every-column-dropout": {
            "batch_size": 1024,
            "epochs": 58,
            "subnetwork_cols": features,
            "dropout": 0.3,
        },
        "word-index": {},
        "group-means": {},
        "seeds-3": {},
        "every-column-l2": {
            "batch_size": 1024,
            "epochs": 58,
            "subnetwork_cols": features,
            "l2_regularization": 100.0,
        },
    }[name]


def word_index(X_fit, y_fit, X_score):
    """`X_fit` and `X_score` with the word columns replaced by their linear predictor under
    the linear mixed model fitted on `X_fit`."""
    words = [c for c in X_fit.columns if c not in imdb.FACTORS + imdb.CONTINUOUS]
    linear = RandomEffectsRegressor(group_cols=imdb.FACTORS).fit(X_fit, y_fit)
    beta = linear.coef_[[list(linear.feature_names_).index(c) for c in words]]

    def replace(X):
        return X.drop(columns=words).assign(word_index=X[words].to_numpy() @ beta)

    return replace(X_fit), replace(X_score)


def group_means(X_fit, X_score):
    """`X_fit` and `X_score` with each factor's means of the continuous features over
    `X_fit` and its log count of `X_fit` rows."""
    added = {}
    for factor in imdb.FACTORS:
        table = X_fit.groupby(factor)[imdb.CONTINUOUS].mean()
        table["rows"] = np.log(X_fit.groupby(factor).size())
        defaults = {**X_fit[imdb.CONTINUOUS].mean().to_dict(), "rows": 0.0}
        added[factor] = (table, defaults)

    def extend(X):
        X = X.copy()
        for factor, (table, defaults) in added.items():
            joined = table.reindex(X[factor].to_numpy())
            for column in table.columns:
                values = joined[column].fillna(defaults[column]).to_numpy()
                X[f"{factor}_mean_{column}"] = values
        return X

    return extend(X_fit), extend(X_score)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(imdb.DEFAULT_DATA))
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=["defaults", "longer", "every-column"])
    args = parser.parse_args(argv)
    X_fit, y_fit, X_score, y_score = split(args.data, args.fold)
    for name in args.variants:
        start = time.perf_counter()
        X_in, X_out = X_fit, X_score
        if name == "word-index":
            X_in, X_out = word_index(X_fit, y_fit, X_score)
        if name == "group-means":
            X_in, X_out = group_means(X_fit, X_score)
        seeds = [args.fold, args.fold + 100, args.fold + 200] if name == "seeds-3" else [args.fold]
        predictions = []
        for seed in seeds:
            est = RandomEffectsRegressor(
                group_cols=imdb.FACTORS,
                hidden_units=(64, 32),
                random_state=seed,
                **variant_params(name, X_fit),
            ).fit(X_in, y_fit)
            predictions.append(est.predict(X_out))
            if len(seeds) > 1:
                single = float(np.mean((y_score - predictions[-1]) ** 2))
                print(f"  seed {seed}: MSE {single:.4f}, w {est.subnetwork_weight_:g}", flush=True)
        mse = float(np.mean((y_score - np.mean(predictions, axis=0)) ** 2))
        print(
            f"fold {args.fold} {name}: MSE {mse:.4f} on {len(y_score):,} rows, "
            f"subnetwork_weight_ {est.subnetwork_weight_:g}, validation NLL "
            f"{min(est.subnetwork_validation_nll_.values()):.4f}, "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
