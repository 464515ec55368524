"""Frequency weights: a row of weight w is exactly w rows, and a row of weight 0 none.

scikit-learn's `check_sample_weight_equivalence_on_dense_data` asks this at rtol 1e-7 on a
degenerate data set (an exact fit: more columns than rows, each row its own group; it runs
in tests/test_sklearn.py); here the exact finish on such data and on a well-posed fit, and
the estimators on data with categorical and missing values (their levels, fills and
indicators are weighted too).
"""

import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.utils import shuffle

from reffects import RandomEffectsClassifier, RandomEffectsRegressor
from reffects.encoding import standardise
from reffects.finish import LinearMixedSystem


def _data(num_rows=300, seed=1):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 20, num_rows)
    x = rng.normal(size=(num_rows, 2))
    colour = rng.choice(["red", "green", "blue"], num_rows)
    eta = rng.normal(0.0, 1.0, 20)[groups] + x @ [1.0, -0.5] + (colour == "red")
    X = pd.DataFrame({"g": groups, "x0": x[:, 0] * 10 + 5, "x1": x[:, 1], "colour": colour})
    X.loc[rng.random(num_rows) < 0.15, "x1"] = np.nan
    weights = rng.integers(0, 5, num_rows)
    y = eta + rng.normal(size=num_rows)
    labels = np.where(rng.random(num_rows) < 1 / (1 + np.exp(-eta)), "yes", "no")
    return X, y, labels, weights


def _repeated(X, target, weights):
    return X.loc[X.index.repeat(weights)].reset_index(drop=True), np.repeat(target, weights)


def test_weighted_standardisation_is_that_of_the_repeated_rows():
    rng = np.random.default_rng(0)
    values = np.column_stack([rng.normal(3.0, 2.0, 50), np.full(50, 7.0)])
    weights = rng.integers(0, 4, 50)
    values[weights == 0, 1] = -100.0  # constant on the rows that count
    weighted, repeated = values.copy(), np.repeat(values, weights, axis=0)
    mean, scale = standardise(weighted, ["a", "b"], "feature column", weights)
    expected_mean, expected_scale = standardise(repeated, ["a", "b"], "feature column")
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-14)
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-14)
    assert mean[1] == 7.0 and scale[1] == 1.0  # a constant: centred, not scaled
    np.testing.assert_allclose(np.repeat(weighted, weights, axis=0), repeated, atol=1e-14)


def _mixed_system(design, y, groups, weights, num_groups):
    width = design.shape[1]
    # the estimators' prior: Normal(0, 10) on every standardised fixed effect
    return LinearMixedSystem(
        y, weights, design, [groups], [num_groups], np.zeros(width), np.full(width, 0.01)
    )


@pytest.mark.parametrize(
    "num_rows, num_features, num_groups",
    [(15, 29, 15), (300, 3, 20)],
    ids=["exact-fit", "well-posed"],
)
def test_finish_with_weights_equals_the_repeated_rows_in_any_order(
    num_rows, num_features, num_groups
):
    # "exact-fit" is the scikit-learn check's kind of data: 15 rows (some of weight 0) of
    # 29 features, each row its own group, y an integer 0 to 2 (plus its group's offset);
    # the rows of positive weight are fitted exactly (s -> 0), and beta's directions that
    # they leave open are set by the prior's ridge alone.
    rng = np.random.default_rng(0)
    design = np.column_stack([np.ones(num_rows), rng.normal(size=(num_rows, num_features))])
    groups = np.arange(num_rows) % num_groups
    y = rng.integers(0, 3, num_rows).astype(float) + rng.normal(0.0, 1.0, num_groups)[groups]
    weights = rng.integers(0, 5, num_rows)
    weighted = _mixed_system(design, y, groups, weights.astype(float), num_groups)
    order = rng.permutation(weights.sum())  # the repeated rows, shuffled
    repeats = np.repeat(np.arange(num_rows), weights)[order]
    repeated = _mixed_system(
        design[repeats], y[repeats], groups[repeats], np.ones(len(repeats)), num_groups
    )
    # from different starting points, as SGD's warm starts differ
    fits = [
        system.posterior(*system.fit(np.array([theta]), noise_scale))
        for system, theta, noise_scale in [(weighted, 0.6, 0.7), (repeated, 2.0, 0.3)]
    ]
    predictions = [design @ fit.fixed_mean() + fit.offset_mean(0)[groups, 0] for fit in fits]
    # The sums over the rows differ in their rounding (~1e-16 relative), and in an exact fit
    # the open directions move by that over the ridge, and rows of weight 0 with them:
    # measured 7e-10 with the ridge's floor at 1e-3 of y's mean square (6e-5 with it at
    # 1e-8, where theta also stopped anywhere in a flat criterion). 1e-7 and 1e-9 are the
    # scikit-learn check's tolerances; the well-posed fit agrees to ~2e-10.
    np.testing.assert_allclose(predictions[0], predictions[1], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(fits[0].fixed_mean(), fits[1].fixed_mean(), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("epochs", [None, 2])
def test_regressor_with_weights_equals_the_repeated_rows(epochs):
    X, y, _, weights = _data()
    params = {"group_cols": ["g"], "epochs": epochs, "random_state": 0}
    repeated = RandomEffectsRegressor(**params).fit(*_repeated(X, y, weights))
    X_w, y_w, w = shuffle(X, y, weights, random_state=0)  # another row order too
    weighted = RandomEffectsRegressor(**params).fit(X_w, y_w, sample_weight=w)
    # Measured: equal to 6e-17 (the same REML optimum, from any SGD warm start, since
    # the finish solves the linear model in full); 1e-9 leaves room for BLAS's order of sums.
    np.testing.assert_allclose(weighted.predict(X), repeated.predict(X), rtol=1e-9)
    np.testing.assert_allclose(weighted.coef_, repeated.coef_, rtol=1e-9)
    assert weighted.noise_scale_ == pytest.approx(repeated.noise_scale_, rel=1e-9)
    assert weighted.variance_components_["g"] == pytest.approx(
        repeated.variance_components_["g"], rel=1e-9
    )
    assert list(weighted.feature_names_) == [
        "x0",
        "x1",
        "x1[missing]",
        "colour[T.green]",
        "colour[T.red]",
    ]


def test_binary_classifier_with_weights_equals_the_repeated_rows():
    X, _, labels, weights = _data()
    params = {"group_cols": ["g"], "random_state": 0}
    repeated = RandomEffectsClassifier(**params).fit(*_repeated(X, labels, weights))
    weighted = RandomEffectsClassifier(**params).fit(X, labels, sample_weight=weights)
    # glmer's Laplace fit stops at its optimizer's tolerance (sigma equal to 1.4e-7
    # relative, fixed effects to 7e-8), and the logit comes from the float32 network:
    # measured 6e-7, one float32 step near |logit| = 4.
    np.testing.assert_allclose(
        weighted.decision_function(X), repeated.decision_function(X), rtol=0, atol=3e-6
    )
    assert weighted.variance_components_["g"] == pytest.approx(
        repeated.variance_components_["g"], rel=1e-5
    )


def test_rows_of_weight_zero_count_for_nothing():
    X, y, _, weights = _data()
    X = X.copy()
    zero = weights == 0
    X.loc[zero, "colour"] = "purple"  # a level seen only in rows of weight 0
    X.loc[zero, "x0"] = np.nan  # and x0's only missing values
    weighted = RandomEffectsRegressor(group_cols=["g"]).fit(X, y, sample_weight=weights)
    dropped = RandomEffectsRegressor(group_cols=["g"]).fit(
        X[~zero], y[~zero], sample_weight=weights[~zero]
    )
    assert list(weighted.feature_names_) == list(dropped.feature_names_)
    assert "colour[T.purple]" not in weighted.feature_names_
    assert "x0[missing]" not in weighted.feature_names_
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(weighted.predict(X[~zero]), dropped.predict(X[~zero]), rtol=1e-9)
