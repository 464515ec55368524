"""ELBO assembly: a Keras model whose loss is the negative ELBO per training example.

    loss = mean_i NLL(y_i | eta_i)  +  KL(q || p) / N  (+ any other regularisation losses)

The network computes the predictor eta from the layers in `reffects.layers` and any
deterministic Keras subnetwork; the likelihood maps eta to the response mean and scores y.
Each variational layer adds an unbiased estimate of its total KL through `add_loss`; this
model divides their sum by N, the number of training examples, so a minibatch gradient is an
unbiased estimate of the full-data one and the optimum does not depend on the batch size.
"""

import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from reffects.layers import FixedEffects, GlobalIntercept, RandomIntercept
from reffects.likelihoods import get_likelihood

VARIATIONAL_LAYERS = (GlobalIntercept, RandomIntercept, FixedEffects)


def _is_stream(x) -> bool:
    return isinstance(x, (tf.data.Dataset, keras.utils.PyDataset)) or hasattr(x, "__next__")


@keras.saving.register_keras_serializable(package="reffects")
class ELBOModel(keras.Model):
    """Trains a network of variational layers on the ELBO through `model.fit`.

    `fit` finds N from in-memory data (less a `validation_split`) and records the training
    count of each group for every `RandomIntercept` whose ids are a network input. For a
    `tf.data.Dataset` or other stream, state N with `num_examples` and call
    `RandomIntercept.adapt` on the training ids first; a missing N is an error.

    `predict` (and `training=False`) uses posterior means and is deterministic; `evaluate`
    reports the NLL at the posterior means plus KL / N. The metrics `nll` and `kl` show the
    two parts of the loss.

    Args:
        network: a Keras model mapping the inputs to the predictor eta.
        likelihood: "gaussian" or a `reffects.likelihoods.Likelihood` layer.
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

    def variational_layers(self) -> list:
        """The layers whose `add_loss` terms are KL estimates."""
        return [layer for layer in self._flatten_layers() if isinstance(layer, VARIATIONAL_LAYERS)]

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        y = ops.reshape(ops.cast(y, y_pred.dtype), ops.shape(y_pred))
        row_nll = ops.sum(self.likelihood.nll(y, y_pred), axis=-1)
        if sample_weight is not None:
            row_nll = row_nll * ops.reshape(ops.cast(sample_weight, row_nll.dtype), (-1,))
        nll = ops.mean(row_nll)
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
        return total

    def fit(self, x=None, y=None, **kwargs):
        """`keras.Model.fit`, after recording N and the training group counts."""
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
        self.training_size.assign(float(size))
        self._adapt_group_layers(train_x)
        return super().fit(x, y, **kwargs)

    def evaluate(self, x=None, y=None, **kwargs):
        """`keras.Model.evaluate`, after checking in-memory group ids eagerly."""
        self._check_group_ids(x)
        return super().evaluate(x, y, **kwargs)

    def predict(self, x, **kwargs):
        """`keras.Model.predict`, after checking in-memory group ids eagerly."""
        self._check_group_ids(x)
        return super().predict(x, **kwargs)

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
            return {id(inputs[0]): train_x}
        if isinstance(train_x, (list, tuple)) and len(train_x) == len(inputs):
            return {id(t): value for t, value in zip(inputs, train_x)}
        return {}

    def _group_ids_by_layer(self, x):
        """Pairs (RandomIntercept, its in-memory ids or None) for every such layer."""
        values = self._network_input_values(x)
        for layer in self._flatten_layers():
            if isinstance(layer, RandomIntercept):
                try:
                    source = id(layer.input)
                except (AttributeError, ValueError):
                    source = None
                yield layer, values.get(source)

    def _adapt_group_layers(self, train_x):
        for layer, ids in self._group_ids_by_layer(train_x):
            if ids is not None:
                layer.adapt(np.asarray(ids))
            elif not layer.is_adapted:
                raise ValueError(
                    f"RandomIntercept '{layer.name}' needs the training count of each group "
                    "and its ids are not an in-memory network input; call "
                    "layer.adapt(training_group_ids) before fit."
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
