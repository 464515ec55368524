"""ELBO assembly: a Keras model whose loss is the negative ELBO per training example.

    loss = mean_i w_i NLL(y_i | eta_i)  +  KL(q || p) / N  (+ any other regularisation losses)

The network computes the predictor eta from the layers in `reffects.layers` and any
deterministic Keras subnetwork; the likelihood maps eta to the response mean and scores y.
The sample weight w_i multiplies row i's NLL; for a Binomial likelihood it is the row's
number of trials instead (y is then the proportion of successes, as in R's `glm`). Each
variational layer adds an unbiased estimate of its total KL through `add_loss`; this model
divides their sum by N, the number of training rows, so a minibatch gradient is an unbiased
estimate of the full-data one and the optimum does not depend on the batch size.

Posterior predictive draws come from `sample_predictive` and `predict_interval`, which run a
copy of the network whose variational layers draw from q; `predict` stays deterministic.

Under a `tf.distribute` strategy (`MirroredStrategy`, `MultiWorkerMirroredStrategy`) create
and compile the model inside `strategy.scope()`. Each replica's loss estimates the negative
ELBO per example from its share of the global batch and is divided by the number of replicas,
as Keras's own losses are, so training follows the same objective as on one device with the
same global batch; the layers draw independent noise on each replica.
"""

import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from reffects.layers import FixedEffects, GlobalIntercept, RandomEffects, RandomIntercept
from reffects.likelihoods import get_likelihood

VARIATIONAL_LAYERS = (GlobalIntercept, RandomIntercept, RandomEffects, FixedEffects)
GROUP_LAYERS = (RandomIntercept, RandomEffects)


def _is_stream(x) -> bool:
    return isinstance(x, (tf.data.Dataset, keras.utils.PyDataset)) or hasattr(x, "__next__")


def _is_multi_worker(strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


@keras.saving.register_keras_serializable(package="reffects")
class ELBOModel(keras.Model):
    """Trains a network of variational layers on the ELBO through `model.fit`.

    `fit` finds N from in-memory data (less a `validation_split`) and records the training
    count of each group for every `RandomIntercept` whose ids are a network input. For a
    `tf.data.Dataset` or other stream, state N with `num_examples` and call
    `RandomIntercept.adapt` on the training ids first (an array, or a dataset of ids read in
    one pass: see `reffects.streaming`); a missing N, or counts that do not sum to N, is an
    error. Under a `tf.distribute` strategy, create and compile the model in its scope.

    `predict` (and `training=False`) returns the response mean (a probability for Bernoulli
    and Binomial, a rate for Poisson) at the posterior means and is deterministic; `evaluate`
    reports the NLL at the posterior means plus KL / N. The metrics `nll` and `kl` show the
    two parts of the loss. In-memory y (and sample weights, which are the trials of a
    Binomial likelihood) outside the likelihood's support are a `ValueError` in `fit` and
    `evaluate`; streamed data is not checked.

    Args:
        network: a Keras model mapping the inputs to the predictor eta.
        likelihood: "gaussian", "bernoulli", "binomial", "poisson" or a
            `reffects.likelihoods.Likelihood` layer.
        num_examples: the number of training examples N; needed only for streams.

    Example:
        >>> ids = keras.Input(shape=(), dtype="int32")
        >>> eta = keras.layers.Add()([GlobalIntercept()(ids), RandomIntercept(5)(ids)])
        >>> model = ELBOModel(keras.Model(ids, eta), likelihood="gaussian")
        >>> model.compile(optimizer="adam")
        >>> history = model.fit(np.arange(10) % 5, np.ones(10), epochs=1, verbose=0)
        >>> sorted(history.history)
        ['kl', 'loss', 'nll']
    """

    def __init__(self, network, likelihood="gaussian", num_examples: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if num_examples is not None and (int(num_examples) != num_examples or num_examples < 1):
            raise ValueError(
                f"`num_examples` must be a positive integer. Received: num_examples={num_examples}"
            )
        self.network = network
        self.likelihood = get_likelihood(likelihood)
        self.num_examples = num_examples
        self.training_size = self.add_weight(
            name="training_size", shape=(), initializer="zeros", trainable=False
        )
        self.nll_tracker = keras.metrics.Mean(name="nll")
        self.kl_tracker = keras.metrics.Mean(name="kl")
        if network.built:
            self.built = True

    def call(self, inputs, training=False):
        return self.likelihood(self.network(inputs, training=training))

    def compile(self, optimizer="rmsprop", loss=None, **kwargs):
        if loss is not None:
            raise ValueError(
                "ELBOModel's loss is the negative ELBO defined by its likelihood; "
                f"do not pass `loss` to compile. Received: loss={loss!r}"
            )
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        """Recompiles a loaded model with its saved optimizer and metrics."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        self.optimizer.build(self.trainable_variables)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3.15 cannot `fit` any model under MultiWorkerMirroredStrategy
        # (keras-team/keras#20585): here it averages the first distributed batch across
        # replicas with `strategy.reduce` only to learn the input shapes and dtypes, and the
        # collective reduce rejects nested batches. The first local replica's batch has the
        # same shapes and dtypes. (The other half of the fix is in `compute_metrics`.)
        strategy = self._distribute_strategy
        if iterator is not None and _is_multi_worker(strategy):
            for _, _, batches in iterator:
                data_batch = keras.tree.map_structure(
                    lambda value: strategy.experimental_local_results(value)[0], next(batches)
                )
                break
            iterator = None
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def variational_layers(self) -> list:
        """The layers whose `add_loss` terms are KL estimates."""
        return [layer for layer in self._flatten_layers() if isinstance(layer, VARIATIONAL_LAYERS)]

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        y = ops.reshape(ops.cast(y, y_pred.dtype), ops.shape(y_pred))
        if sample_weight is not None:
            sample_weight = ops.reshape(ops.cast(sample_weight, y_pred.dtype), (-1,))
        nll = self.likelihood.mean_nll(y, y_pred, sample_weight)
        kl_terms = [loss for layer in self.variational_layers() for loss in layer.losses]
        kl_ids = {id(loss) for loss in kl_terms}
        kl = (
            ops.sum(ops.stack(kl_terms)) / ops.maximum(self.training_size, 1.0) if kl_terms else 0.0
        )
        others = [loss for loss in self.losses if id(loss) not in kl_ids]
        self.nll_tracker.update_state(nll)
        self.kl_tracker.update_state(kl)
        total = nll + kl
        if others:
            total = total + ops.sum(ops.stack(others))
        # Keras's convention under tf.distribute: each replica returns its loss divided by
        # the number of replicas, the gradients are summed across replicas and the reported
        # loss is multiplied back. Each replica's nll + kl estimates the per-example negative
        # ELBO from its share of the global batch, so the sum is their mean: the estimate
        # one device would make from the whole batch, with the KL counted once.
        return total / tf.distribute.get_strategy().num_replicas_in_sync

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        results = super().compute_metrics(x, y, y_pred, sample_weight)
        if _is_multi_worker(self.distribute_strategy):
            # Keras averages each replica's metric values with
            # `strategy.reduce("MEAN", value, axis=0)` under MultiWorkerMirroredStrategy,
            # which fails on scalars (keras-team/keras#20585); give them that axis.
            results = {
                name: ops.reshape(value, (1,)) if ops.ndim(value) == 0 else value
                for name, value in results.items()
            }
        return results

    def fit(self, x=None, y=None, **kwargs):
        """`keras.Model.fit`, after checking y and recording N and the group counts."""
        train_x, size = self._training_part(
            x, kwargs.get("validation_split", 0.0), kwargs.get("validation_data")
        )
        if self.num_examples is not None:
            size = self.num_examples
        if size is None:
            raise ValueError(
                "ELBOModel cannot tell the number of training examples N from a "
                f"{type(x).__name__}; pass num_examples=N when you create the model "
                "(the KL term is divided by N)."
            )
        self._check_targets(y, kwargs.get("sample_weight"))
        self.training_size.assign(float(size))
        self._adapt_group_layers(train_x, size)
        self._build_optimizer()
        return super().fit(x, y, **kwargs)

    def _build_optimizer(self):
        # Without a distribution strategy Keras builds the optimizer while tracing the
        # training step, and a tf.function that creates variables is traced twice (about half
        # a second for this model). Its variables exist already once the network is built.
        built = all(layer.built for layer in self._flatten_layers())
        if built and self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)

    def evaluate(self, x=None, y=None, **kwargs):
        """`keras.Model.evaluate`, after checking in-memory group ids and y eagerly."""
        self._check_group_ids(x)
        self._check_targets(y, kwargs.get("sample_weight"))
        return super().evaluate(x, y, **kwargs)

    def predict(self, x, **kwargs):
        """`keras.Model.predict`, after checking in-memory group ids eagerly."""
        self._check_group_ids(x)
        return super().predict(x, **kwargs)

    def _check_targets(self, y, sample_weight):
        """Rejects in-memory y (and weights, or trials) outside the likelihood's support."""
        if y is not None and not _is_stream(y):
            self.likelihood.check_targets(np.asarray(y), sample_weight)

    def _check_group_ids(self, x):
        if x is not None and not _is_stream(x):
            for layer, ids in self._group_ids_by_layer(x):
                if ids is not None:
                    layer.validate_ids(np.asarray(ids))

    @staticmethod
    def _training_part(x, validation_split, validation_data):
        """The in-memory inputs Keras will train on and their length, or (None, None)."""
        if x is None or _is_stream(x):
            return None, None
        leaves = keras.tree.flatten(x)
        num_rows = len(leaves[0])
        if validation_split and validation_data is None:
            num_rows = int(math.floor(num_rows * (1.0 - validation_split)))
            x = keras.tree.map_structure(lambda leaf: leaf[:num_rows], x)
        return x, num_rows

    def _network_input_values(self, train_x):
        """Maps id(network input tensor) -> the array fed to it."""
        inputs = getattr(self.network, "inputs", None) or []
        if train_x is None or not inputs:
            return {}
        if isinstance(train_x, dict):
            return {id(t): train_x[t.name] for t in inputs if t.name in train_x}
        if len(inputs) == 1:
            if isinstance(train_x, (list, tuple)) and len(train_x) == 1:
                train_x = train_x[0]
            return {id(inputs[0]): train_x}
        if isinstance(train_x, (list, tuple)) and len(train_x) == len(inputs):
            return {id(t): value for t, value in zip(inputs, train_x)}
        return {}

    def _group_ids_by_layer(self, x):
        """Pairs (RandomIntercept or RandomEffects, its in-memory ids or None) for every such
        layer (a RandomEffects layer's ids are the first of its inputs)."""
        values = self._network_input_values(x)
        for layer in self._flatten_layers():
            if isinstance(layer, GROUP_LAYERS):
                try:
                    ids = layer.input
                    source = id(ids[0] if isinstance(ids, (list, tuple)) else ids)
                except (AttributeError, ValueError):
                    source = None
                yield layer, values.get(source)

    def _adapt_group_layers(self, train_x, size):
        for layer, ids in self._group_ids_by_layer(train_x):
            if ids is not None:
                layer.adapt(np.asarray(ids))
            elif not layer.is_adapted:
                raise ValueError(
                    f"{type(layer).__name__} '{layer.name}' needs the training count of each "
                    "group and its ids are not an in-memory network input; call "
                    "layer.adapt(training_group_ids) before fit."
                )
            counted = np.sum(ops.convert_to_numpy(layer.group_counts), dtype="float64")
            if counted != size:
                raise ValueError(
                    f"{type(layer).__name__} '{layer.name}' was adapted on {counted:.0f} rows "
                    f"but fit trains on N={size}; adapt it on the group ids of exactly the "
                    "training rows (the per-row KL is scaled by those counts)."
                )

    def get_config(self):
        return {
            "name": self.name,
            "network": keras.saving.serialize_keras_object(self.network),
            "likelihood": keras.saving.serialize_keras_object(self.likelihood),
            "num_examples": self.num_examples,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["network"] = keras.saving.deserialize_keras_object(
            config["network"], custom_objects=custom_objects
        )
        config["likelihood"] = keras.saving.deserialize_keras_object(
            config["likelihood"], custom_objects=custom_objects
        )
        return cls(**config)


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops training at the end of the epoch whose loss is NaN or infinite, and says so.

    Keras's `TerminateOnNaN` stops silently and reads the loss after every batch (a sync of
    the device each step); this one reads the epoch's mean loss, which is NaN or infinite
    as soon as one step's loss was. After `fit`, `diverged_at` is the (1-based) epoch that
    diverged, or None, and `loss` the non-finite value; `message(learning_rate)` is the
    error to report.

    Example:
        >>> stop = StopOnNonFiniteLoss()
        >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> x = np.array([[1.0], [np.nan]])
        >>> _ = model.fit(x, np.zeros(2), epochs=5, verbose=0, callbacks=[stop])
        >>> stop.diverged_at, len(model.history.history["loss"])
        (1, 1)
    """

    def __init__(self):
        super().__init__()
        self.diverged_at = None
        self.loss = None

    def on_train_begin(self, logs=None):
        self.diverged_at = None
        self.loss = None

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            self.diverged_at, self.loss = epoch + 1, float(loss)
            self.model.stop_training = True

    def message(self, learning_rate) -> str:
        """The error for a training run that diverged (None when it did not)."""
        if self.diverged_at is None:
            return None
        return (
            f"training diverged: the loss became {self.loss} at epoch {self.diverged_at}; "
            f"lower `learning_rate` (got {learning_rate})"
        )


def check_finite_parameters(model) -> None:
    """Raises a `ValueError` naming the first weight of `model` that is NaN or infinite.

    Drawing from a distribution with a NaN parameter can hang (TFP's Poisson sampler loops
    forever on a NaN rate), so the samplers check first.
    """
    for weight in model.weights:
        values = ops.convert_to_numpy(weight)
        if not np.all(np.isfinite(values)):
            raise ValueError(
                f"the model's weight '{weight.path}' is NaN or infinite, so its posterior "
                "cannot be sampled; training diverged (refit with a lower learning rate)"
            )


_ROWS_PER_PASS = 2**18
"""Posterior predictive draws run on at most this many rows (draws x rows) at a time."""


class _PosteriorDraws(keras.layers.Layer):
    """Runs a variational layer's `sample_posterior` on inputs tiled `num_samples` times.

    The input holds `num_samples` copies of the same rows, draw-major; the output holds, for
    each copy, the layer's output under one draw from q.
    """

    def __init__(self, layer, num_samples, seed, **kwargs):
        super().__init__(name=f"{layer.name}_draws", **kwargs)
        self.layer = layer
        self.num_samples = num_samples
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs):
        rows = ops.shape(keras.tree.flatten(inputs)[0])[0] // self.num_samples
        first_copy = keras.tree.map_structure(lambda value: value[:rows], inputs)
        draws = self.layer.sample_posterior(first_copy, self.num_samples, self.seed_generator)
        return ops.reshape(draws, (-1, self.layer.units))

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)


def _draw_network(network, num_samples, rng):
    """The network with every variational layer replaced by draws from its q (weights shared)."""
    if isinstance(network, keras.Sequential):
        network = keras.Model(network.inputs[0], network.outputs[0])  # same layers, functional
    if not isinstance(network, keras.Model) or not hasattr(network, "inputs"):
        raise ValueError(
            "Posterior predictive sampling needs a functional (or Sequential) Keras network "
            f"inside the ELBOModel. Received: {type(network).__name__}"
        )
    stochastic = set()

    def call_function(layer, *args, **kwargs):
        tensors = keras.tree.flatten((args, kwargs))
        random_input = any(id(t) in stochastic for t in tensors)
        if isinstance(layer, VARIATIONAL_LAYERS):
            if random_input:
                raise ValueError(
                    f"Layer '{layer.name}' takes the output of another variational layer; "
                    "posterior predictive sampling supports variational layers fed by the "
                    "inputs or by deterministic layers only."
                )
            outputs = _PosteriorDraws(layer, num_samples, int(rng.integers(2**31 - 1)))(*args)
        else:
            outputs = layer(*args, **kwargs)
        if random_input or isinstance(layer, VARIATIONAL_LAYERS):
            stochastic.update(id(t) for t in keras.tree.flatten(outputs))
        return outputs

    return keras.models.clone_model(
        network, clone_function=lambda layer: layer, call_function=call_function, recursive=True
    )


def sample_predictive(
    model: ELBOModel, x, num_samples: int = 1000, *, trials=None, seed: int | None = None
) -> dict:
    """Draws from the posterior predictive distribution of a fitted `ELBOModel`.

    Each draw takes one value of every variational parameter from q (a group with no
    training rows takes its offset from the prior Normal(0, sigma_k)), maps the inputs to eta
    through the network, eta to the response mean through the likelihood, and draws y from
    the likelihood given that mean. Rows of one draw share its parameters, so the draws are
    joint across rows. Layers are untouched: `predict` stays deterministic.

    Args:
        model: an `ELBOModel` whose network is a functional (or Sequential) Keras model.
        x: in-memory inputs, as for `model.predict`.
        num_samples: number of draws.
        trials: for a Binomial likelihood, the number of trials of each row (default 1);
            y draws are then proportions of it.
        seed: makes the draws reproducible.

    Returns:
        A dict of numpy arrays of shape `(num_samples, batch, units)`: `"mean"`, the
        response mean (probability, rate) under each draw, and `"y"`, the drawn responses.

    Example:
        >>> ids = keras.Input(shape=(), dtype="int32")
        >>> eta = keras.layers.Add()([GlobalIntercept()(ids), RandomIntercept(5)(ids)])
        >>> model = ELBOModel(keras.Model(ids, eta), likelihood="poisson")
        >>> model.compile(optimizer="adam")
        >>> _ = model.fit(np.arange(10) % 4, np.ones(10), epochs=1, verbose=0)
        >>> draws = sample_predictive(model, np.array([0, 4]), num_samples=100, seed=0)
        >>> draws["y"].shape
        (100, 2, 1)
    """
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, (int, np.integer))
        or (num_samples < 1)
    ):
        raise ValueError(
            f"`num_samples` must be a positive integer. Received: num_samples={num_samples!r}"
        )
    if _is_stream(x):
        raise ValueError("sample_predictive takes in-memory inputs, not a stream")
    model._check_group_ids(x)
    check_finite_parameters(model)
    num_rows = len(keras.tree.flatten(x)[0])
    if trials is not None:
        trials = np.asarray(trials, dtype="float32").reshape(num_rows, 1)
    per_pass = int(min(num_samples, max(1, _ROWS_PER_PASS // max(num_rows, 1))))
    rng = np.random.default_rng(seed)
    network = _draw_network(model.network, per_pass, rng)
    means, draws = [], []
    for _ in range(-(-num_samples // per_pass)):
        tiled = keras.tree.map_structure(
            lambda leaf: np.concatenate([np.asarray(leaf)] * per_pass), x
        )
        eta = network(tiled, training=False)
        mean = model.likelihood(ops.reshape(eta, (per_pass, num_rows, -1)))
        mean_values = ops.convert_to_numpy(mean)
        missing = np.isnan(mean_values)
        if missing.any():
            row = int(np.argwhere(missing)[0][1])
            raise ValueError(
                f"the response mean of row {row} is NaN under a posterior draw, so y cannot be "
                "drawn; are the inputs of that row finite and of the training data's scale?"
            )
        y = model.likelihood.sample(mean, trials=trials, seed=int(rng.integers(2**31 - 1)))
        means.append(mean_values)
        draws.append(ops.convert_to_numpy(y))
    return {
        "mean": np.concatenate(means)[:num_samples],
        "y": np.concatenate(draws)[:num_samples],
    }


def predict_interval(
    model: ELBOModel,
    x,
    level: float = 0.9,
    num_samples: int = 1000,
    *,
    trials=None,
    seed: int | None = None,
):
    """Central posterior predictive intervals of y, from `sample_predictive`.

    The bounds are empirical quantiles of the y draws (the inverted empirical CDF, so for a
    count or a proportion they are values y can take and the interval holds at least `level`
    of the predictive mass).

    Args:
        model: a fitted `ELBOModel`.
        x: in-memory inputs, as for `model.predict`.
        level: probability the interval holds, in (0, 1).
        num_samples: number of posterior predictive draws.
        trials: for a Binomial likelihood, the trials of each row (default 1).
        seed: makes the intervals reproducible.

    Returns:
        `(lower, upper)`, numpy arrays of shape `(batch, units)`.

    Example:
        >>> ids = keras.Input(shape=(), dtype="int32")
        >>> eta = keras.layers.Add()([GlobalIntercept()(ids), RandomIntercept(5)(ids)])
        >>> model = ELBOModel(keras.Model(ids, eta), likelihood="gaussian")
        >>> model.compile(optimizer="adam")
        >>> _ = model.fit(np.arange(10) % 4, np.zeros(10), epochs=1, verbose=0)
        >>> lower, upper = predict_interval(model, np.array([0, 4]), level=0.9, seed=0)
        >>> bool(np.all(lower < upper))
        True
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"`level` must be in (0, 1). Received: level={level}")
    y = sample_predictive(model, x, num_samples, trials=trials, seed=seed)["y"]
    tail = (1.0 - level) / 2.0
    lower = np.quantile(y, tail, axis=0, method="inverted_cdf")
    upper = np.quantile(y, 1.0 - tail, axis=0, method="inverted_cdf")
    return lower, upper


def predict_means(network, x, chunk_size: int = 65536) -> np.ndarray:
    """The network's output at the posterior means, as float64 of shape (n,).

    Eager calls on chunks of `chunk_size` rows, the last one padded to that size: no
    `predict` function to trace (which costs more than the work on small data), and every
    call has the same shape, so the kernels (and their float32 rounding) are the same and a
    row's value does not depend on the rows predicted with it.

    Example:
        >>> ids = keras.Input(shape=(), dtype="int64")
        >>> network = keras.Model(ids, GlobalIntercept()(ids))
        >>> predict_means(network, np.arange(3)).shape
        (3,)
    """
    x = keras.tree.map_structure(np.asarray, x)
    num_rows = len(keras.tree.flatten(x)[0])
    parts = []
    for start in range(0, num_rows, chunk_size):
        if start + chunk_size <= num_rows:
            rows = slice(start, start + chunk_size)  # a view, not a copy
        else:
            rows = np.arange(start, start + chunk_size).clip(max=num_rows - 1)
        chunk = keras.tree.map_structure(lambda values, rows=rows: values[rows], x)
        parts.append(ops.convert_to_numpy(network(chunk, training=False)))
    return np.concatenate(parts)[:num_rows].astype("float64").reshape(-1)
