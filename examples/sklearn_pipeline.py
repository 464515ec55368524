"""reffects inside scikit-learn: a pipeline, a grid search, cross-validation and pickling.

    python examples/sklearn_pipeline.py [--rows 4000]

A ColumnTransformer scales the numeric features and passes the group column through (as a
pandas DataFrame, so the estimator finds it by name); the mixed model sits at the end. The
search compares a linear mixed model with a small subnetwork, and the best pipeline is
pickled and reloaded with identical predictions, including for groups never seen in training.
"""

import argparse
import os
import pickle

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from sklearn.compose import ColumnTransformer  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from reffects import RandomEffectsRegressor  # noqa: E402
from reffects.datasets import simulate_mixed  # noqa: E402

FEATURES = ["x0", "x1", "x2", "x3"]


def make_pipeline(**params) -> Pipeline:
    """Scale the features, pass `group_0` through, fit the mixed model."""
    prepare = ColumnTransformer(
        [("scale", StandardScaler(), FEATURES), ("groups", "passthrough", ["group_0"])],
        verbose_feature_names_out=False,
    ).set_output(transform="pandas")
    model = RandomEffectsRegressor(group_cols=["group_0"], random_state=0, **params)
    return Pipeline([("prepare", prepare), ("model", model)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args(argv)

    X, y, _ = simulate_mixed(args.rows, num_groups=(60,), seed=1)
    X = X.assign(x0=100 + 15 * X["x0"])  # a feature on its own scale, for the scaler
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)

    scores = cross_val_score(make_pipeline(epochs=args.epochs), X_train, y_train, cv=3)
    print(f"3-fold R^2 of the linear mixed model: {np.round(scores, 3)}")

    search = GridSearchCV(
        make_pipeline(epochs=args.epochs),
        {"model__hidden_units": [(), (16,)], "model__scale_prior": [None, "exponential"]},
        cv=2,
    ).fit(X_train, y_train)
    print(f"best: {search.best_params_} (R^2 {search.best_score_:.3f})")

    best = search.best_estimator_
    revived = pickle.loads(pickle.dumps(best))
    same = np.array_equal(revived.predict(X_test), best.predict(X_test))
    print(f"test R^2 {best.score(X_test, y_test):.3f}; identical after pickling: {same}")
    return search


if __name__ == "__main__":
    main()
