"""Keras 3 layers with Normal posteriors: the terms of a mixed model's predictor.

q is mean-field across parameters, except within a group of `RandomEffects`, whose
coefficients have a full-covariance MVN posterior.

Each layer adds, through `add_loss`, an unbiased estimate of its total KL(q || p); the
`ELBOModel` divides the sum by the number of training examples N, so the loss Keras reports
is the negative ELBO per training example.
"""

import functools
import numbers

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
import tensorflow_probability as tfp
from keras import ops

from reffects.posteriors import (
    SCALE_FLOOR,
    add_normal_posterior,
    get_scale_prior,
    inverse_softplus,
    normal_kl,
    normal_summary,
    positive,
    row_noise,
    training_noise,
)
from reffects.streaming import count_groups

tfd = tfp.distributions


def _check_positive(name, value):
    if not value > 0:
        raise ValueError(f"`{name}` must be positive. Received: {name}={value}")


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")


def _gather_rows(variable, ids):
    """Rows `ids` of a Keras variable, read without reading the whole variable.

    `ops.take` first reads the full variable into a tensor; with a million groups that copy,
    and the copy-on-write it forces on the optimizer's next scatter update, cost more than
    the rest of a training step. `tf.gather` on the underlying resource variable reads only
    the rows asked for.
    """
    return tf.gather(variable.value, ids)


def _seed_generator(seed):
    """`seed` (an int, a `keras.random.SeedGenerator` or None) as a `SeedGenerator`, so that
    successive draws from it differ."""
    if isinstance(seed, keras.random.SeedGenerator):
        return seed
    return keras.random.SeedGenerator(seed)


def _summary_frame(loc, scale, level, index_name):
    """One row per entry of `loc` (units flattened into a `unit` column when > 1)."""
    stats = normal_summary(loc, scale, level)
    rows, units = np.asarray(loc).shape
    frame = pd.DataFrame({key: value.reshape(-1) for key, value in stats.items()})
    frame.insert(0, index_name, np.repeat(np.arange(rows), units))
    if units > 1:
        frame.insert(1, "unit", np.tile(np.arange(units), rows))
        return frame
    return frame.set_index(index_name)


@keras.saving.register_keras_serializable(package="reffects")
class GlobalIntercept(keras.layers.Layer):
    """A global intercept alpha with a Normal variational posterior.

        alpha ~ Normal(prior_loc, prior_scale)      q(alpha) = Normal(loc, scale)

    The layer adds KL(q || p) in full at every call; `ELBOModel` divides it by N.

    Args:
        units: number of outputs (one intercept per output).
        prior_loc: mean of the Normal prior.
        prior_scale: standard deviation of the Normal prior, on the scale of the response.
        loc_initializer: initial posterior mean; start it at the (link of the) mean of y,
            since alpha and the mean group offset are nearly a flat direction.
        initial_posterior_scale: initial posterior standard deviation.
        seed: seed of the noise drawn in training.

    Input shape:
        Any tensor whose first axis is the batch.

    Output shape:
        `(batch_size, units)`: one draw from q for the whole batch when `training=True`, the
        posterior mean otherwise.

    Example:
        >>> layer = GlobalIntercept(loc_initializer=keras.initializers.Constant(2.0))
        >>> tuple(layer(np.zeros((3, 1))).shape)
        (3, 1)
    """

    def __init__(
        self,
        units: int = 1,
        prior_loc: float = 0.0,
        prior_scale: float = 10.0,
        loc_initializer="zeros",
        initial_posterior_scale: float = 0.01,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_positive_int("units", units)
        _check_positive("prior_scale", prior_scale)
        _check_positive("initial_posterior_scale", initial_posterior_scale)
        self.units = units
        self.prior_loc = float(prior_loc)
        self.prior_scale = float(prior_scale)
        self.loc_initializer = keras.initializers.get(loc_initializer)
        self.initial_posterior_scale = float(initial_posterior_scale)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        self.intercept_loc, self.intercept_untransformed_scale = add_normal_posterior(
            self, "intercept", (self.units,), self.loc_initializer, self.initial_posterior_scale
        )

    def call(self, inputs, training=False):
        loc = self.intercept_loc
        scale = positive(self.intercept_untransformed_scale)
        self.add_loss(ops.sum(normal_kl(loc, scale, self.prior_loc, self.prior_scale)))
        if training:
            # One draw per batch: alpha is shared by every row, and a per-row draw would cost
            # a batch-sized random Normal for a parameter whose sd is tiny.
            loc = loc + scale * training_noise((1, self.units), self.seed_generator)
        return ops.broadcast_to(loc, (ops.shape(inputs)[0], self.units))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.units)

    def sample_posterior(self, inputs, num_samples: int, seed=None):
        """The output under `num_samples` draws of alpha from q: `(num_samples, batch, units)`.

        All rows of one draw share its alpha. `seed` is an int, a `keras.random.SeedGenerator`
        or None.
        """
        scale = positive(self.intercept_untransformed_scale)
        noise = keras.random.normal((num_samples, 1, self.units), seed=seed)
        draws = self.intercept_loc + scale * noise
        return ops.broadcast_to(draws, (num_samples, ops.shape(inputs)[0], self.units))

    def posterior(self):
        """q(alpha) as a `tfd.Normal` of shape `(units,)`."""
        return tfd.Normal(self.intercept_loc, positive(self.intercept_untransformed_scale))

    def set_posterior(self, mean, sd):
        """Sets q(alpha) = Normal(mean, sd) (arrays of shape `(units,)`)."""
        self.intercept_loc.assign(np.reshape(mean, (self.units,)).astype("float32"))
        self.intercept_untransformed_scale.assign(
            np.reshape(inverse_softplus(sd), (self.units,)).astype("float32")
        )

    def posterior_summary(self, level: float = 0.95) -> pd.DataFrame:
        """Posterior mean, sd and central `level` interval, one row per unit."""
        loc = ops.convert_to_numpy(self.intercept_loc)[None, :]
        scale = ops.convert_to_numpy(positive(self.intercept_untransformed_scale))[None, :]
        return _summary_frame(loc.T, scale.T, level, "unit")

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units,
            prior_loc=self.prior_loc,
            prior_scale=self.prior_scale,
            loc_initializer=keras.initializers.serialize(self.loc_initializer),
            initial_posterior_scale=self.initial_posterior_scale,
            seed=self.seed,
        )
        return config


@keras.saving.register_keras_serializable(package="reffects")
class FixedEffects(keras.layers.Layer):
    """Linear fixed effects x . beta with a mean-field Normal posterior on beta.

        beta_jk ~ Normal(prior_loc, prior_scale)    q(beta_jk) = Normal(loc_jk, scale_jk)

    In training beta is drawn from q once per batch and shared by its rows (drawing each
    row's output from its own distribution under q, the local reparameterisation, lowers the
    gradient's variance a little but costs a random draw, a second matrix product and a
    square root per row: 9% of a training step at batch 8192 in `benchmarks/overhead.py`).
    KL(q || p) is added in full at every call.

    Args:
        units: number of outputs.
        prior_loc: mean of the Normal prior of each coefficient.
        prior_scale: standard deviation of that prior, on the scale of response / feature.
        initial_posterior_scale: initial posterior standard deviation.
        seed: seed of the noise drawn in training.

    Input shape:
        `(batch_size, num_features)` floats.

    Output shape:
        `(batch_size, units)`.

    Example:
        >>> layer = FixedEffects()
        >>> tuple(layer(np.ones((4, 3), dtype="float32")).shape)
        (4, 1)
    """

    def __init__(
        self,
        units: int = 1,
        prior_loc: float = 0.0,
        prior_scale: float = 10.0,
        initial_posterior_scale: float = 0.01,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_positive_int("units", units)
        _check_positive("prior_scale", prior_scale)
        _check_positive("initial_posterior_scale", initial_posterior_scale)
        self.units = units
        self.prior_loc = float(prior_loc)
        self.prior_scale = float(prior_scale)
        self.initial_posterior_scale = float(initial_posterior_scale)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        num_features = input_shape[-1]
        if num_features is None:
            raise ValueError("FixedEffects needs a known number of features (last axis).")
        self.kernel_loc, self.kernel_untransformed_scale = add_normal_posterior(
            self,
            "kernel",
            (num_features, self.units),
            "zeros",
            self.initial_posterior_scale,
        )

    def call(self, inputs, training=False):
        inputs = ops.cast(inputs, self.compute_dtype)
        scale = positive(self.kernel_untransformed_scale)
        self.add_loss(ops.sum(normal_kl(self.kernel_loc, scale, self.prior_loc, self.prior_scale)))
        kernel = self.kernel_loc
        if training:
            kernel = kernel + scale * training_noise(ops.shape(kernel), self.seed_generator)
        return ops.matmul(inputs, kernel)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.units)

    def sample_posterior(self, inputs, num_samples: int, seed=None):
        """x . beta under `num_samples` draws of beta from q: `(num_samples, batch, units)`.

        All rows of one draw share its beta. `seed` is an int, a `keras.random.SeedGenerator`
        or None.
        """
        inputs = ops.cast(inputs, self.compute_dtype)
        scale = positive(self.kernel_untransformed_scale)
        noise = keras.random.normal((num_samples, *self.kernel_loc.shape), seed=seed)
        return ops.einsum("bd,sdu->sbu", inputs, self.kernel_loc + scale * noise)

    def posterior(self):
        """q(beta) as a `tfd.Normal` of shape `(num_features, units)`."""
        return tfd.Normal(self.kernel_loc, positive(self.kernel_untransformed_scale))

    def set_posterior(self, mean, sd):
        """Sets q(beta) = Normal(mean, sd) (arrays of shape `(num_features, units)`)."""
        shape = tuple(self.kernel_loc.shape)
        self.kernel_loc.assign(np.reshape(mean, shape).astype("float32"))
        self.kernel_untransformed_scale.assign(
            np.reshape(inverse_softplus(sd), shape).astype("float32")
        )

    def posterior_summary(self, level: float = 0.95) -> pd.DataFrame:
        """Posterior mean, sd and central `level` interval, one row per feature."""
        loc = ops.convert_to_numpy(self.kernel_loc)
        scale = ops.convert_to_numpy(positive(self.kernel_untransformed_scale))
        return _summary_frame(loc, scale, level, "feature")

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units,
            prior_loc=self.prior_loc,
            prior_scale=self.prior_scale,
            initial_posterior_scale=self.initial_posterior_scale,
            seed=self.seed,
        )
        return config


class _GroupLayer(keras.layers.Layer):
    """What the layers indexed by a group id share: id checks, training counts and sigma.

    sigma holds the prior sd of each of a group's `_num_coefficients` coefficients: a point
    estimate (`scale_prior=None`) or q(sigma) = LogNormal(mu, s) under a hyperprior.

    A subclass calls `_set_scale_args` in `__init__` (after its own checks), then in `build`
    `_add_group_scale()` after its offset weights and `_add_group_counts()` last (so the
    order of saved weights is unchanged), and defines `_num_coefficients`,
    `_unbuilt_input_shape()` (the input shape `adapt` builds it with when it has not been
    called yet) and `_point_setter` (the method that sets sigma's point estimate, named in
    an error). Error messages name the subclass and the layer.
    """

    @property
    def _kind(self):
        return type(self).__name__

    def _add_group_counts(self):
        self.group_counts = self.add_weight(
            name="group_counts",
            shape=(self.num_groups,),
            initializer="zeros",
            trainable=False,
        )
        # sum(group_counts) and the number of groups with rows, kept so that a training
        # step never reads every group.
        self.total_count = self.add_weight(
            name="total_count", shape=(), initializer="zeros", trainable=False
        )
        self.seen_groups = self.add_weight(
            name="seen_groups", shape=(), initializer="zeros", trainable=False
        )

    def adapt(self, group_ids):
        """Records each group's count in the training data (n_g of the KL scaling).

        Args:
            group_ids: the training rows' group ids: an array, or a `tf.data.Dataset` of id
                tensors (batches count fastest), which is read once in constant memory
                (`reffects.streaming.count_groups`).
        """
        if isinstance(group_ids, tf.data.Dataset):
            counts = count_groups(group_ids, self.num_groups)
        else:
            counts = np.bincount(self.validate_ids(group_ids), minlength=self.num_groups)
        if not self.built:
            self.build(self._unbuilt_input_shape())
        self.group_counts.assign(counts.astype("float32"))
        self.total_count.assign(float(counts.sum()))
        self.seen_groups.assign(float(np.count_nonzero(counts)))

    @property
    def is_adapted(self) -> bool:
        """Whether `adapt` has recorded training counts."""
        return self.built and bool(np.any(ops.convert_to_numpy(self.group_counts) > 0))

    def validate_ids(self, group_ids) -> np.ndarray:
        """Checks ids eagerly (integers in `[0, num_groups)`) and returns them as int64."""
        values = np.asarray(group_ids)
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1:
            raise ValueError(
                f"{self._kind} '{self.name}' takes group ids of shape (batch,) or "
                f"(batch, 1). Received shape {values.shape}"
            )
        if not (
            np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)
        ):
            raise ValueError(
                f"{self._kind} '{self.name}' takes integer group ids. Received dtype {values.dtype}"
            )
        if np.issubdtype(values.dtype, np.floating):
            bad = values[~np.isfinite(values) | (values != np.round(values))]
            if bad.size:
                raise ValueError(
                    f"group id {bad[0]} is not an integer; {self._kind} '{self.name}' "
                    "takes integer group ids"
                )
        bad = values[(values < 0) | (values >= self.num_groups)]
        if bad.size:
            raise ValueError(
                f"group id {bad[0]:g} is out of range for {self._kind} '{self.name}' with "
                f"num_groups={self.num_groups}; ids must lie in [0, {self.num_groups})"
            )
        return values.astype("int64")

    def _checked_ids(self, inputs):
        if tf.executing_eagerly():
            return ops.convert_to_tensor(self.validate_ids(ops.convert_to_numpy(inputs)))
        ids = tf.reshape(inputs, [-1])
        if ids.dtype.is_floating:
            tf.debugging.assert_equal(
                ids,
                tf.round(ids),
                message=f"group ids of {self._kind} {self.name} must be integers",
            )
        ids = tf.cast(ids, "int64")
        smallest, largest = tf.reduce_min(ids), tf.reduce_max(ids)
        check = tf.debugging.Assert(
            (smallest >= 0) & (largest < self.num_groups),
            [
                f"group id out of range for {self._kind} {self.name} with "
                f"num_groups={self.num_groups}; ids must lie in [0, {self.num_groups}). "
                "Smallest and largest id received:",
                smallest,
                largest,
            ],
        )
        # The gathers wait for the check, so a bad id is reported as such (and a GPU never
        # gathers with it).
        with tf.control_dependencies([check]):
            return tf.identity(ids)

    # sigma, the prior sd of a group's coefficients.

    def _set_scale_args(self, scale_prior, initial_group_scale, initial_posterior_scale, seed):
        """Stores the arguments both layers take (once the subclass has checked its own)."""
        self.scale_prior = get_scale_prior(scale_prior)
        self.initial_group_scale = float(initial_group_scale)
        self.initial_posterior_scale = float(initial_posterior_scale)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _scale_config(self):
        """The `get_config` entries of the arguments `_set_scale_args` stores, seed aside."""
        return dict(
            scale_prior=(
                None
                if self.scale_prior is None
                else keras.saving.serialize_keras_object(self.scale_prior)
            ),
            initial_group_scale=self.initial_group_scale,
            initial_posterior_scale=self.initial_posterior_scale,
        )

    def _add_group_scale(self):
        shape = (self._num_coefficients,)
        if self.scale_prior is None:
            self.group_scale_untransformed = self.add_weight(
                name="group_scale_untransformed",
                shape=shape,
                initializer=keras.initializers.Constant(inverse_softplus(self.initial_group_scale)),
            )
        else:
            self.log_group_scale_loc, self.log_group_scale_untransformed_scale = (
                add_normal_posterior(
                    self,
                    "log_group_scale",
                    shape,
                    keras.initializers.Constant(np.log(self.initial_group_scale)),
                    0.1,
                )
            )

    def group_scale(self):
        """sigma: the point estimate, or the posterior mean of q(sigma).

        Shape `(units,)` for `RandomIntercept`, `(num_terms,)` for `RandomEffects`.
        """
        if self.scale_prior is None:
            return positive(self.group_scale_untransformed)
        s = positive(self.log_group_scale_untransformed_scale)
        return ops.exp(self.log_group_scale_loc + 0.5 * ops.square(s))

    def _expected_log_group_scale(self):
        """E[log sigma]: log sigma, or mu under q(sigma) = LogNormal(mu, s)."""
        if self.scale_prior is None:
            return ops.log(positive(self.group_scale_untransformed))
        return self.log_group_scale_loc

    def _expected_inverse_group_scale(self):
        """E[1 / sigma]: exp(-mu + s^2 / 2) under q(sigma) = LogNormal(mu, s)."""
        if self.scale_prior is None:
            return 1.0 / positive(self.group_scale_untransformed)
        s = positive(self.log_group_scale_untransformed_scale)
        return ops.exp(-self.log_group_scale_loc + 0.5 * ops.square(s))

    def inverse_prior_variance(self):
        """E[1 / sigma^2]: exp(-2 mu + 2 s^2) under q(sigma) = LogNormal(mu, s)."""
        if self.scale_prior is None:
            return 1.0 / ops.square(positive(self.group_scale_untransformed))
        s = positive(self.log_group_scale_untransformed_scale)
        return ops.exp(-2.0 * self.log_group_scale_loc + 2.0 * ops.square(s))

    def _hyperprior_kl(self):
        if self.scale_prior is None:
            return 0.0
        s = positive(self.log_group_scale_untransformed_scale)
        return ops.sum(self.scale_prior.kl_from_lognormal(self.log_group_scale_loc, s))

    def sample_group_scale(self, num_samples: int, seed=None):
        """`num_samples` draws of sigma from q(sigma): `(num_samples, units or num_terms)`.

        Without a hyperprior sigma is a point estimate and every draw equals it.
        """
        shape = (num_samples, self._num_coefficients)
        if self.scale_prior is None:
            return ops.broadcast_to(positive(self.group_scale_untransformed), shape)
        s = positive(self.log_group_scale_untransformed_scale)
        noise = keras.random.normal(shape, seed=seed)
        return ops.exp(self.log_group_scale_loc + s * noise)

    def _group_scale_posterior(self):
        """q(sigma): `tfd.Deterministic(sigma)`, or `tfd.LogNormal` under a hyperprior."""
        if self.scale_prior is None:
            return tfd.Deterministic(self.group_scale())
        return tfd.LogNormal(
            self.log_group_scale_loc, positive(self.log_group_scale_untransformed_scale)
        )

    def set_group_scale_posterior(self, loc, scale):
        """Sets q(sigma) = LogNormal(loc, scale) (arrays shaped like `group_scale()`); needs
        a `scale_prior`."""
        if self.scale_prior is None:
            raise ValueError(
                f"{self._kind} '{self.name}' has no hyperprior; its sigma is a point "
                f"estimate (`{self._point_setter}`)"
            )
        shape = (self._num_coefficients,)
        self.log_group_scale_loc.assign(np.reshape(loc, shape).astype("float32"))
        self.log_group_scale_untransformed_scale.assign(
            np.reshape(inverse_softplus(scale), shape).astype("float32")
        )

    def _check_point_group_scale(self, hint=""):
        """Raises unless sigma is a point estimate (`scale_prior=None`)."""
        if self.scale_prior is not None:
            raise ValueError(
                f"{self._kind} '{self.name}' has a hyperprior on sigma; its q(sigma) is "
                f"trained, not set{hint}"
            )

    # Pieces of the subclasses' `call`, `sample_posterior` and `posterior_summary`.

    def _add_kl_loss(self, offset_kl):
        """Adds `offset_kl` (the offsets' KL, or its batch estimate) + KL(q(sigma) || p(sigma))."""
        self.add_loss(offset_kl + self._hyperprior_kl())

    def _trained_groups_sum(self, group_kl):
        """The sum of `group_kl` `(num_groups,)` over the groups with training rows."""
        return ops.sum(ops.where(self.group_counts > 0, group_kl, 0.0))

    def _batch_groups(self, ids):
        """The batch's distinct groups, for `sample_posterior`.

        Returns each row's index into them and, per distinct group, whether it has training
        rows, its posterior mean (0 if not) and its untransformed posterior scale.
        """
        groups, row_group = tf.unique(ids)
        seen = ops.take(self.group_counts, groups, axis=0) > 0
        loc = ops.where(ops.expand_dims(seen, -1), ops.take(self.offset_loc, groups, axis=0), 0.0)
        untransformed_scale = ops.take(self.offset_untransformed_scale, groups, axis=0)
        return row_group, seen, loc, untransformed_scale

    def _add_count_column(self, frame):
        """Adds each group's training count `n` to a `posterior_summary` frame (rows by group,
        then coefficient)."""
        counts = ops.convert_to_numpy(self.group_counts).astype("int64")
        frame["n"] = np.repeat(counts, self._num_coefficients)
        return frame


@keras.saving.register_keras_serializable(package="reffects")
class RandomIntercept(_GroupLayer):
    """Per-group intercept offsets b[g] with partial pooling through a learned scale sigma.

        b[g] ~ Normal(0, sigma)                     q(b[g]) = Normal(loc[g], scale[g])
        sigma: a point estimate (empirical Bayes, `scale_prior=None`) or
               sigma ~ scale_prior with q(sigma) = LogNormal (`"exponential"`, `"half_normal"`)

    KL scaling: a training row of group g is charged KL_g / n_g, where n_g is the group's
    count in the training data (set by `adapt`, which `ELBOModel.fit` calls for you when
    the group ids are a model input). Summed over the data that is sum_g KL_g, so the batch
    estimate is unbiased and touches only the batch's groups (the part of KL_g that is the
    same for every group is added exactly); groups with no training rows stay at the
    prior. With a hyperprior the KL is the expectation under q(sigma), which is
    analytic, plus KL(q(sigma) || p(sigma)).

    A group with no training rows is a new group: its offset is 0 in `predict` and its
    posterior is the prior Normal(0, sigma).

    Ids outside `[0, num_groups)` (or not whole) are an error that names the layer: a
    `ValueError` when called eagerly or in `adapt`, a check inside a traced graph otherwise
    (training steps included: a stream's ids are checked batch by batch).

    Args:
        num_groups: number of levels; ids must lie in `[0, num_groups)`.
        units: number of outputs (independent offsets per output).
        scale_prior: None, "exponential", "half_normal" or a `ScalePrior` instance.
        initial_group_scale: starting value of sigma (its posterior median with a
            hyperprior).
        initial_posterior_scale: initial posterior standard deviation of each offset.
        seed: seed of the noise drawn in training.

    Input shape:
        Integer group ids, `(batch_size,)` or `(batch_size, 1)`.

    Output shape:
        `(batch_size, units)`.

    Example:
        >>> layer = RandomIntercept(num_groups=3)
        >>> layer.adapt(np.array([0, 0, 1, 2]))
        >>> tuple(layer(np.array([0, 2])).shape)
        (2, 1)
    """

    _point_setter = "set_group_scale"

    def __init__(
        self,
        num_groups: int,
        units: int = 1,
        scale_prior=None,
        initial_group_scale: float = 1.0,
        initial_posterior_scale: float = 0.1,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_positive_int("num_groups", num_groups)
        _check_positive_int("units", units)
        _check_positive("initial_group_scale", initial_group_scale)
        _check_positive("initial_posterior_scale", initial_posterior_scale)
        self.num_groups = int(num_groups)
        self.units = units
        self._set_scale_args(scale_prior, initial_group_scale, initial_posterior_scale, seed)
        self.input_spec = keras.layers.InputSpec(max_ndim=2)

    @property
    def _num_coefficients(self):
        return self.units

    def build(self, input_shape):
        self.offset_loc, self.offset_untransformed_scale = add_normal_posterior(
            self, "offset", (self.num_groups, self.units), "zeros", self.initial_posterior_scale
        )
        self._add_group_scale()
        self._add_group_counts()

    def _unbuilt_input_shape(self):
        return (None,)

    def _offset_kl(self, loc, scale):
        """KL(q(b[g]) || p(b[g] | sigma)), taking its expectation under q(sigma) if any.

        KL_g = [E log sigma - 1/2] + [(s_g^2 + m_g^2) E(1 / sigma^2) / 2 - log s_g]: a part
        shared by every group (`_shared_offset_kl`) and one specific to it.
        """
        return self._shared_offset_kl() + self._group_offset_kl(loc, scale)

    def _shared_offset_kl(self):
        """E[log sigma] - 1/2 (E[log sigma] = mu under q(sigma) = LogNormal(mu, s))."""
        return self._expected_log_group_scale() - 0.5

    def _group_offset_kl(self, loc, scale):
        second_moment = ops.square(scale) + ops.square(loc)
        return 0.5 * second_moment * self.inverse_prior_variance() - ops.log(scale)

    def _batch_offset_kl(self, loc, scale, counts):
        """Unbiased estimate of sum_g KL(q(b[g]) || p(b[g])) over the trained groups.

        The shared part of `_offset_kl` is added exactly (`seen_groups` times); the
        group-specific part is estimated from the batch, a row of group g charged 1 / n_g.
        """
        # mean over rows of the sum over units = units * mean over (rows, units)
        entry_kl = self._group_offset_kl(loc, scale) / ops.expand_dims(ops.maximum(counts, 1.0), -1)
        shared = ops.sum(self._shared_offset_kl())
        return self.total_count * self.units * ops.mean(entry_kl) + self.seen_groups * shared

    def call(self, inputs, training=False):
        # Training steps check their ids too: `adapt` may have counted other ids than a
        # stream then feeds (and a GPU gather with a bad id returns zeros silently). The
        # check is a min and a max per batch, within measurement noise of a training step:
        # CPU time per step +0.2% to +1.5% at batch 8192 and +1% at 1024 (10 features, 10k
        # groups, 2-core container); the layer's own forward and backward pass +20 us (1.6%)
        # at batch 8192.
        ids = self._checked_ids(inputs)
        loc = _gather_rows(self.offset_loc, ids)
        scale = positive(_gather_rows(self.offset_untransformed_scale, ids))
        counts = _gather_rows(self.group_counts, ids)
        if training:
            self._add_kl_loss(self._batch_offset_kl(loc, scale, counts))
            noise = row_noise(ops.shape(loc), self.seed_generator)
            return loc + scale * noise
        all_kl = ops.sum(
            self._offset_kl(self.offset_loc, positive(self.offset_untransformed_scale)), axis=-1
        )
        self._add_kl_loss(self._trained_groups_sum(all_kl))
        return ops.where(ops.expand_dims(counts > 0, -1), loc, 0.0)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.units)

    def sample_posterior(self, inputs, num_samples: int, seed=None):
        """b[g] under `num_samples` draws from q: `(num_samples, batch, units)`.

        Rows of one group share its offset within a draw. A group with no training rows
        draws its offset from the prior Normal(0, sigma), with sigma drawn from q(sigma)
        under a hyperprior. `seed` is an int, a `keras.random.SeedGenerator` or None.
        """
        seed = _seed_generator(seed)  # two draws below must differ
        ids = self._checked_ids(inputs)
        row_group, seen, loc, untransformed_scale = self._batch_groups(ids)
        sigma = ops.expand_dims(self.sample_group_scale(num_samples, seed), 1)
        seen = ops.expand_dims(seen, -1)
        scale = ops.where(
            seen, positive(untransformed_scale), sigma
        )  # (num_samples, groups, units)
        noise = keras.random.normal(ops.shape(scale), seed=seed)
        return ops.take(loc + scale * noise, row_group, axis=1)

    def posterior(self):
        """q as TFP distributions: `offset` (num_groups, units) and `group_scale`.

        Groups with no training rows get the prior Normal(0, sigma).
        """
        seen = ops.expand_dims(self.group_counts > 0, -1)
        sigma = self.group_scale()
        loc = ops.where(seen, self.offset_loc, 0.0)
        scale = ops.where(seen, positive(self.offset_untransformed_scale), sigma)
        return {"offset": tfd.Normal(loc, scale), "group_scale": self._group_scale_posterior()}

    def set_posterior(self, mean, sd):
        """Sets q(b[g]) = Normal(mean[g], sd[g]) (arrays of shape `(num_groups, units)`)."""
        shape = (self.num_groups, self.units)
        self.offset_loc.assign(np.reshape(mean, shape).astype("float32"))
        self.offset_untransformed_scale.assign(
            np.reshape(inverse_softplus(sd), shape).astype("float32")
        )

    def set_group_scale(self, sigma):
        """Sets the point estimate of sigma (`(units,)`); needs `scale_prior=None`."""
        self._check_point_group_scale()
        self.group_scale_untransformed.assign(
            np.reshape(inverse_softplus(sigma), (self.units,)).astype("float32")
        )

    def posterior_summary(self, level: float = 0.95) -> pd.DataFrame:
        """Offsets per group: mean, sd, central `level` interval and training count `n`."""
        offset = self.posterior()["offset"]
        frame = _summary_frame(
            ops.convert_to_numpy(offset.loc), ops.convert_to_numpy(offset.scale), level, "group"
        )
        return self._add_count_column(frame)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_groups=self.num_groups, units=self.units, **self._scale_config(), seed=self.seed
        )
        return config


_CORRELATION_LIMIT = 1.0 - 1e-6
"""`set_covariance` clips correlations to this magnitude (R must stay positive definite)."""


def _scale_tril(packed):
    """Lower-triangular scales from their packed, unconstrained form.

    `packed` holds the lower triangle in `tfp.math.fill_triangular` order (last axis of size
    d (d + 1) / 2); the diagonal goes through `positive`, the rest is used as it is.
    """
    raw = tfp.math.fill_triangular(packed)
    return tf.linalg.set_diag(raw, positive(tf.linalg.diag_part(raw)))


def _pack_scale_tril(scale_tril) -> np.ndarray:
    """The inverse of `_scale_tril` for numpy lower-triangular matrices (diagonal > 0)."""
    raw = np.array(scale_tril, dtype="float64")
    diagonal = np.arange(raw.shape[-1])
    raw[..., diagonal, diagonal] = inverse_softplus(raw[..., diagonal, diagonal])
    rows, columns = _packed_entries(raw.shape[-1])
    return raw[..., rows, columns]


@functools.lru_cache
def _fill_triangular_positions(size: int) -> np.ndarray:
    """Where `tfp.math.fill_triangular` puts each entry of a vector of length
    size (size + 1) / 2: a `(size, size)` matrix of indices, -1 above the diagonal."""
    count = size * (size + 1) // 2
    with tf.init_scope():  # eager even when first called while a model is traced
        filled = tfp.math.fill_triangular(np.arange(1.0, count + 1.0)).numpy()
    return filled.astype("int64") - 1


@functools.lru_cache
def _packed_entries(size: int) -> tuple:
    """Row and column of each packed entry of a `(size, size)` lower triangle, in order."""
    positions = _fill_triangular_positions(size)
    rows, columns = np.nonzero(positions >= 0)
    order = np.argsort(positions[rows, columns])
    return rows[order], columns[order]


@functools.lru_cache
def _correlation_positions(size: int) -> np.ndarray:
    """`tfp.bijectors.CorrelationCholesky`'s layout: each entry of the unnormalised factor
    as an index into [0, 1, *x] (zero above the diagonal, one on it, x below)."""
    index = np.zeros((size, size), "int64")
    inner = _fill_triangular_positions(size - 1)
    index[1:, :-1] = np.where(inner >= 0, inner + 2, 0)
    np.fill_diagonal(index, 1)
    return index


def correlation_cholesky(unconstrained, size: int):
    """`tfp.bijectors.CorrelationCholesky().forward` in Keras ops, without the bijector's
    per-call overhead (about 40 ms eagerly): the unconstrained vector x of length
    size (size - 1) / 2 below a unit diagonal, each row scaled to unit norm.

    Example:
        >>> chol = correlation_cholesky(np.array([0.5], "float32"), 2)
        >>> np.round(keras.ops.convert_to_numpy(chol).astype("float64"), 4).tolist()
        [[1.0, 0.0], [0.4472, 0.8944]]
    """
    x = ops.convert_to_tensor(unconstrained)
    values = ops.concatenate([ops.zeros((1,), x.dtype), ops.ones((1,), x.dtype), x])
    raw = ops.take(values, _correlation_positions(size))
    return raw / ops.sqrt(ops.sum(ops.square(raw), axis=-1, keepdims=True))


def correlation_unconstrained(chol) -> np.ndarray:
    """The inverse of `correlation_cholesky` for a numpy factor with unit rows."""
    chol = np.asarray(chol, "float64")
    size = chol.shape[-1]
    below = chol / np.diagonal(chol, axis1=-2, axis2=-1)[..., :, None]
    rows, columns = _packed_entries(size - 1)
    return below[..., rows + 1, columns]


def _psd_cholesky(matrices, name: str) -> np.ndarray:
    """Lower Cholesky factors of (a stack of) positive semi-definite matrices.

    A singular matrix gets the smallest jitter on its diagonal (relative to its mean
    variance) that makes it positive definite.
    """
    values = np.asarray(matrices, dtype="float64")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"`{name}` must be finite. Received a matrix with NaN or inf entries")
    values = 0.5 * (values + np.swapaxes(values, -1, -2))
    size = values.shape[-1]
    mean_variance = np.trace(values, axis1=-2, axis2=-1)[..., None, None] / size
    unit = np.maximum(mean_variance, SCALE_FLOOR**2) * np.eye(size)
    for jitter in (0.0, 1e-12, 1e-10, 1e-8, 1e-6):
        try:
            return np.linalg.cholesky(values + jitter * unit)
        except np.linalg.LinAlgError:
            continue
    raise ValueError(
        f"`{name}` must be positive semi-definite; a matrix is not, even with a jitter of 1e-6 "
        "times its mean variance on the diagonal"
    )


@keras.saving.register_keras_serializable(package="reffects")
class RandomEffects(_GroupLayer):
    """Per-group coefficient vectors: a random intercept and random slopes, correlated.

        t_i = (1, z_i), or z_i with intercept=False      (num_terms = intercept + num_slopes)
        output_i = t_i . b[g_i]
        b[g] ~ MVN(0, Sigma),   Sigma = diag(sigma) R diag(sigma)
        q(b[g]) = MVN(loc[g], S[g] S[g]')                 (S[g] lower triangular)
        sigma: a point estimate (`scale_prior=None`) or sigma_j ~ scale_prior with
               q(sigma_j) = LogNormal; R: a point estimate (the identity if not correlated),
               the MAP one under R ~ LKJ(eta) with `correlation_prior=eta`

    q has a full covariance within each group (the terms of one group are correlated in the
    posterior) and independent groups. R is parameterised by an unconstrained vector of
    num_terms (num_terms - 1) / 2 values through `tfp.bijectors.CorrelationCholesky`.

    KL scaling: as for `RandomIntercept`, a training row of group g is charged KL_g / n_g,
    where n_g is the group's count in the training data, set by `adapt` (call it on the
    training ids before fitting). The part of KL_g the same for every group
    (log det(Sigma) / 2 - num_terms / 2, its expectation under a hyperprior) is added
    exactly, once per group with training rows, so the batch estimate is unbiased and a
    training step reads only the batch's groups. KL_g is closed form:

        KL_g = [m' P m + tr(P S S')] / 2 - log det S + E[log det Sigma] / 2 - num_terms / 2

    with P = Sigma^-1, or E[Sigma^-1] under q(sigma) with a hyperprior (then
    E[1 / (sigma_j sigma_k)] is analytic, and KL(q(sigma) || p(sigma)) is added). Under
    an LKJ prior the loss also has -log LKJ(R | eta) = -(eta - 1) log det R (less its
    constant), added once per step as KL(q(sigma) || p(sigma)) is. Not training, the
    layer adds the full KL over the groups with training rows.

    In training each row draws its own b[g] = loc[g] + S[g] e. Not training the output is the
    posterior mean t_i . loc[g_i], and 0 for a group with no training rows (a new group,
    whose posterior is the prior MVN(0, Sigma)).

    Ids outside `[0, num_groups)` (or not whole) are an error that names the layer, as for
    `RandomIntercept`.

    Args:
        num_groups: number of levels; ids must lie in `[0, num_groups)`.
        num_slopes: number of columns of z, each with a slope that varies by group.
        intercept: whether the terms start with a random intercept (a column of ones).
        correlated: whether R is estimated; with False, R = I (independent terms).
        scale_prior: None, "exponential", "half_normal" or a `ScalePrior` instance: a
            hyperprior on each sigma_j.
        correlation_prior: None (a flat prior on R) or eta > 0: R ~ LKJ(eta), density
            proportional to det(R)^(eta - 1) (eta = 1 uniform, eta > 1 shrinks R toward
            the identity); needs `correlated=True`.
        initial_group_scale: starting value of every sigma_j (its posterior median with a
            hyperprior).
        initial_posterior_scale: initial posterior standard deviation of each coefficient
            (off-diagonal entries of S start at 0).
        term_names: names of the terms for `posterior_summary`; default "(Intercept)",
            "slope_0", "slope_1", ...
        seed: seed of the noise drawn in training.

    Input shape:
        A list `[group_ids, z]`: integer group ids `(batch_size,)` or `(batch_size, 1)`, and
        float z `(batch_size, num_slopes)`.

    Output shape:
        `(batch_size, 1)`.

    Example:
        >>> layer = RandomEffects(num_groups=3, num_slopes=1)
        >>> layer.adapt(np.array([0, 0, 1, 2]))
        >>> layer.set_posterior(
        ...     np.array([[1.0, 2.0], [0.0, 0.0], [-1.0, 0.5]]), np.tile(0.1 * np.eye(2), (3, 1, 1))
        ... )
        >>> ids, z = np.array([0, 2]), np.array([[0.5], [2.0]], dtype="float32")
        >>> layer([ids, z]).numpy().round(3).tolist()
        [[2.0], [0.0]]
        >>> layer.set_covariance(np.array([[1.0, 0.3], [0.3, 0.25]]))
        >>> sigma, r = layer.group_scale().numpy(), layer.correlation().numpy()
        >>> sigma.round(3).tolist(), round(float(r[1, 0]), 3)
        ([1.0, 0.5], 0.6)
        >>> layer.posterior_summary().columns.tolist()
        ['group', 'term', 'mean', 'sd', 'lower', 'upper', 'n']
    """

    units = 1
    """The width of the output (always 1), as the other variational layers name it."""

    _point_setter = "set_covariance"

    def __init__(
        self,
        num_groups: int,
        num_slopes: int,
        intercept: bool = True,
        correlated: bool = True,
        scale_prior=None,
        correlation_prior: float | None = None,
        initial_group_scale: float = 1.0,
        initial_posterior_scale: float = 0.1,
        term_names: list | None = None,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_positive_int("num_groups", num_groups)
        if (
            isinstance(num_slopes, bool)
            or not isinstance(num_slopes, (int, np.integer))
            or num_slopes < 0
        ):
            raise ValueError(
                f"`num_slopes` must be a non-negative integer. Received: num_slopes={num_slopes!r}"
            )
        for name, value in (("intercept", intercept), ("correlated", correlated)):
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")
        if not intercept and num_slopes == 0:
            raise ValueError(
                "RandomEffects needs at least one term; with intercept=False, `num_slopes` "
                "must be positive. Received: num_slopes=0"
            )
        _check_positive("initial_group_scale", initial_group_scale)
        _check_positive("initial_posterior_scale", initial_posterior_scale)
        if correlation_prior is not None:
            if (
                isinstance(correlation_prior, bool)
                or not isinstance(correlation_prior, numbers.Real)
                or not 0 < correlation_prior < np.inf
            ):
                raise ValueError(
                    "`correlation_prior` must be None or a positive finite number (the LKJ "
                    f"eta). Received: correlation_prior={correlation_prior!r}"
                )
            if not correlated:
                raise ValueError(
                    "`correlation_prior` is a prior on the correlation R, which "
                    "correlated=False fixes at the identity. Received: "
                    f"correlation_prior={correlation_prior!r}, correlated=False"
                )
            correlation_prior = float(correlation_prior)
        self.correlation_prior = correlation_prior
        self.num_groups = int(num_groups)
        self.num_slopes = int(num_slopes)
        self.intercept = bool(intercept)
        self.correlated = bool(correlated)
        self.num_terms = int(intercept) + self.num_slopes
        if term_names is not None:
            term_names = [str(name) for name in term_names]
            if len(term_names) != self.num_terms:
                raise ValueError(
                    f"`term_names` must name the {self.num_terms} terms (intercept first). "
                    f"Received: term_names={term_names}"
                )
        self.term_names = term_names
        self._set_scale_args(scale_prior, initial_group_scale, initial_posterior_scale, seed)

    @property
    def _num_coefficients(self):
        return self.num_terms

    @property
    def _has_correlation(self) -> bool:
        return self.correlated and self.num_terms > 1

    def _unbuilt_input_shape(self):
        return [(None,), (None, self.num_slopes)]

    def _check_z_shape(self, shape):
        shape = tuple(shape)
        if len(shape) != 2 or shape[-1] not in (None, self.num_slopes):
            raise ValueError(
                f"RandomEffects '{self.name}' takes z of shape (batch, num_slopes) = "
                f"(batch, {self.num_slopes}). Received z of shape {shape}"
            )

    def _split_inputs(self, inputs):
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
            raise ValueError(
                f"RandomEffects '{self.name}' takes a list [group_ids, z] of two inputs. "
                f"Received: {type(inputs).__name__}"
                + (f" of length {len(inputs)}" if isinstance(inputs, (list, tuple)) else "")
            )
        ids, z = inputs
        self._check_z_shape(z.shape)
        return ids, z

    def build(self, input_shape):
        if (
            not isinstance(input_shape, (list, tuple))
            or len(input_shape) != 2
            or not all(isinstance(shape, (list, tuple)) for shape in input_shape)
        ):
            raise ValueError(
                f"RandomEffects '{self.name}' takes a list [group_ids, z] of two inputs. "
                f"Received input shape {input_shape}"
            )
        self._check_z_shape(input_shape[1])
        num_terms = self.num_terms
        self.offset_loc = self.add_weight(
            name="offset_loc", shape=(self.num_groups, num_terms), initializer="zeros"
        )
        initial_scale = np.full(num_terms, self.initial_posterior_scale)
        self.offset_untransformed_scale = self.add_weight(
            name="offset_untransformed_scale",
            shape=(self.num_groups, num_terms * (num_terms + 1) // 2),
            initializer=keras.initializers.Constant(_pack_scale_tril(np.diag(initial_scale))),
        )
        self._add_group_scale()
        if self._has_correlation:
            self.correlation_untransformed = self.add_weight(
                name="correlation_untransformed",
                shape=(num_terms * (num_terms - 1) // 2,),
                initializer="zeros",  # R = I
            )
        self._add_group_counts()

    # Prior: R, Sigma (sigma is `_GroupLayer`'s).

    def _correlation_cholesky(self):
        if not self._has_correlation:
            return ops.eye(self.num_terms)
        return correlation_cholesky(self.correlation_untransformed, self.num_terms)

    def correlation(self):
        """R, the prior correlation of the terms: `(num_terms, num_terms)`."""
        chol = self._correlation_cholesky()
        return ops.matmul(chol, ops.transpose(chol))

    def covariance(self):
        """Sigma = diag(sigma) R diag(sigma), with sigma from `group_scale`."""
        chol = self._prior_scale_tril(self.group_scale())
        return ops.matmul(chol, ops.transpose(chol))

    def _prior_scale_tril(self, sigma):
        """Cholesky factor diag(sigma) L_R of Sigma; sigma `(..., num_terms)`."""
        return ops.expand_dims(sigma, -1) * self._correlation_cholesky()

    def _correlation_penalty(self):
        """-log LKJ(R | eta) less its constant: -(eta - 1) log det R, with
        log det R = 2 sum log diag(L_R); 0 without a `correlation_prior`."""
        if self.correlation_prior is None or not self._has_correlation:
            return 0.0
        log_det_r = 2.0 * ops.sum(ops.log(tf.linalg.diag_part(self._correlation_cholesky())))
        return (1.0 - self.correlation_prior) * log_det_r

    def _hyperprior_kl(self):
        """KL(q(sigma) || p(sigma)) plus the LKJ penalty on the point estimate R: the
        model-wide part of the loss, added once per step."""
        return super()._hyperprior_kl() + self._correlation_penalty()

    def _expected_precision(self):
        """P: Sigma^-1, or E[Sigma^-1] under q(sigma) = prod_j LogNormal(mu_j, s_j).

        Sigma^-1 = R^-1 / (sigma sigma') elementwise, and with independent sigma_j,
        E[1 / (sigma_j sigma_k)] = exp(-mu_j - mu_k + (s_j^2 + s_k^2) / 2) for j != k and
        exp(-2 mu_j + 2 s_j^2) for j = k.
        """
        chol_inverse = tf.linalg.triangular_solve(
            self._correlation_cholesky(), ops.eye(self.num_terms), lower=True
        )
        correlation_inverse = ops.matmul(ops.transpose(chol_inverse), chol_inverse)
        inverse_sigma = self._expected_inverse_group_scale()
        moments = ops.outer(inverse_sigma, inverse_sigma)
        if self.scale_prior is not None:  # E[1 / sigma_j^2] is not E[1 / sigma_j]^2
            moments = tf.linalg.set_diag(moments, self.inverse_prior_variance())
        return correlation_inverse * moments

    # KL.

    def _shared_offset_kl(self):
        """E[log det Sigma] / 2 - num_terms / 2 (E[log sigma_j] = mu_j under a hyperprior)."""
        half_log_det_r = ops.sum(ops.log(tf.linalg.diag_part(self._correlation_cholesky())))
        return ops.sum(self._expected_log_group_scale()) + half_log_det_r - 0.5 * self.num_terms

    def _group_offset_kl(self, loc, scale_tril, precision):
        """[m' P m + tr(P S S')] / 2 - log det S, one per row of `loc` `(rows, num_terms)`."""
        quadratic = ops.einsum("bj,jk,bk->b", loc, precision, loc)
        trace = ops.einsum("jk,bkl,bjl->b", precision, scale_tril, scale_tril)
        log_det = ops.sum(ops.log(tf.linalg.diag_part(scale_tril)), axis=-1)
        return 0.5 * (quadratic + trace) - log_det

    def _offset_kl(self, loc, scale_tril):
        """KL(q(b[g]) || p(b[g])) per group (its expectation under q(sigma), if any)."""
        precision = self._expected_precision()
        return self._shared_offset_kl() + self._group_offset_kl(loc, scale_tril, precision)

    def _batch_offset_kl(self, loc, scale_tril, counts):
        """Unbiased estimate of sum_g KL_g over the trained groups from a batch's rows."""
        precision = self._expected_precision()
        row_kl = self._group_offset_kl(loc, scale_tril, precision) / ops.maximum(counts, 1.0)
        return self.total_count * ops.mean(row_kl) + self.seen_groups * self._shared_offset_kl()

    # Forward pass.

    def _terms(self, z, ids):
        """t: `(batch, num_terms)`, a column of ones first when `intercept`."""
        z = ops.cast(z, self.compute_dtype)
        if not self.intercept:
            return z
        ones = ops.ones_like(ops.expand_dims(ops.cast(ids, self.compute_dtype), -1))
        return ops.concatenate([ones, z], axis=-1)

    def call(self, inputs, training=False):
        group_ids, z = self._split_inputs(inputs)
        # Training steps check their ids too (see RandomIntercept.call for the cost).
        ids = self._checked_ids(group_ids)
        terms = self._terms(z, ids)
        loc = _gather_rows(self.offset_loc, ids)
        counts = _gather_rows(self.group_counts, ids)
        if training:
            scale_tril = _scale_tril(_gather_rows(self.offset_untransformed_scale, ids))
            self._add_kl_loss(self._batch_offset_kl(loc, scale_tril, counts))
            noise = row_noise(ops.shape(loc), self.seed_generator)
            coefficients = loc + ops.einsum("bjk,bk->bj", scale_tril, noise)
            return ops.sum(terms * coefficients, axis=-1, keepdims=True)
        all_kl = self._offset_kl(self.offset_loc, _scale_tril(self.offset_untransformed_scale))
        self._add_kl_loss(self._trained_groups_sum(all_kl))
        mean = ops.sum(terms * loc, axis=-1, keepdims=True)
        return ops.where(ops.expand_dims(counts > 0, -1), mean, 0.0)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], 1)

    # Posterior.

    def sample_posterior(self, inputs, num_samples: int, seed=None):
        """t_i . b[g_i] under `num_samples` draws from q: `(num_samples, batch, 1)`.

        Rows of one group share its b[g] within a draw. A group with no training rows draws
        b[g] from the prior MVN(0, Sigma), with sigma drawn from q(sigma) under a hyperprior.
        `seed` is an int, a `keras.random.SeedGenerator` or None.
        """
        seed = _seed_generator(seed)  # two draws below must differ
        group_ids, z = self._split_inputs(inputs)
        ids = self._checked_ids(group_ids)
        terms = self._terms(z, ids)
        row_group, seen, loc, untransformed_scale = self._batch_groups(ids)
        posterior_tril = _scale_tril(untransformed_scale)
        prior_tril = self._prior_scale_tril(self.sample_group_scale(num_samples, seed))
        scale_tril = ops.where(
            ops.reshape(seen, (1, -1, 1, 1)),
            ops.expand_dims(posterior_tril, 0),
            ops.expand_dims(prior_tril, 1),
        )  # (num_samples, groups, num_terms, num_terms)
        noise = keras.random.normal(ops.shape(scale_tril)[:-1], seed=seed)
        coefficients = loc + ops.einsum("sgjk,sgk->sgj", scale_tril, noise)
        rows = ops.take(coefficients, row_group, axis=1)
        return ops.sum(rows * terms, axis=-1, keepdims=True)

    def posterior(self):
        """q as TFP distributions: `offset`, `group_scale` and `correlation`.

        `offset` is a `tfd.MultivariateNormalTriL` of batch shape `(num_groups,)` and event
        shape `(num_terms,)`; groups with no training rows get the prior MVN(0, Sigma).
        `group_scale` is `tfd.Deterministic(sigma)`, or q(sigma) = `tfd.LogNormal` under a
        hyperprior; `correlation` is `tfd.Deterministic(R)`.
        """
        seen = self.group_counts > 0
        loc = ops.where(ops.expand_dims(seen, -1), self.offset_loc, 0.0)
        scale_tril = ops.where(
            ops.reshape(seen, (-1, 1, 1)),
            _scale_tril(self.offset_untransformed_scale),
            self._prior_scale_tril(self.group_scale()),
        )
        return {
            "offset": tfd.MultivariateNormalTriL(loc, scale_tril),
            "group_scale": self._group_scale_posterior(),
            "correlation": tfd.Deterministic(self.correlation()),
        }

    def posterior_moments(self) -> tuple:
        """q(b[g])'s mean `(num_groups, num_terms)` and covariance `(num_groups, num_terms,
        num_terms)`, as `posterior()["offset"]` has them (the prior for groups with no
        training rows), in numpy without building distributions."""
        seen = keras.ops.convert_to_numpy(self.group_counts) > 0
        loc = np.where(seen[:, None], keras.ops.convert_to_numpy(self.offset_loc), 0.0)
        scale_tril = keras.ops.convert_to_numpy(_scale_tril(self.offset_untransformed_scale))
        prior = keras.ops.convert_to_numpy(self._prior_scale_tril(self.group_scale()))
        scale_tril = np.where(seen[:, None, None], scale_tril, prior).astype("float64")
        return loc.astype("float64"), scale_tril @ np.swapaxes(scale_tril, -1, -2)

    def set_posterior(self, mean, covariance):
        """Sets q(b[g]) = MVN(mean[g], covariance[g]).

        Args:
            mean: `(num_groups, num_terms)`.
            covariance: `(num_groups, num_terms, num_terms)`, positive semi-definite (a
                singular matrix gets a tiny jitter; posterior sds floor at `SCALE_FLOOR`).
        """
        shape = (self.num_groups, self.num_terms)
        scale_tril = _psd_cholesky(np.reshape(covariance, (*shape, self.num_terms)), "covariance")
        self.offset_loc.assign(np.reshape(mean, shape).astype("float32"))
        self.offset_untransformed_scale.assign(_pack_scale_tril(scale_tril).astype("float32"))

    def set_covariance(self, covariance):
        """Sets the point estimates of sigma and R from Sigma `(num_terms, num_terms)`.

        Needs `scale_prior=None`. With `correlated=False` only the diagonal is used. A zero
        variance is accepted (sigma floors at `SCALE_FLOOR`); correlations are clipped into
        (-1, 1), and an R that is not positive definite is shrunk toward the identity until it
        is.
        """
        self._check_point_group_scale(" (`set_group_scale_posterior`, `set_correlation`)")
        covariance = np.asarray(covariance, dtype="float64")
        size = self.num_terms
        if covariance.shape != (size, size) or not np.all(np.isfinite(covariance)):
            raise ValueError(
                f"`covariance` must be a finite ({size}, {size}) matrix. Received an array of "
                f"shape {covariance.shape}"
            )
        covariance = 0.5 * (covariance + covariance.T)
        variances = np.diag(covariance)
        if np.any(variances < -1e-8 * max(np.abs(variances).max(), 1.0)):
            raise ValueError(
                f"`covariance` must have non-negative variances. Received: {variances.tolist()}"
            )
        sigma = np.sqrt(np.clip(variances, 0.0, None))
        sigma = np.maximum(sigma, max(1e-8 * sigma.max(), np.finfo("float64").tiny))
        self.group_scale_untransformed.assign(inverse_softplus(sigma).astype("float32"))
        if self._has_correlation:
            self.set_correlation(covariance / np.outer(sigma, sigma))

    def set_correlation(self, correlation):
        """Sets the point estimate of R `(num_terms, num_terms)`; needs `correlated=True`.

        Correlations are clipped into (-1, 1), and an R that is not positive definite is
        shrunk toward the identity until it is.
        """
        size = self.num_terms
        if not self.correlated:
            raise ValueError(
                f"RandomEffects '{self.name}' has correlated=False: its R is the identity"
            )
        correlation = np.asarray(correlation, dtype="float64")
        if correlation.shape != (size, size) or not np.all(np.isfinite(correlation)):
            raise ValueError(
                f"`correlation` must be a finite ({size}, {size}) matrix. Received an array "
                f"of shape {correlation.shape}"
            )
        if size == 1:
            return
        correlation = np.clip(0.5 * (correlation + correlation.T), -1.0, 1.0)
        correlation = np.clip(correlation, -_CORRELATION_LIMIT, _CORRELATION_LIMIT)
        np.fill_diagonal(correlation, 1.0)
        for shrink in (0.0, 1e-6, 1e-4, 1e-2, 1e-1, 1.0):
            try:
                chol = np.linalg.cholesky((1 - shrink) * correlation + shrink * np.eye(size))
                break
            except np.linalg.LinAlgError:
                continue
        chol /= np.linalg.norm(chol, axis=-1, keepdims=True)  # unit rows: exactly a correlation
        self.correlation_untransformed.assign(correlation_unconstrained(chol).astype("float32"))

    def _term_labels(self) -> list:
        if self.term_names is not None:
            return list(self.term_names)
        slopes = [f"slope_{j}" for j in range(self.num_slopes)]
        return ["(Intercept)", *slopes] if self.intercept else slopes

    def posterior_summary(self, level: float = 0.95) -> pd.DataFrame:
        """One row per (group, term): mean, sd, central `level` interval, training count `n`.

        Groups with no training rows show the prior (mean 0, sd sigma_j).
        """
        offset = self.posterior()["offset"]
        mean = ops.convert_to_numpy(offset.loc)
        scale_tril = ops.convert_to_numpy(offset.scale.to_dense())
        sd = np.sqrt(np.sum(np.square(scale_tril.astype("float64")), axis=-1))
        stats = normal_summary(mean, sd, level)
        frame = pd.DataFrame(
            {
                "group": np.repeat(np.arange(self.num_groups), self.num_terms),
                "term": np.tile(self._term_labels(), self.num_groups),
                **{key: value.reshape(-1) for key, value in stats.items()},
            }
        )
        return self._add_count_column(frame)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_groups=self.num_groups,
            num_slopes=self.num_slopes,
            intercept=self.intercept,
            correlated=self.correlated,
            **self._scale_config(),
            correlation_prior=self.correlation_prior,
            term_names=self.term_names,
            seed=self.seed,
        )
        return config
