"""The subnetwork guard: a subnetwork never makes the estimators worse than the mixed model.

A fit with `hidden_units` trains the subnetwork on all but `validation_fraction` of the rows,
chooses the weight w in [0, 1] on its output by the held-out rows' NLL (w = 0 is the linear
mixed model) and finishes the linear part on every row; essentially binary columns stay out
of a default subnetwork.
"""

import numpy as np
import pandas as pd
import pytest

from reffects import RandomEffectsClassifier, RandomEffectsRegressor
from reffects.training_recipe import choose_subnetwork_weight, subnetwork_columns

FAST = {"epochs": 20, "random_state": 0}


def _table(num_rows, signal, seed=0, num_dummies=20, num_groups=40):
    """Sparse dummies, two continuous columns and a group; y = linear part + `signal`(x)."""
    rng = np.random.default_rng(seed)
    dummies = (rng.random((num_rows, num_dummies)) < rng.uniform(0.02, 0.2, num_dummies)) * 1.0
    continuous = rng.normal(size=(num_rows, 2))
    groups = rng.integers(0, num_groups, num_rows)
    y = (
        dummies @ rng.normal(0, 0.5, num_dummies)
        + continuous @ np.array([0.5, -0.3])
        + signal(continuous)
        + rng.normal(0, 0.7, num_groups)[groups]
        + rng.normal(0, 1, num_rows)
    )
    X = pd.DataFrame(dummies, columns=[f"d{j}" for j in range(num_dummies)])
    X[["c0", "c1"]] = continuous
    X["g"] = groups
    return X, y


def _held_out_mse(params, X, y, split=1000):
    est = RandomEffectsRegressor(group_cols=["g"], **params).fit(X[:split], y[:split])
    return est, float(np.mean((y[split:] - est.predict(X[split:])) ** 2))


@pytest.fixture(scope="module")
def linear_truth():
    return _table(2000, lambda x: 0.0)


def test_on_a_linear_truth_the_subnetwork_is_left_out(linear_truth):
    # A subnetwork on every column overfits the sparse dummies: with its weight forced to 1,
    # held-out MSE 1.316 against the mixed model's 1.038. The guard weighs it by 0 here.
    X, y = linear_truth
    linear, linear_mse = _held_out_mse({}, X, y)
    every_column = {"hidden_units": (32,), "subnetwork_cols": list(X.columns[:-1]), **FAST}
    deep, deep_mse = _held_out_mse(every_column, X, y)
    assert deep.subnetwork_weight_ == 0.0
    assert deep.subnetwork_validation_nll_[0.0] < deep.subnetwork_validation_nll_[1.0]
    # w = 0: the same REML fit, reached from SGD's state instead of the initial values
    # (the optimizer's tolerance).
    assert deep_mse == pytest.approx(linear_mse, rel=1e-4)
    np.testing.assert_allclose(deep.coef_, linear.coef_, rtol=1e-3, atol=1e-4)


def test_a_nonlinear_signal_keeps_the_subnetwork():
    X, y = _table(2000, lambda x: 1.5 * np.sin(2.5 * x[:, 0]), seed=1)
    _, linear_mse = _held_out_mse({}, X, y)
    deep, deep_mse = _held_out_mse({"hidden_units": (32,), **FAST, "epochs": 60}, X, y)
    assert deep.subnetwork_weight_ >= 0.7
    assert deep_mse < 0.8 * linear_mse


def test_essentially_binary_columns_stay_out_of_a_default_subnetwork(linear_truth):
    X, y = linear_truth
    X = X.assign(count=np.where(np.arange(len(X)) % 200 == 0, 2.0, X["d0"]))  # 0/1, now and then 2
    est = RandomEffectsRegressor(group_cols=["g"], hidden_units=(4,), epochs=1).fit(X, y)
    positions = [est.feature_names_in_.tolist().index(c) for c in ("c0", "c1")]
    assert est.model_.network.get_layer("subnetwork_features").indices == positions
    assert est.coef_.shape == (len(X.columns) - 1,)  # every column stays in the linear part
    named = RandomEffectsRegressor(
        group_cols=["g"], hidden_units=(4,), subnetwork_cols=["d0", "c0"], epochs=1
    ).fit(X, y)
    assert named.model_.network.get_layer("subnetwork_features").indices == [0, 20]


def test_a_default_subnetwork_sees_a_column_with_its_missing_indicator_but_no_dummies():
    rng = np.random.default_rng(4)
    X = pd.DataFrame(
        {
            "x": np.where(rng.random(600) < 0.2, np.nan, rng.normal(size=600)),
            "kind": rng.choice(["a", "b", "c"], 600),
            "flag": rng.integers(0, 2, 600).astype(float),
            "g": rng.integers(0, 10, 600),
        }
    )
    y = rng.normal(size=600)
    est = RandomEffectsRegressor(group_cols=["g"], hidden_units=(4,), epochs=1).fit(X, y)
    seen = est.model_.network.get_layer("subnetwork_features").indices
    assert [est.feature_names_[j] for j in seen] == ["x", "x[missing]"]


def test_subnetwork_columns_rule():
    rng = np.random.default_rng(0)
    features = np.column_stack(
        [
            rng.integers(0, 2, 1000),  # a dummy
            np.where(np.arange(1000) < 5, 3, rng.integers(0, 2, 1000)),  # 99.5% in two values
            np.where(np.arange(1000) < 20, 3, rng.integers(0, 2, 1000)),  # 98%: kept
            rng.normal(size=1000),
            np.zeros(1000),  # constant
        ]
    )
    assert subnetwork_columns(features) == [2, 3]
    assert subnetwork_columns(features[:, [0, 4]]) is None  # none left: every column


def test_the_guard_is_reproducible_and_reported(linear_truth):
    X, y = _table(1200, lambda x: np.sin(2.5 * x[:, 0]), seed=2)
    params = {"group_cols": ["g"], "hidden_units": (8,), **FAST}
    first = RandomEffectsRegressor(**params).fit(X, y)
    second = RandomEffectsRegressor(**params).fit(X, y)
    assert first.subnetwork_weight_ == second.subnetwork_weight_
    assert 0.0 <= first.subnetwork_weight_ <= 1.0
    assert sorted(first.subnetwork_validation_nll_) == [w / 20 for w in range(21)]
    np.testing.assert_allclose(first.predict(X), second.predict(X), atol=1e-6)
    assert RandomEffectsRegressor(group_cols=["g"]).fit(X, y).subnetwork_weight_ is None


def test_hidden_units_without_feature_columns_is_the_mixed_model():
    X = pd.DataFrame({"g": np.arange(200) % 10})
    y = np.random.default_rng(5).normal(size=200)
    est = RandomEffectsRegressor(group_cols=["g"], hidden_units=(4,), epochs=1).fit(X, y)
    assert est.subnetwork_weight_ is None and est.predict(X).shape == (200,)


def test_the_finish_runs_on_every_row_after_the_guard(linear_truth):
    X, y = linear_truth
    est = RandomEffectsRegressor(group_cols=["g"], hidden_units=(4,), epochs=2).fit(X, y)
    counts = est.random_effects_["g"]["n"]
    assert counts.sum() == len(X) and float(est.model_.training_size) == len(X)


def test_a_classifier_is_guarded_too():
    rng = np.random.default_rng(3)
    X = pd.DataFrame({"x": rng.normal(size=1500), "g": rng.integers(0, 30, 1500)})
    logit = 2.0 * np.abs(X["x"]) - 1.5 + rng.normal(0, 0.5, 30)[X["g"]]
    y = rng.random(1500) < 1 / (1 + np.exp(-logit))
    clf = RandomEffectsClassifier(group_cols=["g"], hidden_units=(8,), **FAST).fit(X, y)
    assert clf.subnetwork_weight_ >= 0.5  # |x| is not linear in x
    assert clf.predict_proba(X).shape == (1500, 2)


def test_choose_subnetwork_weight_keeps_the_better_model_and_blends_two_finishes():
    import keras

    from reffects.encoding import EncodedData
    from reffects.models import build_mixed_model

    x = np.linspace(-2, 2, 200, dtype="float32")[:, None]
    data = EncodedData(x, [np.zeros(200, "int64")])
    models = [
        build_mixed_model(1, [2], hidden_units=(8,), num_examples=200, seed=seed) for seed in (0, 1)
    ]
    kernels = [m.network.get_layer("subnetwork_output").kernel for m in models]
    kernel = np.random.default_rng(0).normal(size=(8, 1)).astype("float32")  # "trained" f
    kernels[0].assign(kernel)
    kernels[1].assign(0.01 * kernel)  # f nearly 0: the better fit of y = 0
    trained = [keras.ops.convert_to_numpy(k).copy() for k in kernels]
    seen = []
    validation = (data.model_inputs(), np.zeros(200), None)
    index, weight, scores, failure = choose_subnetwork_weight(
        models, seen.append, validation, candidates=(0, 0.5, 1)
    )
    assert [id(m) for m in seen] == [id(models[0]), id(models[1]), id(models[1])]
    assert index == 1 and weight == 0.0 and failure is None  # y = 0: best without f
    assert list(scores) == [0.0, 0.5, 1.0]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(kernels[1]), 0.0 * trained[1])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(kernels[0]), trained[0])

    # A finish that fails with f held (a blown-up model) leaves w = 0; one that fails
    # from SGD's state without f too starts again from the untrained weights.
    untrained = models[0].get_weights()
    kernels[0].assign(100.0 * kernels[0])  # "blown up"
    calls = []

    def finish(model):
        calls.append(np.abs(keras.ops.convert_to_numpy(kernels[0])).max())
        if len(calls) < 3:
            raise ValueError("the mixed model's system is singular at the estimated scales")

    index, weight, scores, failure = choose_subnetwork_weight(
        models[:1], finish, validation, start=untrained
    )
    assert (index, weight, list(scores)) == (0, 0.0, [0.0]) and "singular" in str(failure)
    assert calls[0] > 0 and calls[1] == calls[2] == 0.0  # with f, then without it twice


def test_a_subnetwork_starts_at_zero_output():
    # the model starts as the mixed model: with a log link a random output layer started
    # a Poisson fit at rates up to exp(18)
    from reffects.encoding import EncodedData
    from reffects.models import build_mixed_model
    from reffects.training_recipe import subnetwork_output

    x = np.random.default_rng(0).normal(size=(500, 3)).astype("float32") * 3.0
    data = EncodedData(x, [np.zeros(500, "int64")])
    model = build_mixed_model(3, [2], likelihood="poisson", hidden_units=(16, 8), seed=0)
    np.testing.assert_array_equal(subnetwork_output(model, data.features), 0.0)
