import sys
from statistics import NormalDist

import keras
import numpy as np
import pandas as pd
import pytest

from reffects import RandomEffectsRegressor, RandomIntercept, inspection
from reffects.datasets import simulate_mixed
from reffects.models import build_mixed_model

Z95 = NormalDist().inv_cdf(0.975)


@pytest.fixture(scope="module")
def fitted():
    """A small linear mixed model fitted by the estimator (a few seconds)."""
    X, y, _ = simulate_mixed(
        800,
        num_groups=(15,),
        coef=(1.0, -0.5),
        group_sd=(0.8,),
        noise_sd=0.5,
        intercept=3.0,
        seed=11,
    )
    est = RandomEffectsRegressor(group_cols=["group_0"], epochs=30, random_state=0).fit(X, y)
    return est, X, y


@pytest.fixture(scope="module")
def keras_fit():
    """An ELBOModel with a hyperprior on sigma, trained briefly; group 7 has no rows."""
    rng = np.random.default_rng(3)
    features = rng.normal(size=(400, 2)).astype("float32")
    ids = rng.integers(0, 7, 400)
    offsets = rng.normal(0.0, 1.0, 8)
    y = (1.0 + features @ np.array([0.5, -1.0]) + offsets[ids] + rng.normal(0, 0.3, 400)).astype(
        "float32"
    )
    model = build_mixed_model(2, [8], scale_prior="exponential", seed=0)
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    model.fit([features, ids], y, epochs=5, batch_size=50, verbose=0)
    return model, [features, ids], y


def _layer(model, name):
    return model.network.get_layer(name)


def test_fixed_effects_of_a_keras_model_are_the_layer_posteriors(keras_fit):
    model, _, _ = keras_fit
    table = inspection.fixed_effects(model, level=0.9)
    expected = pd.concat(
        [
            _layer(model, "global_intercept").posterior_summary(0.9),
            _layer(model, "fixed_effects").posterior_summary(0.9),
        ]
    )
    assert list(table.index) == ["(Intercept)", "x0", "x1"]
    # float32 weights read into float64: equal to float32 precision.
    np.testing.assert_allclose(table.to_numpy(), expected.to_numpy(), rtol=1e-6)


def test_fixed_effects_of_an_estimator_are_on_the_data_scale(fitted):
    est, _, _ = fitted
    table = inspection.fixed_effects(est)
    assert list(table.index) == ["(Intercept)", "x0", "x1"]
    assert table.loc["(Intercept)", "mean"] == pytest.approx(est.intercept_, rel=1e-9)
    np.testing.assert_allclose(table["mean"].iloc[1:], est.coef_, rtol=1e-9)

    # By hand: [intercept_, *coef_] = shift + A [alpha, *beta] with coef_j = y_scale beta_j /
    # s_j and intercept = y_mean + y_scale (alpha - sum_j beta_j m_j / s_j), so its
    # covariance is A C A' with C the joint posterior's covariance of (alpha, beta).
    _, matrix, _ = est.data_scale()
    covariance = est.joint_posterior_.fixed_covariance()
    np.testing.assert_allclose(
        table["sd"], np.sqrt(np.diag(matrix @ covariance @ matrix.T)), rtol=1e-9
    )
    # the layers carry the joint posterior's marginal sds (float32)
    network = est.model_.network
    sd_alpha = float(network.get_layer("global_intercept").posterior().scale.numpy()[0])
    sd_beta = network.get_layer("fixed_effects").posterior().scale.numpy()[:, 0]
    np.testing.assert_allclose([sd_alpha, *sd_beta], np.sqrt(np.diag(covariance)), rtol=1e-5)
    np.testing.assert_allclose(table["lower"], table["mean"] - Z95 * table["sd"], rtol=1e-9)
    np.testing.assert_allclose(table["upper"], table["mean"] + Z95 * table["sd"], rtol=1e-9)


def test_variance_components_of_an_estimator(fitted):
    est, X, _ = fitted
    table = inspection.variance_components(est)
    assert list(table.index) == ["group_0", "Residual"]
    assert table.loc["group_0", "sd"] == pytest.approx(est.variance_components_["group_0"])
    assert table.loc["Residual", "sd"] == pytest.approx(est.noise_scale_)
    np.testing.assert_allclose(table["variance"], table["sd"] ** 2)
    assert table.loc["group_0", "groups"] == X["group_0"].nunique()
    # Point estimates (no hyperprior) have no interval.
    assert table[["lower", "upper"]].isna().all(axis=None)


def test_variance_components_with_a_hyperprior_give_lognormal_intervals(keras_fit):
    model, _, _ = keras_fit
    layer = _layer(model, "random_intercept_0")
    table = inspection.variance_components(model, level=0.9)
    q_sigma = layer.posterior()["group_scale"]
    row = table.loc["random_intercept_0"]
    assert row["sd"] == pytest.approx(float(layer.group_scale()[0]), rel=1e-6)
    assert row["lower"] == pytest.approx(float(q_sigma.quantile(0.05)[0]), rel=1e-5)
    assert row["upper"] == pytest.approx(float(q_sigma.quantile(0.95)[0]), rel=1e-5)
    assert row["groups"] == 7
    assert table.loc["Residual", "sd"] == pytest.approx(float(model.likelihood.noise_scale()))


def test_group_effects_of_an_estimator(fitted):
    est, X, y = fitted
    table = inspection.group_effects(est, "group_0", X, y, level=0.5)
    reference = est.random_effects_["group_0"]
    pd.testing.assert_index_equal(table.index, reference.index)
    np.testing.assert_allclose(table[["mean", "sd"]], reference[["mean", "sd"]])
    np.testing.assert_array_equal(table["n"], X["group_0"].value_counts()[table.index])
    half_width = NormalDist().inv_cdf(0.75) * table["sd"]
    np.testing.assert_allclose(table["upper"] - table["mean"], half_width, rtol=1e-9)
    raw = y.groupby(X["group_0"].to_numpy()).mean()[table.index]
    np.testing.assert_allclose(table["raw_mean"], raw, rtol=1e-12)
    # In a linear mixed model the group's own estimate holding the slopes fixed is the
    # within-group mean of y - x . coef_.
    adjusted = y - X[["x0", "x1"]].to_numpy() @ est.coef_
    own = adjusted.groupby(X["group_0"].to_numpy()).mean()[table.index]
    np.testing.assert_allclose(table["unpooled"], own, rtol=1e-5)
    # Partial pooling pulls the group means towards the intercept overall (group by group
    # a 30-epoch fit is too noisy to tell for groups whose own estimate is near it).
    assert np.abs(table["mean"]).sum() < np.abs(table["unpooled"] - est.intercept_).sum()


def test_group_effects_of_a_keras_model(keras_fit):
    model, (features, ids), y = keras_fit
    layer = _layer(model, "random_intercept_0")
    table = inspection.group_effects(model, X=[features, ids], y=y)
    pd.testing.assert_frame_equal(table.iloc[:, :5], layer.posterior_summary())
    assert table.loc[7, "n"] == 0 and np.isnan(table.loc[7, "raw_mean"])
    # An unseen group shows its prior Normal(0, sigma).
    assert table.loc[7, "sd"] == pytest.approx(float(layer.group_scale()[0]), rel=1e-6)
    raw = pd.Series(y).groupby(ids).mean()
    np.testing.assert_allclose(table["raw_mean"].iloc[:7], raw, rtol=1e-6)


def test_summary_renders_the_tables(fitted):
    est, X, y = fitted
    result = inspection.summary(est, X, y)
    text = str(result)
    pd.testing.assert_frame_equal(result.fixed_effects, inspection.fixed_effects(est))
    assert text.startswith("Bayesian mixed model fit by SGD on the ELBO, then lme4's REML finish")
    assert f"{-est.history_['loss'][-1]:.4f}" in text
    assert "Number of obs: 800, groups:  group_0, 15" in text
    sigma = est.variance_components_["group_0"]
    assert f" group_0  (Intercept)   {sigma**2:.4f}   {sigma:.4f}" in text
    fixed = text.split("Fixed effects:\n")[1].splitlines()
    assert fixed[0].split() == ["Estimate", "Post.SD", "2.5", "%", "97.5", "%"]
    assert fixed[1].split()[:2] == ["(Intercept)", f"{est.intercept_:.4f}"]
    # Scaled residuals of a fitted Gaussian model: median near 0, quartiles near -+0.67.
    quantiles = result.residual_quantiles
    assert abs(quantiles["Median"]) < 0.15
    assert quantiles["1Q"] == pytest.approx(-0.674, abs=0.15)


def test_summary_counts_subnetwork_weights_and_shows_intervals_under_a_hyperprior():
    model = build_mixed_model(2, [3], hidden_units=(4,), scale_prior="half_normal")
    text = str(inspection.summary(model))
    # Dense(4): 2 * 4 + 4, output Dense(1) without bias: 4.
    assert "Subnetwork f(x): 16 point-estimate weights" in text
    assert "Std.Dev.  2.5 % 97.5 %" in text
    assert "Number of obs: unknown" in text


def test_posterior_draws_follow_the_posterior(fitted):
    est, _, _ = fitted
    draws = inspection.posterior_draws(est, num_draws=4000, seed=0)
    fixed = inspection.fixed_effects(est)
    linear = np.column_stack([draws["intercept"], draws["coef"]])
    # Monte Carlo: the mean is off by about sd / sqrt(4000) = 0.016 sd, the sd by about
    # 1 / sqrt(2 * 4000) = 1.1%; allow four times that.
    assert np.all(np.abs(linear.mean(0) - fixed["mean"]) < 0.064 * fixed["sd"])
    np.testing.assert_allclose(linear.std(0), fixed["sd"], rtol=0.045)
    offsets = est.random_effects_["group_0"]
    assert np.all(np.abs(draws["offset_group_0"].mean(0) - offsets["mean"]) < 0.064 * offsets["sd"])
    np.testing.assert_allclose(draws["sigma_group_0"], est.variance_components_["group_0"])
    np.testing.assert_allclose(draws["noise_scale"], est.noise_scale_)
    again = inspection.posterior_draws(est, num_draws=4000, seed=0)
    np.testing.assert_array_equal(again["coef"], draws["coef"])


def test_posterior_draws_of_an_unseen_group_come_from_the_prior(keras_fit):
    model, _, _ = keras_fit
    draws = inspection.posterior_draws(model, num_draws=20000, seed=1)
    q_sigma = _layer(model, "random_intercept_0").posterior()["group_scale"]
    mu, s = float(q_sigma.loc[0]), float(q_sigma.scale[0])
    # b = sigma * z with sigma ~ LogNormal(mu, s): sd(b) = sqrt(E[sigma^2]) = exp(mu + s^2).
    # Monte Carlo error of the sd is a few percent with the heavy LogNormal tail.
    assert draws["offset_random_intercept_0"][:, 7].std() == pytest.approx(
        np.exp(mu + s**2), rel=0.05
    )
    assert draws["sigma_random_intercept_0"].std() > 0


def test_to_inference_data_works_with_arviz(fitted):
    arviz = pytest.importorskip("arviz")
    est, X, _ = fitted
    idata = inspection.to_inference_data(est, num_draws=500, num_chains=4, seed=0)
    posterior = idata.posterior
    assert dict(posterior.sizes) == {"chain": 4, "draw": 500, "feature": 2, "group_0": 15}
    assert list(posterior["feature"].values) == ["x0", "x1"]
    assert list(posterior["group_0"].values) == list(est.random_effects_["group_0"].index)
    table = arviz.summary(idata, var_names=["intercept", "coef"])
    assert table.loc["coef[x0]", "mean"] == pytest.approx(est.coef_[0], abs=0.01)
    # Independent draws: r_hat is 1 and the ESS about the number of draws, up to noise.
    assert (table["r_hat"] < 1.02).all()
    assert (table["ess_bulk"] > 1000).all()


def test_missing_arviz_is_a_clear_error(fitted, monkeypatch):
    monkeypatch.setitem(sys.modules, "arviz", None)
    with pytest.raises(ImportError, match=r"pip install reffects\[arviz\]"):
        inspection.to_inference_data(fitted[0], num_draws=2)


def test_bad_input_errors(fitted):
    est, X, y = fitted
    with pytest.raises(ValueError, match="not fitted"):
        inspection.fixed_effects(RandomEffectsRegressor(group_cols=["g"]))
    with pytest.raises(TypeError, match="Keras model"):
        inspection.summary(object())
    with pytest.raises(ValueError, match="grouping factors"):
        inspection.group_effects(est, "nope")
    with pytest.raises(ValueError, match="both X and y"):
        inspection.group_effects(est, X=X)
    with pytest.raises(ValueError, match="level"):
        inspection.fixed_effects(est, level=1.5)
    ids = keras.Input(shape=(), dtype="int32")
    wide = keras.Model(ids, RandomIntercept(4, units=2)(ids))
    with pytest.raises(ValueError, match="units=2"):
        inspection.variance_components(wide)
