import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from reffects import FixedEffects, GlobalIntercept, RandomIntercept
from reffects.posteriors import normal_kl

tfd = tfp.distributions

LAYERS = [
    lambda: GlobalIntercept(units=2, prior_scale=3.0, seed=1),
    lambda: FixedEffects(units=2, prior_scale=2.0, seed=1),
    lambda: RandomIntercept(num_groups=6, units=2, scale_prior="exponential", seed=1),
    lambda: RandomIntercept(num_groups=6, seed=1),
]


def _inputs(layer):
    if isinstance(layer, RandomIntercept):
        return np.array([0, 1, 1, 5])
    return np.random.default_rng(0).normal(size=(4, 3)).astype("float32")


@pytest.mark.parametrize("make_layer", LAYERS)
def test_config_round_trips(make_layer):
    layer = make_layer()
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is type(layer)
    assert revived.get_config() == layer.get_config()


@pytest.mark.parametrize("make_layer", LAYERS)
def test_inference_is_deterministic_and_training_samples(make_layer):
    layer = make_layer()
    x = _inputs(layer)
    if isinstance(layer, RandomIntercept):
        layer.adapt(np.array([0, 1, 1, 2, 3, 4, 5]))
    first, second = layer(x), layer(x)
    assert first.shape == (4, layer.units)
    np.testing.assert_array_equal(first, second)
    draws = [layer(x, training=True).numpy() for _ in range(2)]
    assert not np.allclose(draws[0], draws[1])
    assert len(layer.losses) == 1  # one KL estimate per call


def test_global_intercept_kl_is_analytic():
    layer = GlobalIntercept(prior_loc=1.0, prior_scale=2.0)
    layer(np.zeros((3, 1)))
    q = layer.posterior()
    expected = tfd.kl_divergence(q, tfd.Normal(1.0, 2.0)).numpy().sum()
    assert float(layer.losses[0]) == pytest.approx(expected, rel=1e-5)


def test_fixed_effects_training_draws_have_the_posterior_variance():
    layer = FixedEffects(initial_posterior_scale=0.5)
    x = np.array([[1.0, 2.0], [2.0, 4.0]], dtype="float32")
    draws = np.stack([layer(x, training=True).numpy()[:, 0] for _ in range(3000)])
    # One beta per batch: the second row is exactly twice the first in every draw.
    np.testing.assert_allclose(draws[:, 1], 2 * draws[:, 0], rtol=1e-5, atol=1e-6)
    # Var(x . beta) = sum_j x_j^2 scale_j^2 = (1 + 4) * 0.25; 3,000 draws give a relative
    # sd of the variance of sqrt(2 / 3000) = 2.6%, so 10% is a 4-sigma band.
    assert draws[:, 0].var() == pytest.approx(1.25, rel=0.1)
    assert draws[:, 0].mean() == pytest.approx(0.0, abs=0.1)  # 5 sd of the mean of 3,000


def test_random_intercept_training_kl_sums_over_units():
    ids = np.array([0, 0, 1, 3, 3, 3])
    layer = RandomIntercept(num_groups=4, units=2, initial_group_scale=0.6)
    layer.adapt(ids)
    layer.offset_loc.assign(np.arange(8, dtype="float32").reshape(4, 2) / 5)
    layer(ids, training=True)  # every training row once: the exact KL over seen groups
    q = layer.posterior()["offset"]
    exact = normal_kl(q.loc, q.scale, 0.0, 0.6).numpy()[[0, 1, 3]].sum()
    assert float(layer.losses[0]) == pytest.approx(exact, rel=1e-5)


def test_random_intercept_training_kl_is_unbiased_over_the_data():
    ids = np.array([0, 0, 0, 1, 2, 2, 4])  # group 3 never appears: a new group
    layer = RandomIntercept(num_groups=5, initial_group_scale=0.7)
    layer.adapt(ids)
    layer.offset_loc.assign(np.arange(5, dtype="float32")[:, None] / 3)
    # A batch holding every training row once: charging each row KL_g / n_g sums to the
    # exact KL over the seen groups (groups 0, 1, 2, 4).
    layer(ids, training=True)
    q = layer.posterior()["offset"]
    exact = normal_kl(q.loc, q.scale, 0.0, 0.7).numpy()[[0, 1, 2, 4]].sum()
    assert float(layer.losses[0]) == pytest.approx(exact, rel=1e-5)
    # Inference mode reports the same exact KL.
    layer(ids)
    assert float(layer.losses[0]) == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("scale_prior", [None, "exponential"])
def test_single_row_kl_estimates_average_to_the_exact_kl(scale_prior):
    ids = np.array([0, 0, 0, 1, 2, 2, 4])
    layer = RandomIntercept(num_groups=5, scale_prior=scale_prior, initial_group_scale=0.7)
    layer.adapt(ids)
    layer.offset_loc.assign(np.linspace(-1.0, 1.0, 5, dtype="float32")[:, None])
    layer(ids)
    exact = float(layer.losses[0])
    # Each one-row batch is an estimate; over the rows of the data they average to the
    # exact KL (unbiasedness, up to float32 rounding).
    estimates = []
    for group in ids:
        layer(np.array([group]), training=True)
        estimates.append(float(layer.losses[0]))
    assert len(set(np.round(estimates, 5))) > 1
    assert np.mean(estimates) == pytest.approx(exact, rel=1e-5)


def test_new_group_gets_zero_offset_and_the_prior():
    layer = RandomIntercept(num_groups=3, initial_group_scale=0.4)
    layer.adapt(np.array([0, 1, 1]))
    layer.offset_loc.assign(np.ones((3, 1), "float32"))
    np.testing.assert_allclose(layer(np.array([0, 2]))[:, 0], [1.0, 0.0])
    posterior = layer.posterior()["offset"]
    assert float(posterior.loc[2, 0]) == 0.0
    assert float(posterior.scale[2, 0]) == pytest.approx(0.4, rel=1e-4)
    assert layer.posterior_summary().loc[2, "n"] == 0


def test_hyperprior_kl_is_the_expectation_over_q_sigma():
    layer = RandomIntercept(num_groups=2, scale_prior="half_normal", initial_group_scale=0.8)
    layer.adapt(np.array([0, 1]))
    layer.offset_loc.assign([[0.5], [-0.2]])
    layer(np.array([0, 1]))
    q_sigma = layer.posterior()["group_scale"]
    sigma = q_sigma.sample(200_000, seed=3).numpy()[:, 0]
    offsets = layer.posterior()["offset"]
    loc, scale = offsets.loc.numpy()[:, 0], offsets.scale.numpy()[:, 0]
    per_draw = normal_kl(loc[None], scale[None], 0.0, sigma[:, None]).numpy().sum(1)
    log_ratio = (
        q_sigma.log_prob(sigma[:, None]).numpy()[:, 0] - tfd.HalfNormal(1.0).log_prob(sigma).numpy()
    )
    total = per_draw + log_ratio
    # Analytic vs Monte Carlo: within 5 standard errors of the MC mean.
    bound = 5 * total.std() / np.sqrt(total.size)
    assert abs(float(layer.losses[0]) - total.mean()) < bound


def test_batch_gradient_touches_only_the_batch_groups():
    layer = RandomIntercept(num_groups=1_000)
    layer.adapt(np.arange(1_000))
    with tf.GradientTape() as tape:
        out = layer(np.array([3, 7, 7]), training=True)
        loss = tf.reduce_sum(out) + layer.losses[0]
    grad = tape.gradient(loss, layer.offset_loc)
    assert isinstance(grad, tf.IndexedSlices)
    assert set(grad.indices.numpy()) == {3, 7}


@pytest.mark.parametrize(
    "ids, message",
    [
        (
            np.array([0, 5]),
            "group id 5 is out of range for RandomIntercept 'zip' with num_groups=5",
        ),
        (np.array([-1, 0]), "group id -1 is out of range"),
        (np.array([0.0, 1.5]), "group id 1.5 is not an integer"),
        (np.array(["a", "b"]), "takes integer group ids"),
    ],
)
def test_bad_group_ids_raise_clear_errors(ids, message):
    layer = RandomIntercept(num_groups=5, name="zip")
    with pytest.raises(ValueError, match=message):
        layer(ids)
    with pytest.raises(ValueError, match=message):
        layer.adapt(ids)


def test_out_of_range_ids_fail_inside_a_compiled_model():
    ids = keras.Input(shape=(), dtype="int64")
    model = keras.Model(ids, RandomIntercept(num_groups=4, name="herd")(ids))
    # predict runs a traced graph, where tf.gather on a GPU would return zeros silently.
    with pytest.raises(Exception, match="out of range for RandomIntercept herd"):
        model.predict(np.array([1, 9]), verbose=0)


def test_training_checks_ids_in_the_graph_before_and_after_adapt():
    ids = keras.Input(shape=(), dtype="int64")
    layer = RandomIntercept(num_groups=4, name="herd")
    model = keras.Model(ids, layer(ids))
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(Exception, match="out of range for RandomIntercept herd"):
        model.fit(np.array([1, 9]), np.zeros(2), verbose=0)
    with pytest.raises(ValueError, match="group id 9 is out of range"):
        layer.adapt(np.array([1, 9]))
    # adapt checks the ids it counts, not those training is then fed.
    layer.adapt(np.array([1, 3]))
    with pytest.raises(Exception, match="out of range for RandomIntercept herd"):
        model.fit(np.array([1, 9]), np.zeros(2), verbose=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_groups": 0}, "`num_groups` must be a positive integer. Received: num_groups=0"),
        ({"num_groups": 2.5}, "`num_groups` must be a positive integer"),
        ({"num_groups": 3, "units": 0}, "`units` must be a positive integer"),
        ({"num_groups": 3, "initial_group_scale": -1.0}, "`initial_group_scale` must be positive"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RandomIntercept(**kwargs)


def test_posterior_summaries_are_tables():
    layer = FixedEffects()
    layer(np.ones((2, 3), "float32"))
    table = layer.posterior_summary(level=0.9)
    assert list(table.columns) == ["mean", "sd", "lower", "upper"]
    assert len(table) == 3
    assert (table["upper"] > table["lower"]).all()
