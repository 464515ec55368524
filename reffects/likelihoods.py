"""Likelihoods p(y | eta): each maps the linear predictor to the response mean and scores y.

A likelihood is a Keras layer so that parameters it learns (the Gaussian noise scale) are
trained and saved with the model. `ELBOModel` calls it on the predictor eta, which gives the
response mean (the inverse link of eta), and asks it for the negative log-likelihood of each
row given that mean.

| family      | link                       | y                      | `sample_weight`           |
|-------------|----------------------------|------------------------|---------------------------|
| Gaussian    | -                          | any real               | row weight                |
| Bernoulli   | logit                      | 0 or 1                 | row weight                |
| Binomial    | logit                      | proportion in [0, 1]   | trials n (as R's `glm`)   |
| Poisson     | log                        | count 0, 1, 2, ...     | row weight                |
| Categorical | softmax, class 0 reference | one-hot row, K classes | row weight                |

A Categorical likelihood of K classes takes a predictor eta of K - 1 columns, the log odds
of classes 1, ..., K - 1 against class 0 (whose eta is 0), and returns the K probabilities;
every other likelihood takes one column (`predictor_units`).

The Binomial NLL is the exact one, log C(n, n y) included, so reported losses are true
negative log-likelihoods. Probabilities are clipped to [1e-7, 1 - 1e-7] before their log is
taken (as Keras's cross-entropy on probabilities does); rates to at least 1e-30.
"""

import math

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from keras import ops

from reffects.posteriors import inverse_softplus, positive

tfd = tfp.distributions

_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)
PROBABILITY_EPSILON = 1e-7
"""Probabilities are clipped to [PROBABILITY_EPSILON, 1 - PROBABILITY_EPSILON] in the NLL."""
_RATE_FLOOR = 1e-30
_WHOLE_NUMBER_TOLERANCE = 1e-6


def _as_float_array(name, values):
    array = np.asarray(values)
    try:
        array = array.astype("float64")
    except (ValueError, TypeError):
        raise ValueError(f"{name} must be numeric. Received dtype {array.dtype}") from None
    bad = ~np.isfinite(array)
    if bad.any():
        raise ValueError(f"{name} contains NaN or infinity (first at row {_first_row(bad, array)})")
    return array


def _first_row(mask, array):
    return int(np.argwhere(mask.reshape(len(array), -1))[0, 0])


def _first_bad(name, values, mask, expected):
    """Raises the error for the first entry of `values` where `mask` holds."""
    row = _first_row(mask, values)
    value = values.reshape(len(values), -1)[mask.reshape(len(values), -1)][0]
    raise ValueError(f"{name} must be {expected}; got {name}={value:g} at row {row}")


def _is_whole(values):
    return np.abs(values - np.round(values)) <= _WHOLE_NUMBER_TOLERANCE * np.maximum(1.0, values)


def _weighted(nll, sample_weight):
    if sample_weight is None:
        return nll
    return nll * ops.expand_dims(ops.cast(sample_weight, nll.dtype), -1)


class Likelihood(keras.layers.Layer):
    """Base class of the likelihoods.

    `call(eta)` returns the response mean; `nll(y, mean, sample_weight)` the negative
    log-likelihood of each row (times its weight) and `mean_nll` its mean over the rows,
    summed over the outputs (the training loss's data term); `sample(mean, ...)` draws y;
    `link(mean)`
    maps a mean back to eta; `check_targets(y, sample_weight)` rejects y outside the
    family's support with a `ValueError` naming the value and the row.
    `predictor_units` is the number of columns of eta it takes (1 but for `Categorical`).
    """

    predictor_units = 1

    def link(self, mean):
        raise NotImplementedError

    def nll(self, y, mean, sample_weight=None):
        raise NotImplementedError

    def mean_nll(self, y, mean, sample_weight=None):
        """The mean over rows of `nll`, summed over the outputs: a scalar."""
        return ops.mean(ops.sum(self.nll(y, mean, sample_weight), axis=-1))

    def sample(self, mean, trials=None, seed=None):
        raise NotImplementedError

    def variance(self, mean, trials=None):
        """Var(y | mean): the variance of one response given its mean."""
        raise NotImplementedError

    def check_targets(self, y, sample_weight=None):
        """Checks y (and the weights) eagerly; returns y as a float64 array."""
        y = _as_float_array("y", y)
        if sample_weight is not None:
            weight = _as_float_array("sample_weight", sample_weight)
            if weight.shape[0] != y.shape[0]:
                raise ValueError(f"sample_weight has {weight.shape[0]} rows but y has {y.shape[0]}")
            if (weight < 0).any():
                _first_bad("sample_weight", weight, weight < 0, "non-negative")
        return y

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="reffects")
class Gaussian(Likelihood):
    """y ~ Normal(eta, noise_scale), with noise_scale learned as a point estimate.

    Args:
        initial_noise_scale: starting value of the noise standard deviation.

    Example:
        >>> likelihood = Gaussian(initial_noise_scale=2.0)
        >>> round(float(likelihood.noise_scale()), 4)
        2.0
    """

    def __init__(self, initial_noise_scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not initial_noise_scale > 0:
            raise ValueError(
                "`initial_noise_scale` must be positive. "
                f"Received: initial_noise_scale={initial_noise_scale}"
            )
        self.initial_noise_scale = float(initial_noise_scale)
        self.noise_scale_untransformed = self.add_weight(
            name="noise_scale_untransformed",
            shape=(),
            initializer=keras.initializers.Constant(inverse_softplus(initial_noise_scale)),
        )
        self.built = True

    def noise_scale(self):
        """The noise standard deviation sigma_y."""
        return positive(self.noise_scale_untransformed)

    def set_noise_scale(self, value):
        """Sets sigma_y's point estimate."""
        self.noise_scale_untransformed.assign(inverse_softplus(float(value)))

    def call(self, eta):
        return eta

    def link(self, mean):
        return mean

    def nll(self, y, mean, sample_weight=None):
        sigma = self.noise_scale()
        nll = _HALF_LOG_TWO_PI + ops.log(sigma) + 0.5 * ops.square((y - mean) / sigma)
        return _weighted(nll, sample_weight)

    def mean_nll(self, y, mean, sample_weight=None):
        # The constant and log(sigma) are added once, after the rows are averaged: two
        # operations per row (and their gradients) fewer than averaging `nll`.
        squares = _weighted(ops.square(y - mean), sample_weight)
        units = ops.shape(mean)[-1]
        weight = 1.0 if sample_weight is None else ops.mean(ops.cast(sample_weight, mean.dtype))
        sigma = self.noise_scale()
        constant = ops.cast(units, mean.dtype) * weight * (_HALF_LOG_TWO_PI + ops.log(sigma))
        return constant + 0.5 * ops.mean(ops.sum(squares, axis=-1)) / ops.square(sigma)

    def sample(self, mean, trials=None, seed=None):
        noise = keras.random.normal(ops.shape(mean), seed=seed, dtype=mean.dtype)
        return mean + self.noise_scale() * noise

    def variance(self, mean, trials=None):
        return ops.square(self.noise_scale()) * ops.ones_like(mean)

    def get_config(self):
        config = super().get_config()
        config.update(initial_noise_scale=self.initial_noise_scale)
        return config


def _clipped_probability(mean):
    return ops.clip(mean, PROBABILITY_EPSILON, 1.0 - PROBABILITY_EPSILON)


def _assert_no_nan(values, what):
    """An op that fails when `values` holds a NaN (eagerly: raises at once)."""
    return tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(tf.math.is_nan(values))),
        [f"cannot sample y: a {what} is NaN (did training diverge?)"],
    )


def _stateless(seed):
    """A TFP stateless seed from an int or None."""
    if seed is None:
        seed = np.random.default_rng().integers(2**31 - 1)
    return tf.constant([int(seed) % (2**31 - 1), 0], dtype="int32")


class _LogitLink(Likelihood):
    """Shared by the families of a probability p = sigmoid(eta)."""

    def call(self, eta):
        return ops.sigmoid(eta)

    def link(self, mean):
        p = _clipped_probability(ops.convert_to_tensor(mean))
        return ops.log(p) - ops.log1p(-p)


@keras.saving.register_keras_serializable(package="reffects")
class Bernoulli(_LogitLink):
    """y ~ Bernoulli(p), logit(p) = eta; y is 0 or 1.

    `call(eta)` returns p = sigmoid(eta). A row with weight w counts w times.

    Example:
        >>> likelihood = Bernoulli()
        >>> float(likelihood(np.array([[0.0]], dtype="float32"))[0, 0])
        0.5
    """

    def nll(self, y, mean, sample_weight=None):
        p = _clipped_probability(mean)
        nll = -(tf.math.xlogy(y, p) + tf.math.xlogy(1.0 - y, 1.0 - p))
        return _weighted(nll, sample_weight)

    def sample(self, mean, trials=None, seed=None):
        return tfd.Bernoulli(probs=mean, dtype=mean.dtype).sample(seed=_stateless(seed))

    def variance(self, mean, trials=None):
        return mean * (1.0 - mean)

    def check_targets(self, y, sample_weight=None):
        y = super().check_targets(y, sample_weight)
        bad = (y != 0) & (y != 1)
        if bad.any():
            _first_bad("y", y, bad, "0 or 1 for the Bernoulli likelihood")
        return y


@keras.saving.register_keras_serializable(package="reffects")
class Binomial(_LogitLink):
    """n y ~ Binomial(n, p), logit(p) = eta; y is the proportion of n trials.

    As in R's `glm(family=binomial)`, y is the proportion of successes and the trials n come
    as the sample weight (1 when none is given). The NLL of a row is the exact binomial one,
    -log C(n, n y) - n y log p - n (1 - y) log(1 - p). `call(eta)` returns p = sigmoid(eta),
    and `sample` returns proportions.

    Example:
        >>> likelihood = Binomial()
        >>> y, trials = np.array([[0.3]]), np.array([10.0])
        >>> nll = likelihood.nll(y, np.array([[0.3]]), trials)
        >>> round(float(nll[0, 0]), 4)  # -log Binomial(3 | 10, 0.3)
        1.3212
    """

    def nll(self, y, mean, sample_weight=None):
        mean = ops.convert_to_tensor(mean)
        y = ops.cast(y, mean.dtype)
        p = _clipped_probability(mean)
        if sample_weight is None:
            trials = ops.ones_like(y)
        else:
            trials = ops.expand_dims(ops.cast(sample_weight, mean.dtype), -1)
        successes = trials * y
        failures = trials - successes
        log_choose = (
            tf.math.lgamma(trials + 1.0)
            - tf.math.lgamma(successes + 1.0)
            - tf.math.lgamma(failures + 1.0)
        )
        return -(log_choose + tf.math.xlogy(successes, p) + tf.math.xlogy(failures, 1.0 - p))

    def sample(self, mean, trials=None, seed=None):
        trials = ops.ones_like(mean) if trials is None else ops.cast(trials, mean.dtype)
        with tf.control_dependencies([_assert_no_nan(mean, "Binomial probability")]):
            counts = tfd.Binomial(total_count=trials, probs=mean).sample(seed=_stateless(seed))
        return counts / trials

    def variance(self, mean, trials=None):
        trials = 1.0 if trials is None else trials
        return mean * (1.0 - mean) / trials

    def check_targets(self, y, sample_weight=None):
        y = super().check_targets(y, sample_weight)
        bad = (y < 0) | (y > 1)
        if bad.any():
            _first_bad("y", y, bad, "a proportion in [0, 1] for the Binomial likelihood")
        if sample_weight is None:
            trials = np.ones(len(y))
        else:
            trials = np.asarray(sample_weight, dtype="float64").reshape(len(y))
            bad = (trials < 1) | ~_is_whole(trials)
            if bad.any():
                _first_bad(
                    "trials (sample_weight)",
                    trials,
                    bad,
                    "a whole number >= 1 for the Binomial likelihood",
                )
        successes = y * trials.reshape((-1,) + (1,) * (y.ndim - 1))
        bad = ~_is_whole(successes)
        if bad.any():
            _first_bad(
                "y * trials",
                successes,
                bad,
                "a whole number of successes for the Binomial likelihood (y is the "
                "proportion of successes, sample_weight the number of trials)",
            )
        return y


@keras.saving.register_keras_serializable(package="reffects")
class Poisson(Likelihood):
    """y ~ Poisson(rate), log(rate) = eta; y is a count 0, 1, 2, ...

    `call(eta)` returns the rate exp(eta). A row with weight w counts w times.

    Example:
        >>> likelihood = Poisson()
        >>> float(likelihood(np.array([[0.0]], dtype="float32"))[0, 0])
        1.0
    """

    def call(self, eta):
        return ops.exp(eta)

    def link(self, mean):
        return ops.log(ops.maximum(ops.convert_to_tensor(mean), _RATE_FLOOR))

    def nll(self, y, mean, sample_weight=None):
        rate = ops.maximum(mean, _RATE_FLOOR)
        nll = rate - tf.math.xlogy(y, rate) + tf.math.lgamma(y + 1.0)
        return _weighted(nll, sample_weight)

    def sample(self, mean, trials=None, seed=None):
        # TFP's Poisson sampler loops forever on a NaN rate: fail instead.
        with tf.control_dependencies([_assert_no_nan(mean, "Poisson rate")]):
            return tfd.Poisson(rate=mean).sample(seed=_stateless(seed))

    def variance(self, mean, trials=None):
        return mean

    def check_targets(self, y, sample_weight=None):
        y = super().check_targets(y, sample_weight)
        bad = (y < 0) | ~_is_whole(y)
        if bad.any():
            _first_bad("y", y, bad, "a count (0, 1, 2, ...) for the Poisson likelihood")
        return y


@keras.saving.register_keras_serializable(package="reffects")
class Categorical(Likelihood):
    """y ~ Categorical(softmax([0, eta])): K classes, class 0 the reference.

    The predictor eta has K - 1 columns, the log odds of classes 1, ..., K - 1 against class
    0 (a multinomial logit model with a reference class, which makes the linear part
    identifiable). `call(eta)` returns the K class probabilities, `(batch, K)`; y is
    one-hot, `(batch, K)`; the NLL of a row is -log p(its class) (times its weight), one
    column per row. `link(mean)` gives back the K - 1 log odds and `variance(mean)` the
    variance of each class's indicator, p (1 - p).

    Args:
        num_classes: K, at least 2 (K = 2 is the Bernoulli model with classes 0 and 1).

    Input shape:
        `(batch, num_classes - 1)`.

    Output shape:
        `(batch, num_classes)`.

    Example:
        >>> likelihood = Categorical(num_classes=3)
        >>> p = likelihood(np.array([[0.0, np.log(2.0)]], dtype="float32"))
        >>> np.round(p.numpy(), 4).tolist()
        [[0.25, 0.25, 0.5]]
        >>> y = np.array([[0.0, 0.0, 1.0]])
        >>> round(float(likelihood.nll(y, p)[0, 0]), 4)  # -log 0.5
        0.6931
    """

    def __init__(self, num_classes: int = 2, **kwargs):
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(
                "`num_classes` must be an integer of at least 2. "
                f"Received: num_classes={num_classes!r}"
            )
        self.num_classes = int(num_classes)

    @property
    def predictor_units(self):
        return self.num_classes - 1

    def call(self, eta):
        eta = ops.convert_to_tensor(eta)
        reference = ops.zeros_like(eta[..., :1])
        return ops.softmax(ops.concatenate([reference, eta], axis=-1), axis=-1)

    def link(self, mean):
        p = _clipped_probability(ops.convert_to_tensor(mean))
        return ops.log(p[..., 1:]) - ops.log(p[..., :1])

    def nll(self, y, mean, sample_weight=None):
        mean = ops.convert_to_tensor(mean)
        y = ops.cast(y, mean.dtype)
        # one log per row: y is one-hot, so sum(y p) is the probability of the row's class
        chosen = ops.sum(y * mean, axis=-1, keepdims=True)
        return _weighted(-ops.log(_clipped_probability(chosen)), sample_weight)

    def sample(self, mean, trials=None, seed=None):
        with tf.control_dependencies([_assert_no_nan(mean, "class probability")]):
            distribution = tfd.OneHotCategorical(probs=mean, dtype=mean.dtype)
            return distribution.sample(seed=_stateless(seed))

    def variance(self, mean, trials=None):
        return mean * (1.0 - mean)

    def check_targets(self, y, sample_weight=None):
        y = super().check_targets(y, sample_weight)
        if y.ndim != 2 or y.shape[1] != self.num_classes:
            raise ValueError(
                f"y must be one-hot of shape (n, {self.num_classes}) for the Categorical "
                f"likelihood with num_classes={self.num_classes}. Received shape {y.shape}"
            )
        bad = (y != 0) & (y != 1)
        if bad.any():
            _first_bad("y", y, bad, "0 or 1 (one-hot) for the Categorical likelihood")
        ones = y.sum(axis=1)
        if (ones != 1).any():
            row = int(np.argmax(ones != 1))
            raise ValueError(
                f"y must be one-hot for the Categorical likelihood: each row a single 1; "
                f"row {row} has {ones[row]:g}"
            )
        return y

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


LIKELIHOODS = {
    "gaussian": Gaussian,
    "bernoulli": Bernoulli,
    "binomial": Binomial,
    "poisson": Poisson,
}


def get_likelihood(identifier) -> Likelihood:
    """Turns a name, a config or a `Likelihood` into a `Likelihood` layer.

    Names: "gaussian", "bernoulli", "binomial", "poisson"; a `Categorical` likelihood needs
    its number of classes, so it is passed as a layer, `Categorical(num_classes=K)`.

    Example:
        >>> type(get_likelihood("poisson")).__name__
        'Poisson'
    """
    if isinstance(identifier, Likelihood):
        return identifier
    if isinstance(identifier, str) and identifier in LIKELIHOODS:
        return LIKELIHOODS[identifier]()
    if identifier == "categorical":
        raise ValueError(
            "A Categorical likelihood needs its number of classes: pass "
            "likelihood=Categorical(num_classes=K). Received: likelihood='categorical'"
        )
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    raise ValueError(
        f"`likelihood` must be one of {sorted(LIKELIHOODS)} or a Likelihood. "
        f"Received: likelihood={identifier!r}"
    )
