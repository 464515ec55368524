"""How the estimators train their model: schedule, starting values, batches, SGD, checks.

`default_schedule` picks the batch size and epochs from the data size; `build_starting_model`
builds the model with `build_mixed_model` at the estimators' starting values (the intercept
at the link of y's mean, each group's posterior sd at its Laplace value there);
`run_sgd` trains it on the ELBO through Keras `fit` with `LazyAdam` on a cosine-decayed
learning rate, over `shuffled_batches`; `raise_if_diverged`, `check_finite_estimates` and a
probe of a subnetwork's fit turn a training run that blew up into an error that says to
lower `learning_rate`. `reffects.training` holds the model and callbacks this recipe uses.

Example:
    >>> default_schedule(10_000)
    (1000, 400)
"""

import math

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from reffects.likelihoods import Gaussian, Poisson
from reffects.models import build_mixed_model, mixed_model_layers
from reffects.optimizers import LazyAdam
from reffects.posteriors import inverse_softplus
from reffects.training import predict_means

_MAX_BATCH_SIZE = 1024
_MAX_SUBNETWORK_BATCH_SIZE = 256
_MIN_BATCHES_PER_EPOCH = 10
_TARGET_STEPS = 4000
_MAX_EPOCHS = 400
_MIN_EPOCHS = 10
_WARM_START_STEPS = 100
_STEPS_PER_EXECUTION = 32
_FEW_STEPS = 1000
_INITIAL_GROUP_SCALE = 0.5
_PROBE_ROWS = 4096  # rows on which a subnetwork fit is checked to have improved
INITIAL_NOISE_SCALE = 0.7
"""The starting noise scale of a Gaussian model, on the standardised y's scale."""


def default_schedule(
    num_rows: int, exact_finish: bool = False, subnetwork: bool = False
) -> tuple[int, int]:
    """Batch size and epochs used when the user leaves them at None.

    Batches of at most 1024 rows (256 with a dense `subnetwork`), at least 10 per epoch;
    about 4,000 optimizer steps in all, but never fewer than 10 epochs (each group's offsets
    only move when its rows are drawn). The smaller batches make a subnetwork's 4,000 steps
    fewer epochs: on the LMMNN simulation (`benchmarks/remnn_simulation.py`, 80,000 rows)
    256 x 13 epochs reached a test AUC of 0.809 where 1024 x 52 epochs, which overfits,
    reached 0.797. With `exact_finish` (a model without a subnetwork, which the
    finish after SGD solves in full: `reffects.finish`, lme4's REML for a
    Gaussian model with point-estimate scales and glmer's Laplace fit for the other
    families) SGD is only a warm start: about 100 steps, at least one epoch, with larger
    batches where one epoch of 1024 rows would be more. On 784k rows
    (`benchmarks/lmm_tools.py`) 766 steps of 1024 rows, 192 of 4096, 98 of 7843 and 20 of
    39214 all gave sigma, coefficients and held-out MSE equal to REML's to 5 digits; the
    finish made 9-10 sweeps after each.

    Example:
        >>> default_schedule(100)
        (10, 400)
        >>> default_schedule(80_000, subnetwork=True)
        (256, 13)
        >>> default_schedule(1_000_000, exact_finish=True)
        (10000, 1)
    """
    largest = _MAX_SUBNETWORK_BATCH_SIZE if subnetwork else _MAX_BATCH_SIZE
    batch_size = max(1, min(largest, num_rows // _MIN_BATCHES_PER_EPOCH))
    if exact_finish:
        batch_size = max(batch_size, num_rows // _WARM_START_STEPS)
    steps_per_epoch = max(1, num_rows // batch_size)
    target, fewest = (_WARM_START_STEPS, 1) if exact_finish else (_TARGET_STEPS, _MIN_EPOCHS)
    epochs = min(_MAX_EPOCHS, max(fewest, math.ceil(target / steps_per_epoch)))
    return batch_size, epochs


def build_starting_model(likelihood, data, model_y, weights, *, random_slopes, **model_options):
    """`build_mixed_model` at the estimators' starting values.

    The intercept starts at the link of y's (weighted) mean, each group's offset scale at
    0.5 and, for a random intercept, each group's posterior sd at its Laplace value at
    that start. `data` is the `EncodedData` of the training rows, `model_y` and `weights`
    their y on the model's scale and their sample weights (or None); `model_options` are
    the rest of `build_mixed_model`'s arguments.

    Example:
        >>> from reffects.encoding import EncodedData
        >>> data = EncodedData(np.zeros((4, 1), "float32"), [np.array([0, 0, 1, 1])])
        >>> model = build_starting_model(
        ...     Gaussian(), data, np.zeros(4, "float32"), None, random_slopes=[None],
        ...     num_groups=[3], seed=0,
        ... )
        >>> mixed_model_layers(model).factors[0].num_groups
        3
    """
    initial_mean, row_information = _initial_mean(likelihood, model_y, weights)
    model = build_mixed_model(
        num_features=data.features.shape[1],
        likelihood=likelihood,
        intercept_init=float(likelihood.link(initial_mean)),
        initial_group_scale=_INITIAL_GROUP_SCALE,
        num_examples=len(model_y),
        random_slopes=random_slopes,
        **model_options,
    )
    _initialise_offsets(model, data.codes, row_information, random_slopes)
    return model


def _initial_mean(likelihood, model_y, weights):
    """The starting response mean (the intercept starts at its link) and the Fisher
    information about eta of each row there, on the model's scale."""
    weights = np.ones(len(model_y)) if weights is None else weights
    if isinstance(likelihood, Gaussian):
        return 0.0, weights / INITIAL_NOISE_SCALE**2
    mean = float(np.sum(weights * model_y) / max(np.sum(weights), 1e-12))
    if isinstance(likelihood, Poisson):
        mean = max(mean, 1e-3)
        return mean, weights * mean
    mean = min(max(mean, 1e-3), 1.0 - 1e-3)
    return mean, weights * mean * (1.0 - mean)


def _initialise_offsets(model, codes, row_information, random_slopes):
    """Starts each group's posterior sd at its Laplace value at the starting point."""
    for k, group_codes in enumerate(codes):
        layer = mixed_model_layers(model).factors[k]
        layer.adapt(group_codes)
        if random_slopes[k]:
            continue  # a RandomEffects layer keeps its own starting q
        information = np.bincount(group_codes, weights=row_information, minlength=layer.num_groups)
        sd = 1.0 / np.sqrt(information + 1.0 / _INITIAL_GROUP_SCALE**2)
        layer.offset_untransformed_scale.assign(inverse_softplus(sd)[:, None].astype("float32"))


def hold_out(X, y, sample_weight, validation_fraction, seed):
    """Splits off `validation_fraction` of the rows at random (seeded by `seed`).

    Returns the training rows of X, y and `sample_weight` and a tuple of their validation
    rows; each keeps its type (DataFrame, Series, array or None).

    Example:
        >>> X, y, weights, (X_valid, y_valid, _) = hold_out(
        ...     np.arange(10)[:, None], np.arange(10), None, 0.2, seed=0
        ... )
        >>> len(y), len(y_valid), weights
        (8, 2, None)
    """
    num_rows = len(y)
    num_valid = int(round(validation_fraction * num_rows))
    if num_valid < 1 or num_valid >= num_rows:
        raise ValueError(
            f"validation_fraction={validation_fraction} leaves no training or no "
            f"validation rows out of {num_rows}"
        )
    order = np.random.default_rng(seed).permutation(num_rows)
    train, valid = np.sort(order[num_valid:]), np.sort(order[:num_valid])

    def rows(values, index):
        if values is None:
            return None
        if isinstance(values, (pd.DataFrame, pd.Series)):
            return values.iloc[index]
        return np.asarray(values)[index]

    validation = (rows(X, valid), rows(y, valid), rows(sample_weight, valid))
    return rows(X, train), rows(y, train), rows(sample_weight, train), validation


def run_sgd(
    model,
    inputs,
    model_y,
    weights,
    *,
    batch_size,
    epochs,
    learning_rate,
    seed,
    callbacks=None,
    validation_data=None,
    n_iter_no_change=10,
    verbose=0,
    check_subnetwork=False,
) -> dict:
    """SGD on the ELBO through Keras `fit`; returns its history.

    `LazyAdam` starts at `learning_rate` and decays to 1% of it along a cosine over the
    run. With `validation_data`, Keras's `EarlyStopping` stops after `n_iter_no_change`
    epochs without improvement and keeps the best weights. With `check_subnetwork`, a
    training run that raised the mean NLL of the first training rows by orders of
    magnitude is a `ValueError` (the finish holds a subnetwork fixed and cannot repair it).

    Example:
        >>> from reffects.encoding import EncodedData
        >>> data = EncodedData(np.zeros((40, 0), "float32"), [np.arange(40) % 4])
        >>> y = np.ones(40, "float32")
        >>> model = build_starting_model(
        ...     Gaussian(), data, y, None, random_slopes=[None], num_groups=[5], seed=0
        ... )
        >>> history = run_sgd(
        ...     model, data.model_inputs(), y, None,
        ...     batch_size=10, epochs=2, learning_rate=0.01, seed=0,
        ... )
        >>> len(history["loss"])
        2
    """
    stream, steps = shuffled_batches(
        inputs,
        model_y,
        None if weights is None else weights.astype("float32"),
        batch_size,
        seed,
    )
    # Keras runs whole multiples of steps_per_execution per epoch, so an epoch here is
    # one pass rounded up to that multiple; the stream is endless, so nothing runs dry.
    # Its multi-step loop traces the training step a second time (about a second), more
    # than one call per step costs over a short warm start.
    steps_per_execution = 1 if epochs * steps <= _FEW_STEPS else min(steps, _STEPS_PER_EXECUTION)
    steps = math.ceil(steps / steps_per_execution) * steps_per_execution
    schedule = keras.optimizers.schedules.CosineDecay(
        learning_rate, decay_steps=epochs * steps, alpha=0.01
    )
    model.compile(optimizer=LazyAdam(schedule), steps_per_execution=steps_per_execution)
    callbacks = list(callbacks or [])
    if validation_data is not None:
        callbacks.append(
            keras.callbacks.EarlyStopping(patience=n_iter_no_change, restore_best_weights=True)
        )
    probe = _probe(model, inputs, model_y, weights) if check_subnetwork else None
    history = model.fit(
        stream,
        epochs=epochs,
        steps_per_epoch=steps,
        validation_data=validation_data,
        callbacks=callbacks,
        shuffle=False,
        verbose=verbose,
    )
    if probe is not None:
        _check_training_helped(model, *probe, learning_rate)
    return history.history


def shuffled_batches(inputs, y, sample_weight, batch_size, seed):
    """An endless tf.data stream of reshuffled passes over the rows, full batches only.

    Each pass is one permutation cut into `len(y) // batch_size` batches that are gathered
    in bulk. Returns the stream of `(inputs, y[, sample_weight])` and the batches per pass.

    Example:
        >>> stream, steps = shuffled_batches([np.arange(10)], np.zeros(10), None, 4, seed=0)
        >>> steps, [part.shape for part in next(iter(stream))[0]]
        (2, [TensorShape([4])])
    """
    num_rows = len(y)
    steps = num_rows // batch_size
    tensors = tuple(tf.constant(a) for a in [*inputs, y])
    if sample_weight is not None:
        tensors += (tf.constant(sample_weight),)
    num_inputs = len(inputs)

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(num_rows), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        return tf.data.Dataset.from_tensor_slices(
            tf.reshape(order[: steps * batch_size], (steps, batch_size))
        )

    def gather(index):
        parts = tuple(tf.gather(t, index) for t in tensors)
        return (parts[:num_inputs], *parts[num_inputs:])

    batches = tf.data.Dataset.counter().flat_map(one_epoch)
    return batches.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2), steps


def _probe(model, inputs, model_y, weights):
    """Up to 4,096 training rows and the mean NLL of the untrained model on them."""
    rows = slice(0, _PROBE_ROWS)
    probe = (
        [values[rows] for values in inputs],
        model_y[rows],
        None if weights is None else weights[rows],
    )
    return probe, _mean_nll(model, *probe)


def _mean_nll(model, inputs, y, weights):
    eta = keras.ops.convert_to_tensor(predict_means(model.network, inputs)[:, None])
    mean = model.likelihood.call(keras.ops.cast(eta, "float32"))
    sample_weight = None if weights is None else weights.astype("float32")[:, None]
    nll = model.likelihood.mean_nll(y[:, None], mean, sample_weight)
    return float(keras.ops.convert_to_numpy(nll))


def _check_training_helped(model, probe, before, learning_rate):
    """A subnetwork that SGD blew up without a NaN (a learning rate too high) is an error;
    the finish holds it and cannot repair it. A blow-up moves the mean NLL by orders of
    magnitude; a few noisy steps of an honest fit can raise it by a fraction, which the
    finish repairs, so only a rise of more than max(1, |before|) nats counts."""
    after = _mean_nll(model, *probe)
    if not after <= before + max(1.0, abs(before)):
        raise ValueError(
            f"training diverged: the mean negative log-likelihood of the first "
            f"{len(probe[1])} training rows rose from {before:.4g} before training to "
            f"{after:.4g} after it; lower `learning_rate` (got {learning_rate})"
        )


def raise_if_diverged(divergence, learning_rate, cause=None):
    """After Keras's `fit`: a `ValueError` if the `StopOnNonFiniteLoss` callback
    `divergence` saw the loss become NaN or infinite.

    Example:
        >>> from reffects.training import StopOnNonFiniteLoss
        >>> raise_if_diverged(StopOnNonFiniteLoss(), learning_rate=0.01)  # did not diverge
    """
    message = divergence.message(learning_rate)
    if message:
        raise ValueError(message) from cause


def check_finite_estimates(estimates: dict, learning_rate):
    """After the finish: a `ValueError` naming the first of `estimates` (name -> value)
    that is not finite.

    Example:
        >>> check_finite_estimates({"coef_": [np.nan]}, learning_rate=0.01)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: training diverged: the estimate coef_ is nan after the fit; ...
    """
    for name, value in estimates.items():
        values = np.asarray(value, dtype="float64")
        if not np.all(np.isfinite(values)):
            first = values.reshape(-1)[~np.isfinite(values.reshape(-1))][0]
            raise ValueError(
                f"training diverged: the estimate {name} is {first} after the fit; lower "
                f"`learning_rate` (got {learning_rate}), and check that y and the "
                "features are finite and on a moderate scale"
            )
