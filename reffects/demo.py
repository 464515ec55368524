"""The main job: three models on housing-style data, as in the founding Zillow analysis.

    python -m reffects.demo [--rows 30000] [--zipcodes 300] [--epochs N]

Fits a Bayesian linear regression, the same plus zip-code random intercepts, and the same
plus a small dense subnetwork; prints validation MAE, the estimated variance components and
the fit time of each.
"""

import argparse

import numpy as np
import pandas as pd
import tensorflow as tf

from reffects._startup import native_stderr_hidden
from reffects.datasets import make_housing
from reffects.estimators import RandomEffectsRegressor

MODELS = {
    "Bayesian linear regression": {"group_cols": []},
    "+ zip-code random intercepts": {"group_cols": ["zipcode"]},
    "+ dense subnetwork (32, 16)": {"group_cols": ["zipcode"], "hidden_units": (32, 16)},
}


def housing_split(num_rows: int = 30000, num_zipcodes: int = 300, seed: int = 0):
    """`make_housing` data split 80/20 at random: `(X_train, y_train, X_valid, y_valid)`.

    Example:
        >>> X_train, y_train, X_valid, y_valid = housing_split(1000, 20)
        >>> len(X_train), len(X_valid)
        (800, 200)
    """
    X, y = make_housing(num_rows, num_zipcodes, seed=seed)
    order = np.random.default_rng(seed).permutation(num_rows)
    train, valid = np.split(order, [int(0.8 * num_rows)])
    return X.iloc[train], y.iloc[train], X.iloc[valid], y.iloc[valid]


def model_columns(X, name: str):
    """The columns model `name` sees: the zip code only where it is a grouping factor."""
    return X if MODELS[name]["group_cols"] else X.drop(columns="zipcode")


def fit_models(X, y, epochs: int | None = None, seed: int = 0) -> dict:
    """Fits each model of `MODELS`; returns the fitted estimators by name."""
    return {
        name: RandomEffectsRegressor(**params, epochs=epochs, random_state=seed).fit(
            model_columns(X, name), y
        )
        for name, params in MODELS.items()
    }


def results_table(models: dict, X_valid, y_valid) -> pd.DataFrame:
    """Validation MAE, variance components and fit time of each fitted model."""
    rows = []
    for name, est in models.items():
        prediction = est.predict(model_columns(X_valid, name))
        mae = float(np.mean(np.abs(prediction - np.asarray(y_valid))))
        rows.append(
            {
                "model": name,
                "validation MAE": mae,
                "sigma_zipcode": est.variance_components_.get("zipcode", np.nan),
                "noise scale": est.noise_scale_,
                "fit seconds": est.fit_time_,
            }
        )
    return pd.DataFrame(rows).set_index("model")


def run(num_rows: int = 30000, num_zipcodes: int = 300, epochs: int | None = None, seed: int = 0):
    """Fits the three models and returns the results table as a DataFrame."""
    X_train, y_train, X_valid, y_valid = housing_split(num_rows, num_zipcodes, seed)
    return results_table(fit_models(X_train, y_train, epochs, seed), X_valid, y_valid)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30000)
    parser.add_argument("--zipcodes", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=None, help="default: chosen from the data")
    args = parser.parse_args(argv)
    # Looking for GPUs here, not in the first fit, keeps CUDA's start-up lines (such as "failed
    # call to cuInit" on a machine with CUDA libraries and no driver) out of the demo's output.
    with native_stderr_hidden():
        tf.config.list_physical_devices()
    print(
        f"Housing-style data: {args.rows} rows, {args.zipcodes} zip codes of unequal size, "
        "3 standardised predictors, a nonlinear signal (true sigma_zipcode 0.30, noise 0.25)."
    )
    table = run(args.rows, args.zipcodes, args.epochs)
    with pd.option_context(
        "display.float_format", "{:.4f}".format, "display.width", 120, "display.max_columns", 10
    ):
        print(table)


if __name__ == "__main__":
    main()
