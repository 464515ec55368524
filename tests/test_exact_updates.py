import keras
import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf

from reffects import ELBOModel, FixedEffects, GlobalIntercept, RandomIntercept
from reffects.exact_updates import refine_gaussian
from reffects.training import predict_means


def _one_way(num_groups=12, seed=0):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, num_groups, 150)
    y = 1.5 + rng.normal(0, 0.8, num_groups)[groups] + rng.normal(0, 1.0, 150)
    ids = keras.Input(shape=(), dtype="int64")
    layer = RandomIntercept(num_groups)
    intercept = GlobalIntercept(loc_initializer=keras.initializers.Constant(y.mean()))
    model = ELBOModel(keras.Model(ids, keras.layers.Add()([intercept(ids), layer(ids)])))
    layer.adapt(groups)
    return model, layer, intercept, groups, y


def test_offsets_are_the_exact_conditional_posterior():
    model, layer, intercept, groups, y = _one_way()
    refine_gaussian(model, groups, y, {layer: groups})
    # Given alpha, sigma_k and sigma_y, q(b[g]) is the conjugate Normal posterior.
    alpha = float(intercept.intercept_loc.numpy()[0])
    sigma_k = float(layer.group_scale()[0])
    noise = float(model.likelihood.noise_scale())
    counts = np.bincount(groups, minlength=12)
    sums = np.bincount(groups, y - alpha, minlength=12)
    precision = counts / noise**2 + 1 / sigma_k**2
    offsets = layer.posterior()["offset"]
    np.testing.assert_allclose(offsets.loc.numpy()[:, 0], sums / noise**2 / precision, rtol=1e-4)
    np.testing.assert_allclose(offsets.scale.numpy()[:, 0], precision**-0.5, rtol=1e-4)


def test_sigma_matches_reml_for_the_one_way_model():
    model, layer, intercept, groups, y = _one_way()
    refine_gaussian(model, groups, y, {layer: groups})
    frame = pd.DataFrame({"y": y, "g": groups})
    reml = smf.mixedlm("y ~ 1", frame, groups=frame["g"]).fit(reml=True)
    # alpha is held at the mean of y rather than REML's GLS estimate, which moves sigma by a
    # fraction of a percent here (measured 0.1%); ML is 4.7% lower with these 12 groups.
    assert float(layer.group_scale()[0]) == pytest.approx(np.sqrt(reml.cov_re.iloc[0, 0]), rel=0.02)
    assert float(model.likelihood.noise_scale()) == pytest.approx(np.sqrt(reml.scale), rel=0.02)


def test_a_second_refinement_is_a_fixed_point():
    model, layer, _, groups, y = _one_way()
    refine_gaussian(model, groups, y, {layer: groups})
    before = layer.offset_loc.numpy().copy(), float(layer.group_scale()[0])
    assert refine_gaussian(model, groups, y, {layer: groups}) <= 2
    np.testing.assert_allclose(layer.offset_loc.numpy(), before[0], atol=1e-5)
    assert float(layer.group_scale()[0]) == pytest.approx(before[1], rel=1e-5)


def test_needs_a_gaussian_likelihood():
    ids = keras.Input(shape=(), dtype="int64")
    layer = RandomIntercept(3)
    model = ELBOModel(keras.Model(ids, layer(ids)), likelihood="poisson")
    with pytest.raises(ValueError, match="Gaussian likelihood"):
        refine_gaussian(model, np.array([0, 1]), np.array([1.0, 2.0]), {layer: [0, 1]})


def test_noise_scale_is_the_expected_squared_error_of_the_rows():
    # The sweeps work on per-group and per-column sums; the noise variance they end with
    # must equal the row-by-row E_q[sum_i w_i (y_i - eta_i)^2] / sum_i w_i of the final q,
    # here with weights, fixed effects and two crossed factors (whose sums need the rows).
    rng = np.random.default_rng(3)
    n, features = 400, rng.normal(size=(400, 2)).astype("float32")
    first, second = rng.integers(0, 15, n), rng.integers(0, 6, n)
    weights = rng.uniform(0.5, 2.0, n)
    y = (
        0.5
        + features @ np.array([1.0, -0.5])
        + rng.normal(0, 0.7, 15)[first]
        + rng.normal(0, 0.4, 6)[second]
        + rng.normal(0, 1.0, n)
    )
    x_in = keras.Input(shape=(2,))
    g1, g2 = keras.Input(shape=(), dtype="int64"), keras.Input(shape=(), dtype="int64")
    alpha, beta = GlobalIntercept(), FixedEffects()
    layers = RandomIntercept(15), RandomIntercept(6)
    eta = keras.layers.Add()([alpha(x_in), beta(x_in), layers[0](g1), layers[1](g2)])
    model = ELBOModel(keras.Model([x_in, g1, g2], eta))
    layers[0].adapt(first)
    layers[1].adapt(second)
    inputs = [features, first, second]
    refine_gaussian(
        model,
        inputs,
        y,
        {layers[0]: first, layers[1]: second},
        sample_weight=weights,
        intercept=alpha,
        fixed_effects=beta,
        features=features,
    )
    design = np.column_stack([np.ones(n), features])
    linear_sd = np.concatenate(
        [alpha.posterior().scale.numpy(), beta.posterior().scale.numpy()[:, 0]]
    )
    residual = y - predict_means(model.network, inputs)
    variance = (design**2) @ linear_sd**2
    for layer, ids in zip(layers, (first, second)):
        variance += layer.posterior()["offset"].scale.numpy()[ids, 0] ** 2
    expected = weights @ (residual**2 + variance) / weights.sum()
    noise = float(model.likelihood.noise_scale())
    # float32 storage of the posterior (the residual is recomputed from it) limits agreement
    # to about 1e-6 relative; a wrong term of the expansion moves it by percents.
    assert noise**2 == pytest.approx(expected, rel=1e-4)


def test_held_zero_matches_the_pass_of_the_network_for_an_additive_predictor():
    # The estimator passes held=0 when the predictor is the sum of the refined terms, to
    # skip a pass of the network; the result must equal what that pass gives.
    results = []
    for held in (None, 0.0):
        model, layer, intercept, groups, y = _one_way()
        refine_gaussian(model, groups, y, {layer: groups}, intercept=intercept, held=held)
        results.append((layer.offset_loc.numpy(), float(layer.group_scale()[0])))
    np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-6)
