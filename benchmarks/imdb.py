"""IMDb scores with two crossed high-cardinality factors: test MSE on Sigrist's 5 folds.

    python benchmarks/imdb.py [--data ../shared/data/imdb] [--folds 1 2 3 4 5] [--rows N]
        [--gpboost] [--missing FRACTION [--missing-seed SEED]] [--no-append]

88,360 movies; target `score`; grouping factors `director_id` (38,190 levels) and `type_id`
(1,712 genre combinations); 160 numeric features (release date, number of votes, duration,
157 plot-word counts, each 0 or 1 in more than 99% of the movies). The folds are the ones
of Sigrist (2023, arXiv 2307.02071); `cv_folds.json` lists each fold's training rows,
1-based. The data are not in the repository: pass their folder with `--data` (default:
`shared/data/imdb` beside the repository root).

The three continuous features have extreme tails (number of votes reaches 74 standard
deviations), so every method here sees sign(x) log(1 + |x|) of them; the transform is
per row, so nothing leaks from the test rows. Methods, fitted on the same folds, each once
per fold in turn (so each the same number of times, alternating):

- reffects linear mixed model: `RandomEffectsRegressor(group_cols=FACTORS)` at its defaults.
- reffects REMNN, the headline: `hidden_units=(64, 32)` and every other parameter at its
  default. The estimator itself leaves the essentially binary word counts to the linear
  part (its subnetwork sees the three continuous features) and chooses the subnetwork's
  weight on 10% of the training fold's rows. Nothing here was chosen on the test folds.
- reffects REMNN on every column: the same with `subnetwork_cols` = all 160 features
  (`--every-column`; the guard's case: the subnetwork overfits the word counts).
- Keras with embeddings (10 per factor) and Keras ignoring both factors: a (32,) ReLU
  network on MSE with Adam, early stopping on a 10% validation split of the training fold.
- GPBoost (trees + grouped random effects), with `--gpboost` (needs `gpboost`): tree
  boosting on the 160 features plus two crossed grouped random effects for the factors
  (`GPModel(group_data=FACTORS, likelihood="gaussian")`, as in Sigrist 2023). Fixed tree
  parameters, set before any run: learning_rate 0.1, max_depth 6 (num_leaves 1024, so the
  depth binds), min_data_in_leaf 100, lambda_l2 0, the other parameters at gpboost's
  defaults. The number of rounds (at most 80, a cap set by run time: each round re-estimates
  the variance parameters, about 2-4 s on 64,000 rows on a 2-core machine) is chosen by early
  stopping (patience 10, validation MSE of the trees plus the random effects' prediction) on
  a random 10% of the training fold's rows, seeded by the fold; the model is then refitted on
  the whole training fold with that many rounds and predicts the test rows' fixed effect
  plus random-effect mean.

Published results (other splits or machines) are listed in their own column, not run here.

`--missing 0.2` removes 20% of each continuous feature's values (MCAR: an independent
draw per column, seeded by `--missing-seed`, the same mask for every fold, so training and
test rows both lose about 20%) and fits the two reffects estimators alone (the plain Keras
networks take no NaN): each fills a missing value with its conditional mean given the
row's other columns (`reffects.imputation`) and adds a
`col[missing]` indicator, which reaches the subnetwork with its column. Compare with the
complete-data run on the same folds (same seeds).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from results import append, markdown  # noqa: E402

from reffects import RandomEffectsRegressor  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imdb"
FACTORS = ["director_id", "type_id"]
CONTINUOUS = ["movie_date", "number_of_votes", "time_duration_min"]
HIDDEN = (32,)  # the plain Keras networks
PUBLISHED = [
    ("GPBoost (published, Sigrist 2023)", 0.850),
    ("CatBoost (published, Sigrist 2023)", 0.922),
    ("LMMNN (published, its own 80/20 splits)", 0.974),
    ("lme4 (published, LMMNN's splits)", 0.988),
    ("linear mixed model (published, Sigrist 2023)", 1.016),
    ("Keras with embeddings (published)", 1.264),
    ("Keras ignoring the factors (published)", 1.439),
]


def load(folder):
    """Features (with the two factor columns), scores and the list of 0-based training rows."""
    folder = Path(folder)
    frame = pd.read_csv(folder / "imdb.csv.gz")
    with open(folder / "cv_folds.json") as handle:
        folds = [np.asarray(rows) - 1 for rows in json.load(handle)]
    y = frame.pop("score").to_numpy(dtype="float64")
    for column in CONTINUOUS:
        frame[column] = np.sign(frame[column]) * np.log1p(np.abs(frame[column]))
    return frame, y, folds


def remove_values(frame, fraction, seed):
    """`frame` with `fraction` of each continuous column's values set to NaN, at random
    (MCAR; one independent draw per column, the same rows whatever the fold)."""
    rng = np.random.default_rng(seed)
    frame = frame.copy()
    for column in CONTINUOUS:
        frame.loc[rng.random(len(frame)) < fraction, column] = np.nan
    return frame


def estimator(seed, **params):
    """`RandomEffectsRegressor` on both factors with `params`, seeded by the fold; returns
    the test predictions and `subnetwork_weight_`."""

    def fit_predict(X_train, y_train, X_test):
        est = RandomEffectsRegressor(group_cols=FACTORS, random_state=seed, **params)
        return est.fit(X_train, y_train).predict(X_test), est.subnetwork_weight_

    return fit_predict


def _codes(train, test):
    """Integer codes of each factor; a level unseen in training gets the reserved last code."""
    pairs = []
    for column in FACTORS:
        levels = pd.Index(pd.unique(train[column]))
        test_codes = levels.get_indexer(test[column])
        pairs.append(
            (levels.get_indexer(train[column]), np.where(test_codes < 0, len(levels), test_codes))
        )
    return pairs


def _standardised(train, test, columns):
    mean, scale = train[columns].mean(), train[columns].std().replace(0.0, 1.0)
    return [((d[columns] - mean) / scale).to_numpy("float32") for d in (train, test)]


def plain_keras(embed, max_epochs, seed):
    """The same (32,) network on MSE: with a 10-dimensional embedding per factor, or without."""

    def fit_predict(X_train, y_train, X_test):
        features = [c for c in X_train.columns if c not in FACTORS]
        dense_train, dense_test = _standardised(X_train, X_test, features)
        codes = _codes(X_train, X_test)
        keras.utils.set_random_seed(seed)
        x_in = keras.Input(shape=(len(features),))
        g_in = [keras.Input(shape=(), dtype="int64") for _ in FACTORS]
        parts = [x_in]
        if embed:
            parts += [
                keras.layers.Embedding(int(c[0].max()) + 2, 10)(g) for c, g in zip(codes, g_in)
            ]
        hidden = keras.layers.Concatenate()(parts) if embed else x_in
        for units in HIDDEN:
            hidden = keras.layers.Dense(units, activation="relu")(hidden)
        model = keras.Model([x_in, *g_in], keras.layers.Dense(1)(hidden))
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", steps_per_execution=32)
        y_mean = y_train.mean()
        model.fit(
            [dense_train, *(c[0] for c in codes)],
            (y_train - y_mean).astype("float32"),
            batch_size=256,
            epochs=max_epochs,
            validation_split=0.1,
            callbacks=[keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True)],
            verbose=0,
        )
        test_inputs = [dense_test, *(c[1] for c in codes)]
        return y_mean + model.predict(test_inputs, batch_size=8192, verbose=0)[:, 0], None

    return fit_predict


GPBOOST_PARAMS = {
    "objective": "regression",
    "learning_rate": 0.1,
    "max_depth": 6,
    "num_leaves": 2**10,
    "min_data_in_leaf": 100,
    "lambda_l2": 0.0,
    "metric": "mse",
    "verbose": -1,
}
GPBOOST_MAX_ROUNDS = 80  # run time: ~2-4 s a round on a training fold, 2 cores
GPBOOST_PATIENCE = 10


def gpboost_trees(seed):
    """GPBoost: trees on every non-factor feature plus crossed grouped random effects for
    `FACTORS`. The number of rounds is chosen by early stopping on a random 10% of the
    training fold (seeded by `seed`), then the model is refitted on the whole training fold;
    the prediction is the trees' prediction plus the random effects' posterior mean.
    Parameters: `GPBOOST_PARAMS`, at most `GPBOOST_MAX_ROUNDS` rounds, patience
    `GPBOOST_PATIENCE` (tree parameters fixed before any run; the cap and patience set by
    run time; nothing tuned on the test folds)."""

    def fit_predict(X_train, y_train, X_test):
        import gpboost as gpb

        features = [c for c in X_train.columns if c not in FACTORS]
        x_train, x_test = (d[features].to_numpy("float64") for d in (X_train, X_test))
        g_train, g_test = (d[FACTORS].to_numpy() for d in (X_train, X_test))
        valid = np.random.default_rng(seed).random(len(y_train)) < 0.1
        fit = ~valid

        gp_model = gpb.GPModel(group_data=g_train[fit], likelihood="gaussian")
        gp_model.set_prediction_data(group_data_pred=g_train[valid])
        train_set = gpb.Dataset(x_train[fit], y_train[fit])
        valid_set = gpb.Dataset(x_train[valid], y_train[valid], reference=train_set)
        booster = gpb.train(
            params=dict(GPBOOST_PARAMS),
            train_set=train_set,
            gp_model=gp_model,
            num_boost_round=GPBOOST_MAX_ROUNDS,
            valid_sets=[valid_set],
            early_stopping_rounds=GPBOOST_PATIENCE,
            use_gp_model_for_validation=True,
            verbose_eval=False,
        )
        rounds = max(int(booster.best_iteration), 1)

        gp_model = gpb.GPModel(group_data=g_train, likelihood="gaussian")
        booster = gpb.train(
            params=dict(GPBOOST_PARAMS),
            train_set=gpb.Dataset(x_train, y_train),
            gp_model=gp_model,
            num_boost_round=rounds,
            verbose_eval=False,
        )
        latent = booster.predict(data=x_test, group_data_pred=g_test, pred_latent=True)
        print(f"  GPBoost: {rounds} rounds (validation 10% of the training fold)", flush=True)
        return latent["fixed_effect"] + latent["random_effect_mean"], None

    return fit_predict


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder of imdb.csv.gz")
    parser.add_argument("--folds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument(
        "--rows", type=int, default=None, help="use only the first ROWS movies (smoke runs)"
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="every method's epochs (smoke runs)"
    )
    parser.add_argument(
        "--every-column", action="store_true", help="also the subnetwork on all 160 features"
    )
    parser.add_argument(
        "--missing",
        type=float,
        default=0.0,
        help="remove this share of each continuous feature's values (MCAR); reffects only",
    )
    parser.add_argument("--missing-seed", type=int, default=0, help="seeds the removal")
    parser.add_argument(
        "--gpboost",
        action="store_true",
        help="also GPBoost (trees + grouped random effects); needs gpboost",
    )
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    frame, y, folds = load(args.data)
    if args.missing:
        frame = remove_values(frame, args.missing, args.missing_seed)
        print(
            "missing share per continuous column: "
            + ", ".join(f"{c} {frame[c].isna().mean():.4f}" for c in CONTINUOUS),
            flush=True,
        )
    if args.rows is not None:
        frame, y = frame.iloc[: args.rows], y[: args.rows]
        folds = [rows[rows < args.rows] for rows in folds]

    # The estimator's own schedule, or `--epochs` in a smoke run.
    schedule = {} if args.epochs is None else {"epochs": args.epochs}
    features = [c for c in frame.columns if c not in FACTORS]
    methods = {
        "reffects linear mixed model (defaults)": lambda s: estimator(s, **schedule),
        "reffects REMNN (defaults, hidden_units=(64, 32))": lambda s: estimator(
            s, hidden_units=(64, 32), **schedule
        ),
    }
    if args.every_column:
        methods["reffects REMNN ((64, 32) on every column)"] = lambda s: estimator(
            s, hidden_units=(64, 32), subnetwork_cols=features, **schedule
        )
    keras_epochs = args.epochs or 50
    if not args.missing:
        methods["Keras with embeddings"] = lambda s: plain_keras(True, keras_epochs, s)
        methods["Keras ignoring the factors"] = lambda s: plain_keras(False, keras_epochs, s)
        if args.gpboost:
            methods["GPBoost (trees + grouped random effects)"] = gpboost_trees
    mse = {name: {} for name in methods}
    seconds = {name: [] for name in methods}
    weights = {name: [] for name in methods}
    for fold in args.folds:
        train = np.zeros(len(y), dtype=bool)
        train[folds[fold - 1]] = True
        for name, make in methods.items():
            start = time.perf_counter()
            prediction, weight = make(fold)(frame[train], y[train], frame[~train])
            seconds[name].append(time.perf_counter() - start)
            weights[name].append(weight)
            mse[name][fold] = float(np.mean((y[~train] - prediction) ** 2))
            print(
                f"fold {fold} {name}: MSE {mse[name][fold]:.4f}, {seconds[name][-1]:.1f} s"
                + ("" if weight is None else f", subnetwork_weight_ {weight:g}"),
                flush=True,
            )
    rows = [
        {
            "method": name,
            **{f"fold {f}": mse[name][f] for f in args.folds},
            "mean MSE": float(np.mean(list(mse[name].values()))),
            "median MSE": float(np.median(list(mse[name].values()))),
            "subnetwork_weight_ (each)": " ".join(f"{w:g}" for w in weights[name] if w is not None),
            "fit s (median)": float(np.median(seconds[name])),
        }
        for name in methods
    ]
    if not args.missing:
        rows += [{"method": name, "published mean MSE": value} for name, value in PUBLISHED]
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(table.to_string(index=False, float_format="{:.4f}".format, na_rep=""))
    if args.missing:
        title = (
            f"IMDb with {args.missing:.0%} of each continuous feature's values removed "
            "(MCAR, Sigrist's folds)"
        )
        missing_note = (
            f"{args.missing:.0%} of the values of each of {', '.join(CONTINUOUS)} removed at "
            f"random (seed {args.missing_seed}, the same rows in every fold), in training and "
            "test rows; the estimators model them as latent (a joint Normal of the columns, "
            "each missing value filled with its conditional mean) and add a `col[missing]` "
            "indicator. "
        )
    else:
        title, missing_note = "IMDb: two crossed high-cardinality factors (Sigrist's folds)", ""
    if not args.no_append:
        append(
            title,
            markdown(table, "{:.4f}"),
            missing_note
            + f"Test MSE on folds {args.folds} (of 5; test = rows not listed in cv_folds.json), "
            f"{len(y):,} movies, "
            + (
                "the estimators' default schedule"
                if args.epochs is None
                else f"{args.epochs} epochs"
            )
            + ". Each method fitted once per fold, the methods in turn; fit time includes "
            "preprocessing and prediction. "
            + (
                ""
                if args.missing
                else "Published rows are quoted as published (mean over 5 folds, LMMNN and "
                "lme4 on their own random 80/20 splits); they were not run here. "
            )
            + "Goals: the defaults' subnetwork at most the linear mixed model's MSE"
            + ("." if args.missing else ", and at most 0.88."),
        )


if __name__ == "__main__":
    main()
