"""Likelihoods p(y | eta): each maps the linear predictor to the response mean and scores y.

A likelihood is a Keras layer so that parameters it learns (the Gaussian noise scale) are
trained and saved with the model. `ELBOModel` calls it on the predictor and asks it for the
negative log-likelihood of each row.
"""

import math

import keras
from keras import ops

from reffects.posteriors import inverse_softplus, positive

_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)


class Likelihood(keras.layers.Layer):
    """Base class: `call(eta)` returns the response mean, `nll(y, mean)` one value per row."""

    def nll(self, y, mean):
        raise NotImplementedError

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

    def call(self, eta):
        return eta

    def nll(self, y, mean):
        sigma = self.noise_scale()
        return _HALF_LOG_TWO_PI + ops.log(sigma) + 0.5 * ops.square((y - mean) / sigma)

    def get_config(self):
        config = super().get_config()
        config.update(initial_noise_scale=self.initial_noise_scale)
        return config


def get_likelihood(identifier) -> Likelihood:
    """Turns a name ("gaussian") or a `Likelihood` into a `Likelihood` layer."""
    if isinstance(identifier, Likelihood):
        return identifier
    named = {"gaussian": Gaussian}
    if isinstance(identifier, str) and identifier in named:
        return named[identifier]()
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    raise ValueError(
        f"`likelihood` must be one of {sorted(named)} or a Likelihood. "
        f"Received: likelihood={identifier!r}"
    )
