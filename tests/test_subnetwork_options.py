"""The subnetwork's options: the columns it sees (`subnetwork_cols`), dropout and L2."""

import pickle

import keras
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from reffects import RandomEffectsClassifier, RandomEffectsRegressor
from reffects.datasets import simulate_mixed
from reffects.models import SelectFeatures, build_mixed_model

FEATURES = ["x0", "x1", "x2", "x3"]


@pytest.fixture(scope="module")
def data():
    X, y, _ = simulate_mixed(600, num_groups=(12,), seed=5)
    # a clear nonlinear term in x0, so that the guard keeps a subnetwork on x0 (w = 0.85;
    # its validation gain is many standard errors) and the column checks below have power
    return X, y + 1.5 * np.sin(2.0 * X["x0"])


@pytest.fixture(scope="module")
def on_x0_and_x2(data):
    X, y = data
    params = {"group_cols": ["group_0"], "hidden_units": (8,), "epochs": 30, "random_state": 0}
    est = RandomEffectsRegressor(subnetwork_cols=["x2", "x0"], **params).fit(X, y)
    return est, params


def _dense_layers(network):
    return [layer for layer in network.layers if isinstance(layer, keras.layers.Dense)]


def test_first_dense_layer_takes_only_the_subnetwork_columns(on_x0_and_x2):
    est, _ = on_x0_and_x2
    assert tuple(_dense_layers(est.model_.network)[0].kernel.shape) == (2, 8)
    assert est.model_.network.get_layer("subnetwork_features").indices == [2, 0]
    assert est.coef_.shape == (4,)  # the linear term still sees every feature


def test_columns_outside_the_subnetwork_enter_only_linearly(on_x0_and_x2, data):
    est, _ = on_x0_and_x2
    X, _ = data
    before = est.predict(X)
    # Shifting x1 moves every prediction by coef_ * shift: the linear term alone.
    change = est.predict(X.assign(x1=X["x1"] + 1.5)) - before
    np.testing.assert_allclose(change, 1.5 * est.coef_[1], atol=1e-4)  # float32 predictor
    # Shifting x0, which f sees, moves rows by different amounts (the check has power).
    assert est.subnetwork_weight_ > 0.5
    change = est.predict(X.assign(x0=X["x0"] + 1.5)) - before
    assert np.ptp(change) > 0.05


def test_positions_on_an_ndarray_give_the_fit_that_names_give(on_x0_and_x2, data):
    est, params = on_x0_and_x2
    X, y = data
    by_position = RandomEffectsRegressor(**{**params, "group_cols": [0]}, subnetwork_cols=[3, 1])
    by_position.fit(X.to_numpy(), y.to_numpy())
    np.testing.assert_allclose(by_position.predict(X.to_numpy()), est.predict(X), atol=1e-5)


def test_pipeline_clone_and_pickle_keep_the_subnetwork_columns(data):
    X, y = data
    prepare = ColumnTransformer(
        [("scale", StandardScaler(), FEATURES), ("groups", "passthrough", ["group_0"])],
        verbose_feature_names_out=False,
    ).set_output(transform="pandas")
    model = RandomEffectsRegressor(
        group_cols=["group_0"], hidden_units=(4,), subnetwork_cols=["x3"], epochs=3, random_state=0
    )
    pipeline = Pipeline([("prepare", prepare), ("model", model)]).fit(X, y)
    fitted = pipeline.named_steps["model"]
    assert tuple(_dense_layers(fitted.model_.network)[0].kernel.shape) == (1, 4)
    revived = pickle.loads(pickle.dumps(pipeline))
    np.testing.assert_array_equal(revived.predict(X), pipeline.predict(X))
    copy = clone(pipeline).fit(X, y)
    assert copy.named_steps["model"].get_params()["subnetwork_cols"] == ["x3"]
    np.testing.assert_allclose(copy.predict(X), pipeline.predict(X), atol=1e-6)


def test_subnetwork_options_are_ignored_without_hidden_units(data):
    X, y = data
    plain = {"group_cols": ["group_0"], "epochs": 3, "random_state": 0}
    options = {"subnetwork_cols": ["x1"], "dropout": 0.5, "l2_regularization": 10.0}
    with_options = RandomEffectsRegressor(**plain, **options).fit(X, y)
    without = RandomEffectsRegressor(**plain).fit(X, y)
    np.testing.assert_allclose(with_options.predict(X), without.predict(X), atol=1e-6)


def test_dropout_after_each_hidden_layer_and_l2_on_every_kernel(data):
    X, y = data
    est = RandomEffectsRegressor(
        group_cols=["group_0"],
        hidden_units=(8, 4),
        dropout=0.25,
        l2_regularization=3.0,
        epochs=2,
        random_state=0,
    ).fit(X, y)
    layers = est.model_.network.layers
    rates = [layer.rate for layer in layers if isinstance(layer, keras.layers.Dropout)]
    assert rates == [0.25, 0.25]
    dense = _dense_layers(est.model_.network)
    assert len(dense) == 3  # two hidden layers and the output
    # N is the rows SGD trains on: the subnetwork guard holds some of X out for validation
    assert est.model_.num_examples < len(X)
    for layer in dense:
        assert layer.kernel_regularizer.l2 == pytest.approx(0.5 * 3.0 / est.model_.num_examples)
    # Predictions are deterministic: dropout acts in training only.
    np.testing.assert_array_equal(est.predict(X), est.predict(X))


def test_l2_penalty_is_a_normal_prior_divided_by_n():
    """The loss `evaluate` reports is NLL + KL / N + 0.5 * lambda * sum(W**2) / N."""
    num_examples, lam = 200, 4.0
    model = build_mixed_model(
        3, [5], hidden_units=(6,), l2_regularization=lam, num_examples=num_examples, seed=0
    )
    model.compile(optimizer="adam")
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(num_examples, 3)).astype("float32"), np.arange(num_examples) % 5]
    y = rng.normal(size=num_examples).astype("float32")
    model.fit(x, y, epochs=1, verbose=0)
    result = model.evaluate(x, y, batch_size=num_examples, verbose=0, return_dict=True)
    kernels = [layer.kernel.numpy() for layer in _dense_layers(model.network)]
    penalty = 0.5 * lam * sum(np.sum(k**2) for k in kernels) / num_examples
    assert result["loss"] - result["nll"] - result["kl"] == pytest.approx(penalty, rel=1e-4)


def test_select_features_round_trips_and_saves(tmp_path):
    layer = SelectFeatures([2, 0], name="pick")
    assert SelectFeatures.from_config(layer.get_config()).get_config() == layer.get_config()
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is SelectFeatures and revived.indices == [2, 0]
    model = build_mixed_model(3, [4], hidden_units=(5,), subnetwork_features=[1], seed=0)
    x = [np.random.default_rng(1).normal(size=(8, 3)).astype("float32"), np.arange(8) % 4]
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    with pytest.raises(ValueError, match=r"`indices` must be positions in 0..2"):
        SelectFeatures([3])(x[0])


@pytest.mark.parametrize(
    "params, message",
    [
        ({"subnetwork_cols": ["x9"]}, r"subnetwork column 'x9' is not in X; its columns are"),
        ({"subnetwork_cols": ["group_0"]}, "subnetwork column 'group_0' is a group column"),
        ({"subnetwork_cols": []}, "`subnetwork_cols` must list at least one feature column"),
        ({"subnetwork_cols": [7]}, "subnetwork column position 7 is out of range"),
        ({"subnetwork_cols": ["x0", "x0"]}, "`subnetwork_cols` repeats a column"),
        ({"dropout": 1.0}, r"`dropout` must be in \[0, 1\). Received: dropout=1.0"),
        ({"dropout": -0.1}, r"`dropout` must be in \[0, 1\)"),
        ({"l2_regularization": -1.0}, "`l2_regularization` must be a non-negative number"),
        ({"l2_regularization": np.inf}, "`l2_regularization` must be a non-negative number"),
    ],
)
def test_bad_subnetwork_options_are_errors_that_name_them(data, params, message):
    X, y = data
    est = RandomEffectsRegressor(group_cols=["group_0"], hidden_units=(4,), epochs=1, **params)
    with pytest.raises(ValueError, match=message):
        est.fit(X, y)


def test_l2_needs_the_number_of_examples():
    with pytest.raises(ValueError, match="pass num_examples=N"):
        build_mixed_model(2, [3], hidden_units=(4,), l2_regularization=1.0)


def test_classifier_takes_the_same_options():
    rng = np.random.default_rng(3)
    X, _, _ = simulate_mixed(400, num_groups=(8,), seed=6)
    labels = np.where(X["x0"] + rng.normal(size=400) > 0, "yes", "no")
    clf = RandomEffectsClassifier(
        group_cols=["group_0"],
        hidden_units=(4,),
        subnetwork_cols=["x1", "x2"],
        dropout=0.1,
        l2_regularization=1.0,
        epochs=2,
        random_state=0,
    ).fit(X, labels)
    assert tuple(_dense_layers(clf.model_.network)[0].kernel.shape) == (2, 4)
    assert {"subnetwork_cols", "dropout", "l2_regularization"} <= set(clf.get_params())
    assert clf.predict_proba(X).shape == (400, 2)
