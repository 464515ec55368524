import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from reffects import Bernoulli, Binomial, ELBOModel, Gaussian, GlobalIntercept, Poisson
from reffects.likelihoods import get_likelihood

tfd = tfp.distributions

RNG = np.random.default_rng(0)
ETA = RNG.normal(0.0, 1.5, size=(50, 2)).astype("float32")
TRIALS = RNG.integers(1, 30, size=50).astype("float32")
WEIGHTS = RNG.uniform(0.0, 3.0, size=50).astype("float32")


def _reference(likelihood, y, eta, weight):
    """-log p(y | eta) from the TFP distribution of the same family, one value per entry."""
    if isinstance(likelihood, Gaussian):
        dist = tfd.Normal(eta, likelihood.noise_scale())
    elif isinstance(likelihood, Bernoulli):
        dist = tfd.Bernoulli(logits=eta, dtype=tf.float32)
    elif isinstance(likelihood, Poisson):
        dist = tfd.Poisson(log_rate=eta)
    else:  # y is a proportion of `weight` trials
        trials = weight[:, None]
        return -tfd.Binomial(trials, logits=eta).log_prob(y * trials).numpy()
    return -weight[:, None] * dist.log_prob(y).numpy()


def _targets(likelihood):
    if isinstance(likelihood, Gaussian):
        return RNG.normal(size=ETA.shape).astype("float32")
    if isinstance(likelihood, Bernoulli):
        return RNG.integers(0, 2, size=ETA.shape).astype("float32")
    if isinstance(likelihood, Poisson):
        return RNG.poisson(3.0, size=ETA.shape).astype("float32")
    successes = RNG.binomial(TRIALS.astype(int)[:, None], 0.4, size=ETA.shape)
    return (successes / TRIALS[:, None]).astype("float32")


LIKELIHOODS = [
    lambda: Gaussian(initial_noise_scale=1.7),
    Bernoulli,
    Binomial,
    Poisson,
]


@pytest.mark.parametrize("make", LIKELIHOODS)
def test_nll_is_minus_the_tfp_log_prob(make):
    likelihood = make()
    y = _targets(likelihood)
    weight = TRIALS if isinstance(likelihood, Binomial) else WEIGHTS
    mean = likelihood(ETA)
    nll = likelihood.nll(y, mean, weight).numpy()
    # float32 throughout; the Binomial's lgamma terms reach ~60, hence the absolute part.
    np.testing.assert_allclose(nll, _reference(likelihood, y, ETA, weight), rtol=1e-4, atol=2e-4)
    assert likelihood.nll(y, mean).shape == ETA.shape


@pytest.mark.parametrize("make", LIKELIHOODS)
@pytest.mark.parametrize("weighted", [False, True])
def test_mean_nll_is_the_mean_of_the_rows_nll_summed_over_outputs(make, weighted):
    # The training loss's data term; the Gaussian adds its constant after averaging.
    likelihood = make()
    y = _targets(likelihood)
    weight = TRIALS if isinstance(likelihood, Binomial) else WEIGHTS
    weight = weight if weighted or isinstance(likelihood, Binomial) else None
    mean = likelihood(ETA)
    expected = likelihood.nll(y, mean, weight).numpy().sum(axis=-1).mean()
    assert float(likelihood.mean_nll(y, mean, weight)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("make", LIKELIHOODS)
def test_link_inverts_the_mean_and_config_round_trips(make):
    likelihood = make()
    np.testing.assert_allclose(likelihood.link(likelihood(ETA)), ETA, rtol=1e-4, atol=1e-4)
    clone = type(likelihood).from_config(likelihood.get_config())
    assert clone.get_config() == likelihood.get_config()
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(likelihood))
    assert type(revived) is type(likelihood)
    assert revived.get_config() == likelihood.get_config()


@pytest.mark.parametrize("name", ["gaussian", "bernoulli", "binomial", "poisson"])
def test_draws_have_the_family_mean_and_variance(name):
    likelihood = get_likelihood(name)
    mean = likelihood(np.full((20000, 1), 0.4, dtype="float32"))
    trials = np.full((20000, 1), 7.0, dtype="float32") if name == "binomial" else None
    draws = likelihood.sample(mean, trials=trials, seed=3).numpy()
    # As a Python float: pytest >= 9.2 rejects a NumPy float32 tolerance in `approx`.
    expected_var = float(np.asarray(likelihood.variance(mean, trials)).mean())
    # 20,000 draws: the sample mean is within 4 standard errors; the variance within 5%.
    assert draws.mean() == pytest.approx(float(mean[0, 0]), abs=4 * np.sqrt(expected_var / 20000))
    assert draws.var() == pytest.approx(expected_var, rel=0.05)


def test_get_likelihood_rejects_an_unknown_name():
    with pytest.raises(ValueError, match=r"`likelihood` must be one of \['bernoulli'"):
        get_likelihood("gamma")


BAD_TARGETS = [
    (
        "bernoulli",
        [0, 1, 2],
        None,
        "y must be 0 or 1 for the Bernoulli likelihood; got y=2 at row 2",
    ),
    ("binomial", [0.5, 1.5], [2, 2], r"y must be a proportion in \[0, 1\].*got y=1.5 at row 1"),
    (
        "binomial",
        [0.5, 0.5],
        [2, 0],
        r"trials \(sample_weight\) must be a whole number >= 1.*=0 at",
    ),
    ("binomial", [0.5, 0.5], [2, 2.5], r"whole number >= 1.*=2.5 at row 1"),
    ("binomial", [0.5, 0.3], [2, 2], r"y \* trials must be a whole number of successes.*=0.6 at"),
    ("binomial", [0.0, 0.5], None, r"y \* trials must be a whole number.*=0.5 at row 1"),
    ("poisson", [1, -1], None, r"y must be a count \(0, 1, 2, ...\).*got y=-1 at row 1"),
    ("poisson", [1, 2.5], None, r"y must be a count.*got y=2.5 at row 1"),
    ("gaussian", [1, np.nan], None, r"y contains NaN or infinity \(first at row 1\)"),
    ("gaussian", [1, 2], [1, -1], "sample_weight must be non-negative; got sample_weight=-1 at"),
]


@pytest.mark.parametrize("name, y, weight, message", BAD_TARGETS)
def test_values_outside_the_support_are_errors(name, y, weight, message):
    with pytest.raises(ValueError, match=message):
        get_likelihood(name).check_targets(np.array(y, dtype=float), weight)


def test_fit_rejects_targets_outside_the_support():
    x = keras.Input(shape=(1,))
    model = ELBOModel(keras.Model(x, GlobalIntercept()(x)), likelihood="binomial")
    model.compile(optimizer="adam")
    features = np.zeros((4, 1), dtype="float32")
    with pytest.raises(ValueError, match="y must be a proportion in"):
        model.fit(features, np.array([0.0, 0.5, 1.0, 1.2]), sample_weight=np.full(4, 10.0))
    with pytest.raises(ValueError, match="trials"):
        model.evaluate(features, np.array([0.0, 0.5, 1.0, 1.0]), sample_weight=np.zeros(4))
