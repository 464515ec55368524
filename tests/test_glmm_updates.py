import keras
import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

from reffects import ELBOModel, GlobalIntercept, RandomEffectsClassifier, RandomIntercept
from reffects.glmm_updates import refine_glmm
from reffects.posteriors import inverse_softplus
from reffects.training import sample_predictive


def _one_way(likelihood, y, groups, num_groups, scale_prior=None):
    ids = keras.Input(shape=(), dtype="int64")
    layer = RandomIntercept(num_groups, scale_prior=scale_prior, seed=1)
    intercept = GlobalIntercept(seed=0)
    network = keras.Model(ids, keras.layers.Add()([intercept(ids), layer(ids)]))
    model = ELBOModel(network, likelihood=likelihood, num_examples=len(y))
    layer.adapt(groups)
    return model, layer, intercept


def _poisson_data(seed=0, num_groups=15):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, num_groups, 300)
    y = rng.poisson(np.exp(0.5 + rng.normal(0, 0.6, num_groups)[groups])).astype("float64")
    return groups, y


def test_poisson_groups_satisfy_the_closed_form_stationarity_conditions():
    groups, y = _poisson_data()
    model, layer, intercept = _one_way("poisson", y, groups, 15)
    refine_glmm(model, groups, y, {layer: groups}, intercept=intercept)
    # For Poisson, E_q[exp(eta)] = exp(mu + v / 2), so the optimum of q(b[g]) = N(m, s) is
    # sum_g (y - E[exp(eta)]) = m / sigma^2 and 1 / s^2 = 1 / sigma^2 + sum_g E[exp(eta)],
    # and sigma^2 = mean(m^2 + s^2): no quadrature, an independent check.
    alpha = float(intercept.intercept_loc[0])
    alpha_sd = float(intercept.posterior().scale[0])
    offsets = layer.posterior()["offset"]
    m, s = offsets.loc.numpy()[:, 0].astype("float64"), offsets.scale.numpy()[:, 0]
    sigma = float(layer.group_scale()[0])
    rate = np.exp(alpha + m[groups] + 0.5 * (alpha_sd**2 + s[groups] ** 2))
    residual = np.bincount(groups, y - rate, minlength=15)
    # float32 storage of the weights: relative agreement to ~1e-5.
    np.testing.assert_allclose(residual, m / sigma**2, atol=1e-3)
    np.testing.assert_allclose(s**-2, sigma**-2 + np.bincount(groups, rate), rtol=1e-4)
    assert sigma**2 == pytest.approx(np.mean(m**2 + s**2), rel=1e-4)
    # The intercept: sum_i (y_i - E[exp(eta_i)]) = alpha / 10^2 (its prior is N(0, 10)).
    assert np.sum(y - rate) == pytest.approx(alpha / 100.0, abs=1e-3)


def _monte_carlo_elbo(model, x, y, draws=4000):
    """ELBO from the model's own pieces: E_q[log p(y | eta)] by draws from q (a fixed seed,
    so differences between nearby parameters have little noise) minus the layers' KL."""
    mean = sample_predictive(model, x, draws, seed=0)["mean"]
    nll = model.likelihood.nll(y[None, :, None], mean).numpy().sum(axis=(1, 2)).mean()
    model.network(x, training=False)
    kl = sum(float(loss) for layer in model.variational_layers() for loss in layer.losses)
    return -nll - kl


@pytest.mark.parametrize("scale_prior", [None, "exponential"])
def test_the_refinement_is_a_maximum_of_the_models_own_elbo(scale_prior):
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 20, 400)
    y = rng.binomial(1, expit(0.3 + rng.normal(0, 1.0, 20)[groups])).astype("float64")
    model, layer, intercept = _one_way("bernoulli", y, groups, 20, scale_prior)
    refine_glmm(model, groups, y, {layer: groups}, intercept=intercept)
    best = _monte_carlo_elbo(model, groups, y)

    def perturbed(variable, index, change, transform=None):
        values = variable.numpy()
        old = values.copy()
        if transform is None:
            values[index] += change
        else:
            values[index] = transform(values[index])
        variable.assign(values)
        elbo = _monte_carlo_elbo(model, groups, y)
        variable.assign(old)
        return elbo

    def widen(factor):
        return lambda raw: inverse_softplus(np.logaddexp(0.0, raw) * factor)

    scale_weight = (
        layer.group_scale_untransformed if scale_prior is None else layer.log_group_scale_loc
    )
    moves = [
        (intercept.intercept_loc, 0, 0.1, None),
        (intercept.intercept_loc, 0, -0.1, None),
        (layer.offset_loc, (3, 0), 0.2, None),
        (layer.offset_loc, (3, 0), -0.2, None),
        (layer.offset_untransformed_scale, (3, 0), None, widen(1.3)),
        (layer.offset_untransformed_scale, (3, 0), None, widen(1 / 1.3)),
        (scale_weight, 0, 0.15, None),
        (scale_weight, 0, -0.15, None),
    ]
    # Measured drops: 0.07-0.5 nats, nearly equal on either side (the optimum is centred to
    # within ~0.003 in alpha); with common draws the Monte Carlo differences err by far less.
    for variable, index, change, transform in moves:
        assert perturbed(variable, index, change, transform) < best, variable.name


def test_a_second_refinement_is_a_fixed_point():
    groups, y = _poisson_data(seed=3)
    model, layer, intercept = _one_way("poisson", y, groups, 15, scale_prior="exponential")
    refine_glmm(model, groups, y, {layer: groups}, intercept=intercept)
    before = layer.offset_loc.numpy().copy(), float(layer.group_scale()[0])
    assert refine_glmm(model, groups, y, {layer: groups}, intercept=intercept) <= 3
    np.testing.assert_allclose(layer.offset_loc.numpy(), before[0], atol=1e-5)
    assert float(layer.group_scale()[0]) == pytest.approx(before[1], rel=1e-5)


def test_needs_a_glm_likelihood():
    ids = keras.Input(shape=(), dtype="int64")
    layer = RandomIntercept(3)
    model = ELBOModel(keras.Model(ids, layer(ids)), likelihood="gaussian")
    with pytest.raises(ValueError, match="finish_gaussian"):
        refine_glmm(model, np.array([0, 1]), np.array([1.0, 2.0]), {layer: [0, 1]})


def test_sigma_is_recovered_from_many_small_bernoulli_groups():
    rng = np.random.default_rng(5)
    num_groups, num_rows = 2000, 16000
    groups = rng.integers(0, num_groups, num_rows)
    offsets = rng.normal(0.0, 1.0, num_groups)
    x = rng.normal(size=num_rows)
    y = rng.binomial(1, expit(-0.3 + 0.5 * x + offsets[groups]))
    X = pd.DataFrame({"g": groups, "x": x})
    clf = RandomEffectsClassifier(group_cols=["g"], random_state=0).fit(X, y)
    # ~8 rows a group carry ~1.6 units of information about each offset, so sigma^2 is
    # estimated with standard error ~sqrt(2 / G) (sigma^2 + 1 / 1.6) = 0.05, i.e. 0.026 for
    # sigma; allow 3 of them around the drawn offsets' sd. Measured: 0.998 vs 0.996.
    assert clf.variance_components_["g"] == pytest.approx(offsets.std(), abs=0.08)
    assert clf.coef_[0] == pytest.approx(0.5, abs=0.05)  # se ~0.018
