"""Variational machinery shared by the layers: Normal posteriors, sampling, KL terms.

Every variational parameter is a Keras weight: a `<param>_loc` and a
`<param>_untransformed_scale`, with

    scale = softplus(untransformed_scale) + SCALE_FLOOR

so Keras trains them like any other weight. Hyperpriors for a grouping factor's scale
(`Exponential`, `HalfNormal`) pair with a LogNormal variational posterior whose KL is
analytic (see `ScalePrior.kl_from_lognormal`).
"""

import math
from statistics import NormalDist

import keras
import numpy as np
import tensorflow as tf
from keras import ops

SCALE_FLOOR = 1e-5
"""Smallest posterior standard deviation; keeps log-densities finite."""

_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)


def inverse_softplus(value):
    """The untransformed value whose `softplus(.) + SCALE_FLOOR` equals `value`.

    Takes a float (returns a float) or an array (returns an array).
    """
    shifted = np.maximum(np.asarray(value, dtype="float64") - SCALE_FLOOR, 1e-12)
    raw = shifted + np.log(-np.expm1(-shifted))
    return float(raw) if raw.ndim == 0 else raw


def positive(untransformed):
    """Maps an unconstrained weight to a positive scale."""
    return ops.softplus(untransformed) + SCALE_FLOOR


def add_normal_posterior(layer, name, shape, loc_initializer, scale):
    """Creates the `<name>_loc` and `<name>_untransformed_scale` weights of a Normal q.

    Returns the pair `(loc, untransformed_scale)`; the scale starts at `scale`.
    """
    loc = layer.add_weight(name=f"{name}_loc", shape=shape, initializer=loc_initializer)
    untransformed_scale = layer.add_weight(
        name=f"{name}_untransformed_scale",
        shape=shape,
        initializer=keras.initializers.Constant(inverse_softplus(scale)),
    )
    return loc, untransformed_scale


def _replica_seed(seed_generator):
    """This step's stateless seed; under a `tf.distribute` strategy, one per replica.

    Every replica holds the same seed generator state, so the same seed would draw the
    same noise on each replica's rows; folding the replica id in makes the replicas' draws
    independent, as one device's draws for the whole global batch are.
    """
    seed = seed_generator.next()
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return seed
    replica = tf.cast(context.replica_id_in_sync_group, "int64")
    return tf.random.experimental.stateless_fold_in(tf.cast(seed, "int64"), replica)


def training_noise(shape, seed_generator):
    """Standard Normal noise of a small, fixed shape (a layer's parameters), for training."""
    return tf.random.stateless_normal(shape, seed=_replica_seed(seed_generator))


def row_noise(shape, seed_generator):
    """Standard Normal noise with a row per batch row, for training.

    Box-Muller from uniform draws: on CPU TensorFlow's Normal sampler takes about 20 ns per
    number against 5 for uniforms and the transform, and one Normal per row was the most
    expensive operation of a `RandomIntercept` training step at batch 8192.

    Example:
        >>> noise = row_noise((100_001, 1), keras.random.SeedGenerator(0)).numpy()
        >>> noise.shape, abs(float(noise.mean())) < 0.01, round(float(noise.std()), 2)
        ((100001, 1), True, 1.0)
    """
    size = tf.reduce_prod(shape)
    half = (size + 1) // 2
    uniform = tf.random.stateless_uniform(tf.stack([2, half]), seed=_replica_seed(seed_generator))
    radius = tf.sqrt(-2.0 * tf.math.log1p(-uniform[0]))  # 1 - u lies in (0, 1]
    angle = (2.0 * math.pi) * uniform[1]
    normal = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], axis=0)
    return tf.reshape(normal[:size], shape)


def normal_kl(loc_q, scale_q, loc_p, scale_p):
    """Elementwise KL(N(loc_q, scale_q) || N(loc_p, scale_p))."""
    ratio = scale_q / scale_p
    return -ops.log(ratio) + 0.5 * (ops.square(ratio) + ops.square((loc_q - loc_p) / scale_p)) - 0.5


def normal_summary(loc, scale, level: float = 0.95) -> dict:
    """Mean, sd and a central interval of independent Normals, as numpy arrays."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"`level` must be in (0, 1). Received: level={level}")
    loc = np.asarray(loc, dtype="float64")
    scale = np.asarray(scale, dtype="float64")
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    return {"mean": loc, "sd": scale, "lower": loc - z * scale, "upper": loc + z * scale}


@keras.saving.register_keras_serializable(package="reffects")
class ScalePrior:
    """Base class of hyperpriors on a grouping factor's scale sigma.

    The variational posterior of sigma is LogNormal(mu, s) (a Normal on log sigma), so
    `kl_from_lognormal` is analytic: minus the LogNormal entropy minus E_q[log p(sigma)].
    """

    def expected_log_prob(self, mu, s):
        raise NotImplementedError

    def kl_from_lognormal(self, mu, s):
        """KL(LogNormal(mu, s) || self), elementwise."""
        entropy = mu + 0.5 + ops.log(s) + _HALF_LOG_TWO_PI
        return -entropy - self.expected_log_prob(mu, s)

    def get_config(self):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="reffects")
class Exponential(ScalePrior):
    """sigma ~ Exponential(rate), as in Statistical Rethinking's m13.2.

    Example:
        >>> prior = Exponential(rate=1.0)
        >>> prior.rate
        1.0
    """

    def __init__(self, rate: float = 1.0):
        if not rate > 0:
            raise ValueError(f"`rate` must be positive. Received: rate={rate}")
        self.rate = float(rate)

    def expected_log_prob(self, mu, s):
        # E[sigma] under LogNormal(mu, s) is exp(mu + s^2 / 2).
        return math.log(self.rate) - self.rate * ops.exp(mu + 0.5 * ops.square(s))

    def get_config(self):
        return {"rate": self.rate}


@keras.saving.register_keras_serializable(package="reffects")
class HalfNormal(ScalePrior):
    """sigma ~ HalfNormal(scale).

    Example:
        >>> HalfNormal(scale=2.0).scale
        2.0
    """

    def __init__(self, scale: float = 1.0):
        if not scale > 0:
            raise ValueError(f"`scale` must be positive. Received: scale={scale}")
        self.scale = float(scale)

    def expected_log_prob(self, mu, s):
        # E[sigma^2] under LogNormal(mu, s) is exp(2 mu + 2 s^2).
        second_moment = ops.exp(2.0 * mu + 2.0 * ops.square(s))
        return (
            0.5 * math.log(2.0 / math.pi)
            - math.log(self.scale)
            - second_moment / (2.0 * self.scale**2)
        )

    def get_config(self):
        return {"scale": self.scale}


def get_scale_prior(identifier):
    """Turns None, a name ("exponential", "half_normal"), a config or a prior into a prior."""
    if identifier is None or isinstance(identifier, ScalePrior):
        return identifier
    if isinstance(identifier, str):
        named = {"exponential": Exponential, "half_normal": HalfNormal}
        if identifier not in named:
            raise ValueError(
                "`scale_prior` must be None, 'exponential', 'half_normal' or a ScalePrior. "
                f"Received: scale_prior={identifier!r}"
            )
        return named[identifier]()
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    raise ValueError(
        "`scale_prior` must be None, 'exponential', 'half_normal' or a ScalePrior. "
        f"Received: scale_prior={identifier!r}"
    )
