"""scikit-learn citizenship: the estimator checks, pipelines, search, persistence."""

import pickle

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from reffects import RandomEffectsClassifier, RandomEffectsRegressor
from reffects.datasets import simulate_mixed


@parametrize_with_checks(
    [
        RandomEffectsRegressor(group_cols=[0], epochs=2, random_state=0),
        # the regressor runs SGD (epochs=2) before its finish; the classifier, whose checks
        # are mostly multiclass, is its finish alone (7x faster than with SGD first)
        RandomEffectsClassifier(group_cols=[0], random_state=0),
    ],
)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def grouped():
    """String group labels; 6 groups appear only in the test rows (new groups)."""
    X, y, _ = simulate_mixed(1200, num_groups=(30,), coef=(1.0, -0.5, 0.25, 0.0), seed=11)
    X = X.assign(x0=X["x0"] * 50 + 300)  # a feature on its own scale, for the scaler
    unseen = X["group_0"].isin(X["group_0"].unique()[:6]).to_numpy()
    return X[~unseen], y[~unseen], X[unseen], y[unseen]


def _pipeline(**params):
    features = ["x0", "x1", "x2", "x3"]
    prepare = ColumnTransformer(
        [("scale", StandardScaler(), features), ("groups", "passthrough", ["group_0"])],
        verbose_feature_names_out=False,
    ).set_output(transform="pandas")
    model = RandomEffectsRegressor(group_cols=["group_0"], random_state=0, **params)
    return Pipeline([("prepare", prepare), ("model", model)])


def test_pipeline_with_column_transformer_and_unseen_groups(grouped):
    X, y, X_new, y_new = grouped
    pipeline = _pipeline().fit(X, y)
    prediction = pipeline.predict(X_new)
    # New groups get offset 0: the fixed-effects prediction, noisier than for seen groups
    # but far better than predicting the mean (R^2 of the simulated signal is ~0.5).
    assert prediction.shape == (len(X_new),)
    assert np.mean((y_new - prediction) ** 2) < 0.8 * np.var(y_new)


def test_grid_search_over_hidden_units_learning_rate_and_priors(grouped):
    X, y, _, _ = grouped
    search = GridSearchCV(
        _pipeline(epochs=3),
        [
            {"model__hidden_units": [(), (4,)]},
            {"model__learning_rate": [0.03]},
            {"model__scale_prior": ["exponential"], "model__prior_scale": [1.5]},
        ],
        cv=2,
    )
    search.fit(X, y)
    assert len(search.cv_results_["params"]) == 4
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))


def test_cross_val_score(grouped):
    X, y, _, _ = grouped
    scores = cross_val_score(_pipeline(), X, y, cv=3)
    # Group offsets (sd 1) and fixed effects explain most of the variance of y.
    assert scores.shape == (3,) and np.all(scores > 0.4)


def test_clone_gives_an_unfitted_copy(grouped):
    X, y, _, _ = grouped
    est = RandomEffectsRegressor(group_cols=["group_0"], epochs=3, random_state=0).fit(X, y)
    copy = clone(est)
    assert copy.get_params() == est.get_params()
    assert not hasattr(copy, "model_")


@pytest.mark.parametrize("dump, load", [(pickle.dumps, pickle.loads), (None, None)])
def test_pickle_and_joblib_round_trips(grouped, tmp_path, dump, load):
    X, y, X_new, _ = grouped
    est = _pipeline(epochs=3).fit(X, y)
    if dump is None:
        joblib.dump(est, tmp_path / "model.joblib")
        revived = joblib.load(tmp_path / "model.joblib")
    else:
        revived = load(dump(est))
    np.testing.assert_array_equal(revived.predict(X_new), est.predict(X_new))
    np.testing.assert_array_equal(revived.predict(X), est.predict(X))


def test_random_state_makes_fits_reproducible(grouped):
    X, y, _, _ = grouped
    params = {"group_cols": ["group_0"], "hidden_units": (8,), "epochs": 3, "random_state": 7}
    first = RandomEffectsRegressor(**params).fit(X, y).predict(X)
    second = RandomEffectsRegressor(**params).fit(X, y).predict(X)
    np.testing.assert_allclose(first, second, atol=1e-6)


def test_early_stopping_holds_out_rows_and_stops(grouped):
    X, y, _, _ = grouped
    est = RandomEffectsRegressor(
        group_cols=["group_0"],
        hidden_units=(16,),
        epochs=200,
        early_stopping=True,
        validation_fraction=0.2,
        n_iter_no_change=3,
        random_state=0,
    ).fit(X, y)
    assert "val_loss" in est.history_
    assert len(est.history_["loss"]) < 200
    # SGD trains on 80% of the rows (the others stop it); the exact finish then fits every row.
    assert est.random_effects_["group_0"]["n"].sum() == len(X)


def test_fit_passes_callbacks_and_verbose_to_keras(grouped, capsys):
    import keras

    X, y, _, _ = grouped
    seen = []
    callback = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(epoch))
    RandomEffectsRegressor(group_cols=["group_0"], epochs=2, verbose=2).fit(
        X, y, callbacks=[callback]
    )
    assert seen == [0, 1]
    assert "Epoch 2/2" in capsys.readouterr().out


def _binary_grouped(seed=3):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 40, 3000)
    offsets = rng.normal(0.0, 1.5, 40)
    x = rng.normal(size=3000)
    logit = 0.3 + offsets[groups] + 0.8 * x
    labels = np.where(rng.random(3000) < 1 / (1 + np.exp(-logit)), "yes", "no")
    X = pd.DataFrame({"site": [f"site{g}" for g in groups], "x": x})
    return X, labels


def test_classifier_beats_logistic_regression_that_ignores_groups():
    X, labels = _binary_grouped()
    train, test = slice(0, 2400), slice(2400, None)
    clf = RandomEffectsClassifier(group_cols=["site"], random_state=0)
    clf.fit(X[train], labels[train])
    baseline = LogisticRegression().fit(X[["x"]][train], labels[train])
    ours = roc_auc_score(labels[test] == "yes", clf.predict_proba(X[test])[:, 1])
    theirs = roc_auc_score(labels[test] == "yes", baseline.predict_proba(X[["x"]][test])[:, 1])
    # Group offsets with sd 1.5 carry as much signal as x; ignoring them costs ~0.1 AUC.
    assert ours > theirs + 0.05
    assert clf.score(X[test], labels[test]) > baseline.score(X[["x"]][test], labels[test])
    np.testing.assert_array_equal(clf.classes_, ["no", "yes"])
    proba = clf.predict_proba(X[test])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(
        clf.predict(X[test]), clf.classes_[(clf.decision_function(X[test]) > 0).astype(int)]
    )


def test_classifier_rejects_a_single_class():
    # More than two classes is a multinomial model (tests/test_multiclass.py); one is an error.
    X, _ = _binary_grouped()
    with pytest.raises(ValueError, match="needs at least 2 classes"):
        RandomEffectsClassifier(group_cols=["site"], epochs=1).fit(X, np.full(len(X), "yes"))
