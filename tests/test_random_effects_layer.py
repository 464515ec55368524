import warnings

import keras
import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
import tensorflow as tf
import tensorflow_probability as tfp

import reffects
from reffects import ELBOModel, FixedEffects, GlobalIntercept, RandomEffects, RandomIntercept
from reffects.posteriors import normal_kl

tfd = tfp.distributions


def _random_covariance(rng, size):
    """A well-conditioned random covariance matrix."""
    factor = rng.normal(size=(size, size))
    return factor @ factor.T / size + 0.2 * np.eye(size)


def _random_posterior(rng, num_groups, size):
    mean = rng.normal(size=(num_groups, size))
    covariance = np.stack([0.3 * _random_covariance(rng, size) for _ in range(num_groups)])
    return mean, covariance


def _exact_kl(layer, groups):
    """sum over `groups` of tfd.kl_divergence(q(b[g]), MVN(0, Sigma)), in float64."""
    q = layer.posterior()["offset"]
    loc = q.loc.numpy().astype("float64")[groups]
    scale_tril = q.scale.to_dense().numpy().astype("float64")[groups]
    prior_tril = np.linalg.cholesky(layer.covariance().numpy().astype("float64"))
    prior = tfd.MultivariateNormalTriL(np.zeros(layer.num_terms), prior_tril)
    return float(
        tf.reduce_sum(tfd.kl_divergence(tfd.MultivariateNormalTriL(loc, scale_tril), prior))
    )


LAYERS = [
    lambda: RandomEffects(6, num_slopes=2, seed=1),
    lambda: RandomEffects(
        6,
        num_slopes=1,
        intercept=False,
        correlated=False,
        scale_prior="exponential",
        term_names=["days"],
        initial_group_scale=0.5,
    ),
]


@pytest.mark.parametrize("make_layer", LAYERS)
def test_inference_is_deterministic_and_training_samples(make_layer):
    layer = make_layer()
    layer.adapt(np.array([0, 1, 1, 2, 3, 4, 5]))
    inputs = [np.array([0, 1, 1, 5]), np.ones((4, layer.num_slopes), "float32")]
    first, second = layer(inputs), layer(inputs)
    assert first.shape == (4, 1)
    np.testing.assert_array_equal(first, second)
    draws = [layer(inputs, training=True).numpy() for _ in range(2)]
    assert not np.allclose(draws[0], draws[1])
    assert len(layer.losses) == 1  # one KL estimate per call


@pytest.mark.parametrize("make_layer", LAYERS)
def test_config_round_trips(make_layer):
    layer = make_layer()
    clone = RandomEffects.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is RandomEffects
    assert revived.get_config() == layer.get_config()


def test_inference_output_is_the_posterior_mean_and_unseen_groups_get_zero():
    rng = np.random.default_rng(0)
    layer = RandomEffects(num_groups=5, num_slopes=2, name="school")
    layer.adapt(np.array([0, 0, 1, 2, 4]))  # group 3 has no training rows
    mean, covariance = _random_posterior(rng, 5, 3)
    layer.set_posterior(mean, covariance)
    ids = np.array([0, 1, 3, 4, 4])
    z = rng.normal(size=(5, 2)).astype("float32")
    terms = np.column_stack([np.ones(5), z])
    expected = np.sum(terms * mean[ids], axis=1)
    expected[2] = 0.0  # group 3 is new: offset 0
    out = layer([ids, z])
    assert out.shape == (5, 1)
    np.testing.assert_allclose(out.numpy()[:, 0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out, layer([ids[:, None], z]))  # ids (batch, 1) too

    # Without an intercept the terms are z alone.
    slopes = RandomEffects(num_groups=5, num_slopes=2, intercept=False)
    slopes.adapt(np.arange(5))
    slopes.set_posterior(mean[:, 1:], covariance[:, 1:, 1:])
    np.testing.assert_allclose(
        slopes([ids, z]).numpy()[:, 0], np.sum(z * mean[ids, 1:], axis=1), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "ids, message",
    [
        (
            np.array([0, 5]),
            "group id 5 is out of range for RandomEffects 'school' with num_groups=5",
        ),
        (np.array([-1, 0]), "group id -1 is out of range"),
        (np.array([0.0, 1.5]), "group id 1.5 is not an integer"),
        (np.array(["a", "b"]), "takes integer group ids"),
    ],
)
def test_bad_group_ids_raise_errors_naming_the_layer(ids, message):
    layer = RandomEffects(num_groups=5, num_slopes=1, name="school")
    z = np.zeros((2, 1), "float32")
    with pytest.raises(ValueError, match=message):
        layer([ids, z])
    with pytest.raises(ValueError, match=message):
        layer.adapt(ids)


def test_out_of_range_ids_fail_inside_a_compiled_model():
    ids, z = keras.Input(shape=(), dtype="int64"), keras.Input(shape=(1,))
    model = keras.Model([ids, z], RandomEffects(num_groups=4, num_slopes=1, name="herd")([ids, z]))
    with pytest.raises(Exception, match="out of range for RandomEffects herd"):
        model.predict([np.array([1, 9]), np.zeros((2, 1))], verbose=0)


def test_bad_z_and_inputs_raise_clear_errors():
    layer = RandomEffects(num_groups=3, num_slopes=2, name="school")
    ids = np.array([0, 1])
    message = r"RandomEffects 'school' takes z of shape \(batch, num_slopes\) = \(batch, 2\)"
    with pytest.raises(ValueError, match=message):
        layer([ids, np.zeros((2, 3), "float32")])  # unbuilt: caught in build
    layer([ids, np.zeros((2, 2), "float32")])
    with pytest.raises(ValueError, match=message):
        layer([ids, np.zeros((2, 1), "float32")])  # built: caught in call
    with pytest.raises(ValueError, match=message):
        layer([ids, np.zeros(2, "float32")])
    with pytest.raises(ValueError, match=r"takes a list \[group_ids, z\]"):
        RandomEffects(num_groups=3, num_slopes=1)(ids)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_groups": 0, "num_slopes": 1}, "`num_groups` must be a positive integer"),
        ({"num_groups": 3, "num_slopes": -1}, "`num_slopes` must be a non-negative integer"),
        ({"num_groups": 3, "num_slopes": 0, "intercept": False}, "needs at least one term"),
        ({"num_groups": 3, "num_slopes": 1, "term_names": ["a"]}, "must name the 2 terms"),
        ({"num_groups": 3, "num_slopes": 1, "scale_prior": "cauchy"}, "`scale_prior` must be"),
        ({"num_groups": 3, "num_slopes": 1, "intercept": 1}, "`intercept` must be True or False"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RandomEffects(**kwargs)


@pytest.mark.parametrize("scale_prior", [None, "half_normal"])
def test_analytic_kl_equals_tfp_kl_divergence(scale_prior):
    rng = np.random.default_rng(1)
    num_groups, size = 4, 3
    layer = RandomEffects(num_groups, num_slopes=size - 1, scale_prior=scale_prior)
    layer.adapt(np.arange(num_groups))
    mean, covariance = _random_posterior(rng, num_groups, size)
    layer.set_posterior(mean, covariance)
    if scale_prior is None:
        layer.set_covariance(_random_covariance(rng, size))
        layer([np.arange(num_groups), np.zeros((num_groups, size - 1), "float32")])
        # float32 arithmetic on terms of order 10: 1e-5 relative.
        assert float(layer.losses[0]) == pytest.approx(
            _exact_kl(layer, np.arange(num_groups)), rel=1e-5
        )
        return
    # With a hyperprior the KL is E_q(sigma)[KL(q(b) || MVN(0, Sigma(sigma)))] plus
    # KL(q(sigma) || p(sigma)); check it against Monte Carlo over q(sigma).
    layer.set_correlation(np.array([[1.0, 0.4, -0.2], [0.4, 1.0, 0.1], [-0.2, 0.1, 1.0]]))
    layer.set_group_scale_posterior([0.1, -0.5, -1.0], [0.3, 0.2, 0.4])
    layer([np.arange(num_groups), np.zeros((num_groups, size - 1), "float32")])
    q_sigma = layer.posterior()["group_scale"]
    sigma = q_sigma.sample(100_000, seed=3).numpy().astype("float64")
    r = layer.correlation().numpy().astype("float64")
    prior = tfd.MultivariateNormalTriL(
        np.zeros(size), np.linalg.cholesky(sigma[:, :, None] * r * sigma[:, None, :])
    )
    q = layer.posterior()["offset"]
    loc = q.loc.numpy().astype("float64")
    scale_tril = q.scale.to_dense().numpy().astype("float64")
    offsets = sum(
        tfd.kl_divergence(tfd.MultivariateNormalTriL(loc[g], scale_tril[g]), prior).numpy()
        for g in range(num_groups)
    )
    log_ratio = np.sum(
        q_sigma.log_prob(sigma).numpy() - tfd.HalfNormal(np.float64(1.0)).log_prob(sigma).numpy(),
        axis=1,
    )
    total = offsets + log_ratio
    bound = 5 * total.std() / np.sqrt(total.size)  # within 5 Monte Carlo standard errors
    assert abs(float(layer.losses[0]) - total.mean()) < bound


def test_batch_kl_estimates_are_unbiased_over_a_pass():
    rng = np.random.default_rng(2)
    ids = np.array([0, 0, 0, 1, 2, 2, 4, 4])  # group 3 never appears: a new group
    z = rng.normal(size=(8, 1)).astype("float32")
    layer = RandomEffects(num_groups=5, num_slopes=1)
    layer.adapt(ids)
    layer.set_posterior(*_random_posterior(rng, 5, 2))
    layer.set_covariance(np.array([[0.8, -0.2], [-0.2, 0.5]]))
    layer([ids, z])
    exact = float(layer.losses[0])
    assert exact == pytest.approx(_exact_kl(layer, [0, 1, 2, 4]), rel=1e-5)
    # A batch holding every training row once is the exact KL over the seen groups.
    layer([ids, z], training=True)
    assert float(layer.losses[0]) == pytest.approx(exact, rel=1e-5)
    # Each batch of a pass (equal sizes, a shuffled order) estimates the KL; their mean is it.
    estimates = []
    for batch in np.split(rng.permutation(8), 4):
        layer([ids[batch], z[batch]], training=True)
        estimates.append(float(layer.losses[0]))
    assert len(set(np.round(estimates, 4))) > 1
    assert np.mean(estimates) == pytest.approx(exact, rel=1e-5)


def test_set_covariance_round_trips():
    covariance = np.array([[1.0, 0.3, -0.1], [0.3, 0.25, 0.05], [-0.1, 0.05, 0.5]])
    layer = RandomEffects(num_groups=2, num_slopes=2)
    layer.adapt(np.array([0, 1]))  # builds it
    layer.set_covariance(covariance)
    # float32 weights: 1e-5 relative.
    np.testing.assert_allclose(layer.covariance(), covariance, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.group_scale(), np.sqrt(np.diag(covariance)), rtol=1e-5)
    sd = np.sqrt(np.diag(covariance))
    np.testing.assert_allclose(layer.correlation(), covariance / np.outer(sd, sd), atol=1e-5)

    independent = RandomEffects(num_groups=2, num_slopes=2, correlated=False)
    independent.adapt(np.array([0, 1]))
    independent.set_covariance(covariance)
    np.testing.assert_allclose(independent.covariance(), np.diag(np.diag(covariance)), rtol=1e-5)
    assert not any("correlation" in weight.name for weight in independent.weights)


def test_set_covariance_accepts_zero_variance_and_perfect_correlation():
    layer = RandomEffects(num_groups=2, num_slopes=1)
    layer.adapt(np.array([0, 1]))
    layer.set_covariance(np.array([[1.0, 0.0], [0.0, 0.0]]))  # a slope with no variance
    sigma = layer.group_scale().numpy()
    assert sigma[0] == pytest.approx(1.0, rel=1e-5) and sigma[1] < 1e-4
    layer([np.array([0, 1]), np.ones((2, 1), "float32")], training=True)
    assert np.isfinite(float(layer.losses[0]))
    layer.set_covariance(np.array([[1.0, 0.5], [0.5, 0.25]]))  # correlation exactly 1
    assert 0.999 < float(layer.correlation()[1, 0]) < 1.0
    layer([np.array([0, 1]), np.ones((2, 1), "float32")], training=True)
    assert np.isfinite(float(layer.losses[0]))
    with pytest.raises(ValueError, match=r"must be a finite \(2, 2\) matrix"):
        layer.set_covariance(np.eye(3))


def test_set_posterior_then_posterior_moments():
    rng = np.random.default_rng(3)
    layer = RandomEffects(num_groups=4, num_slopes=1, term_names=["(Intercept)", "days"])
    layer.adapt(np.array([0, 1, 1, 2]))  # group 3 is new
    mean, covariance = _random_posterior(rng, 4, 2)
    covariance[1] = [[0.5, 0.5], [0.5, 0.5]]  # singular: accepted with a tiny jitter
    layer.set_posterior(mean, covariance)
    layer.set_covariance(np.array([[0.9, 0.1], [0.1, 0.4]]))
    offset = layer.posterior()["offset"]
    assert isinstance(offset, tfd.MultivariateNormalTriL)
    np.testing.assert_allclose(offset.mean().numpy()[:3], mean[:3], rtol=1e-6)
    np.testing.assert_allclose(offset.covariance().numpy()[:3], covariance[:3], atol=1e-5)
    # The new group gets the prior.
    np.testing.assert_array_equal(offset.mean().numpy()[3], [0.0, 0.0])
    np.testing.assert_allclose(offset.covariance().numpy()[3], layer.covariance(), rtol=1e-6)
    np.testing.assert_allclose(
        layer.posterior()["group_scale"].mean(), np.sqrt([0.9, 0.4]), rtol=1e-5
    )

    table = layer.posterior_summary(level=0.9)
    assert list(table.columns) == ["group", "term", "mean", "sd", "lower", "upper", "n"]
    assert table["term"].tolist()[:2] == ["(Intercept)", "days"]
    assert table["n"].tolist() == [1, 1, 2, 2, 1, 1, 0, 0]
    sd = np.sqrt(np.diagonal(covariance[:3], axis1=1, axis2=2)).reshape(-1)
    np.testing.assert_allclose(table["sd"].to_numpy()[:6], sd, rtol=1e-5)
    np.testing.assert_allclose(table["sd"].to_numpy()[6:], np.sqrt([0.9, 0.4]), rtol=1e-5)
    assert (table["upper"] > table["lower"]).all()


def test_sample_posterior_moments_and_shared_draws_within_a_group():
    rng = np.random.default_rng(4)
    layer = RandomEffects(num_groups=3, num_slopes=1)
    layer.adapt(np.array([0, 1]))  # group 2 is new: draws from the prior
    mean, covariance = _random_posterior(rng, 3, 2)
    layer.set_posterior(mean, covariance)
    prior = np.array([[0.6, -0.1], [-0.1, 0.3]])
    layer.set_covariance(prior)
    ids = np.array([0, 0, 2])
    z = np.array([[1.0], [1.0], [-2.0]], "float32")
    draws = layer.sample_posterior([ids, z], num_samples=20_000, seed=5).numpy()
    assert draws.shape == (20_000, 3, 1)
    np.testing.assert_array_equal(draws[:, 0], draws[:, 1])  # one group, same z: same draw
    t0, t2 = np.array([1.0, 1.0]), np.array([1.0, -2.0])
    # 20,000 draws: the mean within 5 standard errors, the variance within 5% (its relative
    # standard error is sqrt(2 / 20000) = 1%).
    for column, terms, loc, cov in [(0, t0, mean[0], covariance[0]), (2, t2, 0.0, prior)]:
        variance = terms @ cov @ terms
        assert abs(draws[:, column, 0].mean() - terms @ np.broadcast_to(loc, 2)) < 5 * np.sqrt(
            variance / 20_000
        )
        assert draws[:, column, 0].var() == pytest.approx(variance, rel=0.05)


def test_training_draws_have_the_posterior_variance():
    layer = RandomEffects(num_groups=2, num_slopes=1, seed=7)
    layer.adapt(np.array([0, 1]))
    covariance = np.array([[0.5, 0.2], [0.2, 0.3]])
    layer.set_posterior(np.array([[1.0, -1.0], [0.0, 0.0]]), np.stack([covariance] * 2))
    ids = np.zeros(20_000, "int64")  # one draw per row
    z = np.full((20_000, 1), 2.0, "float32")
    out = layer([ids, z], training=True).numpy()[:, 0]
    terms = np.array([1.0, 2.0])
    # 20,000 rows: variance within 5% (relative standard error 1%), mean within 5 sd.
    assert out.var() == pytest.approx(terms @ covariance @ terms, rel=0.05)
    assert abs(out.mean() - (-1.0)) < 5 * np.sqrt(terms @ covariance @ terms / 20_000)


def test_training_gradients_touch_only_the_batch_groups():
    layer = RandomEffects(num_groups=1_000, num_slopes=2)
    layer.adapt(np.arange(1_000))
    ids = np.array([3, 7, 7])
    z = np.ones((3, 2), "float32")
    with tf.GradientTape() as tape:
        out = layer([ids, z], training=True)
        loss = tf.reduce_sum(out) + layer.losses[0]
    grads = tape.gradient(loss, [layer.offset_loc, layer.offset_untransformed_scale])
    for grad in grads:
        assert isinstance(grad, tf.IndexedSlices)
        assert set(grad.indices.numpy()) == {3, 7}


def test_keras_file_round_trip_gives_identical_predictions(tmp_path):
    rng = np.random.default_rng(6)
    ids_input = keras.Input(shape=(), dtype="int64", name="g")
    z_input = keras.Input(shape=(2,), name="z")
    layer = RandomEffects(
        num_groups=6, num_slopes=2, term_names=["(Intercept)", "a", "b"], name="school"
    )
    model = keras.Model([ids_input, z_input], layer([ids_input, z_input]))
    layer.adapt(np.array([0, 1, 2, 3, 4]))  # group 5 is new
    layer.set_posterior(*_random_posterior(rng, 6, 3))
    layer.set_covariance(_random_covariance(rng, 3))
    ids = np.array([0, 2, 5, 4])
    z = rng.normal(size=(4, 2)).astype("float32")
    path = tmp_path / "random_effects.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        model.predict([ids, z], verbose=0), loaded.predict([ids, z], verbose=0)
    )
    revived = loaded.get_layer("school")
    assert revived.get_config() == layer.get_config()
    assert [w.name for w in revived.weights] == [w.name for w in layer.weights]
    np.testing.assert_allclose(revived.covariance(), layer.covariance())
    assert revived.posterior_summary().equals(layer.posterior_summary())


def test_random_intercept_weights_are_unchanged_by_the_shared_base():
    # The id machinery moved to a base class RandomEffects shares; RandomIntercept's saved
    # weights keep their names and order.
    layer = RandomIntercept(num_groups=3)
    layer.adapt(np.array([0, 1]))
    assert [w.name for w in layer.weights] == [
        "offset_loc",
        "offset_untransformed_scale",
        "group_scale_untransformed",
        "group_counts",
        "total_count",
        "seen_groups",
    ]


def _simulate(num_groups=300, rows_per_group=20, seed=11):
    rng = np.random.default_rng(seed)
    covariance = np.array([[1.0, 0.3], [0.3, 0.25]])  # sds 1 and 0.5, correlation 0.6
    b = rng.multivariate_normal(np.zeros(2), covariance, size=num_groups)
    ids = np.repeat(np.arange(num_groups), rows_per_group)
    z = rng.normal(size=(ids.size, 1))
    y = 1.0 + 2.0 * z[:, 0] + b[ids, 0] + b[ids, 1] * z[:, 0] + rng.normal(0, 0.5, ids.size)
    return ids, z.astype("float32"), y.astype("float32"), b


def test_fit_recovers_the_covariance_and_the_group_coefficients():
    ids, z, y, b = _simulate()
    g = keras.Input(shape=(), dtype="int64", name="g")
    x = keras.Input(shape=(1,), name="z")
    alpha = GlobalIntercept(loc_initializer=keras.initializers.Constant(float(y.mean())), seed=0)
    beta = FixedEffects(seed=1)
    layer = RandomEffects(num_groups=300, num_slopes=1, seed=2, name="school")
    eta = keras.layers.Add()([alpha(x), beta(x), layer([g, x])])
    model = ELBOModel(keras.Model([g, x], eta), likelihood="gaussian")
    epochs, batch_size = 40, 256
    steps = epochs * -(-len(y) // batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(0.05, steps, alpha=0.02)
    model.compile(optimizer=reffects.LazyAdam(schedule))
    model.fit([ids, z], y, epochs=epochs, batch_size=batch_size, verbose=0)
    assert layer.group_counts.numpy().sum() == len(y)  # fit adapted the layer on its ids
    sigma = layer.group_scale().numpy()
    rho = float(layer.correlation()[1, 0])

    # Oracle: statsmodels MixedLM by ML, the exact optimum of the same empirical-Bayes model
    # (q can be the exact posterior here). Over 6 simulation seeds the SGD fit differed from
    # it by at most 0.009 (sd_0), 0.014 (sd_1) and 0.012 (correlation): SGD noise left at the
    # final learning rate; the bands are about 3 times that.
    frame = pd.DataFrame({"y": y, "z": z[:, 0], "g": ids})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter
        oracle = smf.mixedlm("y ~ z", frame, groups="g", re_formula="~z").fit(reml=False)
    covariance = oracle.cov_re.to_numpy()
    oracle_sd = np.sqrt(np.diag(covariance))
    np.testing.assert_allclose(sigma, oracle_sd, atol=0.04)
    assert rho == pytest.approx(covariance[0, 1] / np.prod(oracle_sd), abs=0.04)
    # Against the truth (sds 1 and 0.5, correlation 0.6) the error is that of 300 groups:
    # standard errors about 0.04, 0.022 and 0.045 (sd / sqrt(2 G) and (1 - rho^2) / sqrt(G),
    # plus the within-group noise); 4 of them.
    assert abs(sigma[0] - 1.0) < 0.16 and abs(sigma[1] - 0.5) < 0.09
    assert rho == pytest.approx(0.6, abs=0.18)
    # Per-group posterior means: measured correlations with the true b 0.99 and 0.97.
    means = layer.posterior()["offset"].mean().numpy()
    for term in range(2):
        assert np.corrcoef(means[:, term], b[:, term])[0, 1] > 0.9

    # The ELBO convention: the loss `evaluate` reports is (NLL_sum + KL) / N, computed here
    # by hand from the same weights (float32 sums over 6,000 rows: 1e-4 relative).
    result = model.evaluate([ids, z], y, batch_size=1000, verbose=0, return_dict=True)
    q_alpha, q_beta = alpha.posterior(), beta.posterior()
    terms = np.column_stack([np.ones(len(y)), z])
    mean = (
        q_alpha.loc.numpy()[0]
        + z[:, 0] * q_beta.loc.numpy()[0, 0]
        + np.sum(terms * means[ids], axis=1)
    )
    noise = float(model.likelihood.noise_scale())
    nll_sum = np.sum(0.5 * np.log(2 * np.pi * noise**2) + 0.5 * ((y - mean) / noise) ** 2)
    kl = (
        normal_kl(q_alpha.loc, q_alpha.scale, 0.0, 10.0).numpy().sum()
        + normal_kl(q_beta.loc, q_beta.scale, 0.0, 10.0).numpy().sum()
        + _exact_kl(layer, np.arange(300))
    )
    assert result["kl"] == pytest.approx(kl / len(y), rel=1e-4)
    assert result["loss"] == pytest.approx((nll_sum + kl) / len(y), rel=1e-4)

    # Posterior predictive draws go through the layer's list input. On its own training
    # rows a 90% interval covers more than 90%: each group's 2 coefficients were fitted to
    # its 20 rows, so residuals have variance ~(1 - 2/20) s^2 while the interval's is
    # ~(1 + 2/20) s^2; z = 1.645 * sqrt(1.1 / 0.9) gives 93.1%. 6,000 rows: +-2% is 4 sds.
    lower, upper = reffects.predict_interval(model, [ids, z], level=0.9, num_samples=400, seed=0)
    covered = (lower[:, 0] <= y) & (y <= upper[:, 0])
    assert 0.911 <= covered.mean() <= 0.951


@pytest.mark.parametrize("size", [2, 3, 5])
def test_correlation_cholesky_is_tfps_bijector_without_its_overhead(size):
    # The layer's R is stored in tfp.bijectors.CorrelationCholesky's layout (saved .keras
    # files hold it); the Keras-ops version must be that map and its inverse, to float32
    # rounding (the tolerance) in the forward direction.
    from reffects.layers import correlation_cholesky, correlation_unconstrained

    x = np.random.default_rng(size).normal(size=size * (size - 1) // 2).astype("float32")
    expected = tfp.bijectors.CorrelationCholesky()(x).numpy()
    chol = keras.ops.convert_to_numpy(correlation_cholesky(x, size))
    np.testing.assert_allclose(chol, expected, atol=1e-6)
    np.testing.assert_allclose(correlation_unconstrained(expected), x, rtol=1e-5, atol=1e-6)
    layer = RandomEffects(4, size - 1)
    layer.build([(None,), (None, size - 1)])
    layer.adapt(np.arange(4))
    mean, covariance = _random_posterior(np.random.default_rng(0), 4, size)
    layer.set_posterior(mean, covariance)
    offset = layer.posterior()["offset"]
    moments = layer.posterior_moments()
    np.testing.assert_allclose(moments[0], offset.mean().numpy(), atol=1e-6)
    np.testing.assert_allclose(moments[1], offset.covariance().numpy(), rtol=1e-5, atol=1e-6)
