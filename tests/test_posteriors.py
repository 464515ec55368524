import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from scipy import stats

from reffects.posteriors import (
    Exponential,
    HalfNormal,
    get_scale_prior,
    inverse_softplus,
    normal_kl,
    normal_summary,
    positive,
    row_noise,
)

tfd = tfp.distributions


def test_inverse_softplus_round_trips():
    for value in [1e-3, 0.1, 1.0, 7.5]:
        assert float(positive(tf.constant(inverse_softplus(value)))) == pytest.approx(value, 1e-5)


def test_normal_kl_matches_tfp():
    loc_q, scale_q = np.array([0.3, -1.0]), np.array([0.2, 2.0])
    expected = tfd.kl_divergence(
        tfd.Normal(loc_q, scale_q), tfd.Normal(np.float64(0.5), np.float64(1.5))
    ).numpy()
    np.testing.assert_allclose(normal_kl(loc_q, scale_q, 0.5, 1.5), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "prior, reference",
    [(Exponential(1.3), tfd.Exponential(1.3)), (HalfNormal(0.8), tfd.HalfNormal(0.8))],
)
def test_hyperprior_kl_matches_monte_carlo(prior, reference):
    mu, s = -0.4, 0.3
    q = tfd.LogNormal(mu, s)
    draws = q.sample(400_000, seed=1)
    log_ratio = (q.log_prob(draws) - reference.log_prob(draws)).numpy()
    analytic = float(prior.kl_from_lognormal(tf.constant(mu), tf.constant(s)))
    # The Monte Carlo mean has standard error sd / sqrt(n); 5 of them is a safe bound.
    bound = 5 * log_ratio.std() / np.sqrt(log_ratio.size)
    assert abs(analytic - log_ratio.mean()) < bound


def test_scale_prior_lookup_and_errors():
    assert isinstance(get_scale_prior("exponential"), Exponential)
    assert get_scale_prior(None) is None
    with pytest.raises(ValueError, match="scale_prior"):
        get_scale_prior("cauchy")
    with pytest.raises(ValueError, match="rate"):
        Exponential(0.0)


def test_normal_summary_interval():
    table = normal_summary([0.0], [1.0], level=0.95)
    assert table["upper"][0] == pytest.approx(1.959964, 1e-5)
    with pytest.raises(ValueError, match="level"):
        normal_summary([0.0], [1.0], level=1.5)


def test_row_noise_is_standard_normal_and_fresh_at_every_call():
    generator = keras.random.SeedGenerator(3)
    # An odd size inside a traced function with an unknown batch size, as in training.
    draw = tf.function(
        lambda x: row_noise(tf.shape(x), generator),
        input_signature=[tf.TensorSpec((None, 1), tf.float32)],
    )
    first = draw(tf.zeros((50_001, 1))).numpy()
    second = draw(tf.zeros((50_001, 1))).numpy()
    assert first.shape == (50_001, 1)
    # KS against N(0, 1): with 50,001 draws a p-value under 0.01 would be a real departure.
    assert stats.kstest(first[:, 0], "norm").pvalue > 0.01
    # The cosine and sine halves of Box-Muller are independent; so are two calls.
    half = 25_000
    for a, b in [(first[:half, 0], first[half : 2 * half, 0]), (first[:, 0], second[:, 0])]:
        assert abs(np.corrcoef(a, b)[0, 1]) < 4 / np.sqrt(len(a))  # 4 sd of a zero correlation
