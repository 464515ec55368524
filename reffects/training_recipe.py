"""How the estimators train their model: schedule, starting values, batches, SGD, checks.

`default_schedule` picks the batch size and epochs from the data size; `build_starting_model`
builds the model with `build_mixed_model` at the estimators' starting values (the intercept
at the link of y's mean, each group's posterior sd at its Laplace value there);
`run_sgd` trains it on the ELBO through Keras `fit` with `LazyAdam` on a cosine-decayed
learning rate, over `shuffled_batches`; `raise_if_diverged` and `check_finite_estimates`
turn a training run that blew up into an error that says to lower `learning_rate`, and
`FitProbe` tells when SGD made a subnetwork's fit far worse. A subnetwork is guarded:
`subnetwork_columns` leaves categorical and essentially binary columns (dummies) to the
linear part, SGD runs with each of `subnetwork_schedules`, and `choose_subnetwork_weight`
keeps the model, and the weight in `SUBNETWORK_WEIGHTS` on its subnetwork's output (0: the
linear mixed model), that fit the `validation_rows` best. `reffects.training` holds the
model and callbacks this recipe uses.

Example:
    >>> default_schedule(10_000)
    (1000, 400)
"""

import math

import keras
import numpy as np
import tensorflow as tf

from reffects.likelihoods import Categorical, Gaussian, Poisson
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
SUBNETWORK_WEIGHTS = tuple(np.linspace(0.0, 1.0, 21).round(2))
"""The weights on a trained subnetwork's output among which `choose_subnetwork_weight`
chooses by validation NLL; 0 is the (generalised) linear mixed model."""
GUARD_STANDARD_ERRORS = 2.0
"""How many standard errors the chosen w's validation gain over w = 0 must pass for the
subnetwork to be kept (`_clearly_better`)."""
ESSENTIALLY_BINARY = 0.99
"""A column whose two commonest values fill this share of the rows stays out of a default
subnetwork (`subnetwork_columns`)."""
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


def subnetwork_schedules(num_rows: int) -> list:
    """The SGD schedules tried for a subnetwork at the defaults: `(batch_size, epochs)`
    with batches of at most 256 rows and with batches of at most 1,024, each about 4,000
    steps (`default_schedule`); one if they coincide (small data). The estimators train
    one model per schedule and keep the one whose exact finish, with the subnetwork's
    output held, has the least NLL on the validation rows (`choose_subnetwork_weight`).

    Which is better depends on the data: on the LMMNN simulation (Bernoulli, 80,000 rows)
    256 x 13 epochs reached a test AUC of 0.809 and 1024 x 52 epochs 0.797; on IMDb's
    fold 1 (`benchmarks/imdb.py`, 63,619 rows) 1024 x 58 epochs reached a test MSE of 0.880
    and 256 x 17 epochs 0.895, and the validation rows (inside the training fold) ranked
    them the same way (NLL 1.158 and 1.173 after the finish).

    Example:
        >>> subnetwork_schedules(80_000)
        [(256, 13), (1024, 52)]
        >>> subnetwork_schedules(2_000)
        [(200, 400)]
    """
    return list(
        dict.fromkeys([default_schedule(num_rows, subnetwork=True), default_schedule(num_rows)])
    )


def build_starting_model(likelihood, data, model_y, weights, *, random_slopes, **model_options):
    """`build_mixed_model` at the estimators' starting values.

    The intercept starts at the link of y's (weighted) mean (with K classes, the log odds
    of each class's share against class 0's) less the mean of `data.offset` if any, each
    group's offset scale at 0.5 and, for a
    random intercept, each group's posterior sd (per class) at its Laplace value at that
    start. `data` is the `EncodedData` of the training rows, `model_y` and `weights`
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
    intercept = keras.ops.convert_to_numpy(likelihood.link(initial_mean))
    if data.offset is not None and not isinstance(likelihood, Gaussian):
        # y's mean is reached at the mean offset (a Gaussian's y is centred less its offset)
        intercept = intercept - np.average(data.offset, weights=weights)
    model = build_mixed_model(
        num_features=data.features.shape[1],
        likelihood=likelihood,
        intercept_init=intercept,
        initial_group_scale=_INITIAL_GROUP_SCALE,
        num_examples=len(model_y),
        random_slopes=random_slopes,
        **model_options,
    )
    _initialise_offsets(model, data.codes, row_information, random_slopes)
    return model


def _initial_mean(likelihood, model_y, weights):
    """The starting response mean (the intercept starts at its link) and the Fisher
    information about eta of each row there (K classes: `(n, K - 1)`, each class's
    diagonal entry), on the model's scale."""
    weights = np.ones(len(model_y)) if weights is None else weights
    if isinstance(likelihood, Gaussian):
        return 0.0, weights / INITIAL_NOISE_SCALE**2
    if isinstance(likelihood, Categorical):  # model_y one-hot
        share = np.maximum(weights @ model_y.astype("float64") / max(np.sum(weights), 1e-12), 1e-3)
        share /= share.sum()
        return share, weights[:, None] * share[1:] * (1.0 - share[1:])
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
        information = np.reshape(row_information, (len(group_codes), -1))  # a column per unit
        information = np.stack(
            [np.bincount(group_codes, c, minlength=layer.num_groups) for c in information.T],
            axis=1,
        )
        sd = 1.0 / np.sqrt(information + 1.0 / _INITIAL_GROUP_SCALE**2)
        layer.offset_untransformed_scale.assign(inverse_softplus(sd).astype("float32"))


def validation_rows(num_rows: int, validation_fraction: float, seed) -> np.ndarray:
    """A boolean mask of `validation_fraction` of the rows, drawn at random (seeded by `seed`).

    At least one row is held out and one kept; fewer than two rows is a `ValueError`.

    Example:
        >>> validation_rows(10, 0.2, seed=0).sum()
        np.int64(2)
    """
    num_valid = int(round(validation_fraction * num_rows))
    num_valid = min(max(num_valid, 1), num_rows - 1)
    if num_valid < 1:
        raise ValueError(
            f"validation_fraction={validation_fraction} leaves no training or no "
            f"validation rows out of {num_rows}"
        )
    mask = np.zeros(num_rows, dtype=bool)
    mask[np.random.default_rng(seed).permutation(num_rows)[:num_valid]] = True
    return mask


def subnetwork_columns(features, columns=None, categorical=None) -> list | None:
    """The model columns a subnetwork sees by default: those of the feature columns that
    are not essentially binary.

    `columns` lists, per feature column of X, the positions of its model columns (a
    numeric column's own and, if it had missing values, its missing indicator's; a
    categorical column's dummies), default one model column each; `categorical` says
    which are categorical. A numeric column is essentially binary when its two commonest
    values fill at least 99% of the rows (`ESSENTIALLY_BINARY`): a dummy, or a sparse
    indicator that is now and then 2 or 3. A function of a two-valued column alone is
    linear in it, which the linear part already fits; a subnetwork could add only
    interactions, and on many sparse dummies it overfits them (see
    `RandomEffectsRegressor`'s `subnetwork_cols`). So essentially binary columns and
    categorical columns' dummies stay out; every other column comes in with its missing
    indicator (which tells the subnetwork which values are fills). When none is left, the
    subnetwork sees every model column (None).

    Example:
        >>> subnetwork_columns(np.array([[0.0, 1.5, 2.0], [1.0, -0.5, 2.0], [0.0, 0.2, 2.0]]))
        [1]
        >>> features = np.array([[1.5, 0.0, 1.0], [-0.5, 1.0, 0.0], [0.2, 0.0, 0.0]])
        >>> subnetwork_columns(features, [[0, 1], [2]], [False, True])  # x, x[missing], c[T.b]
        [0, 1]
    """
    features = np.asarray(features)
    if columns is None:
        columns = [[j] for j in range(features.shape[1])]
    categorical = [False] * len(columns) if categorical is None else categorical
    chosen = []
    for positions, is_categorical in zip(columns, categorical):
        if is_categorical or not positions:
            continue
        _, counts = np.unique(features[:, positions[0]], return_counts=True)
        if np.sort(counts)[-2:].sum() < ESSENTIALLY_BINARY * len(features):
            chosen += [int(j) for j in positions]
    return chosen or None


def subnetwork_head(model):
    """A Keras model of the `features` input giving the layer `subnetwork_output`: the
    subnetwork of a `build_mixed_model` network (sharing its weights), which reads the
    features alone (not the group ids or an offset)."""
    network = model.network
    (features,) = [tensor for tensor in network.inputs if tensor.name == "features"]
    return keras.Model(features, network.get_layer("subnetwork_output").output)


def subnetwork_output(model, features, head=None) -> np.ndarray:
    """The output of the layer `subnetwork_output` of a `build_mixed_model` network at
    `features` (`(n, num_features)`), at the posterior means (no dropout), as float64 of
    shape (n,), or (n, K - 1) with K classes; `head`: `subnetwork_head(model)` if already
    built."""
    output = predict_means(subnetwork_head(model) if head is None else head, features)
    units = model.likelihood.predictor_units
    return output if units == 1 else output.reshape(-1, units)


def choose_subnetwork_weight(models, finish, validation, candidates=SUBNETWORK_WEIGHTS, start=None):
    """Which trained model, and which weight w on its subnetwork's output f, fit the
    validation rows best.

    `finish(model)` fits the model's linear part exactly with its current subnetwork
    output held, on the rows SGD trained on. Each of `models` (one per SGD schedule) is
    finished with f held, and the one whose predictor eta_1 has the least mean negative
    log-likelihood on `validation` (`(inputs, y, sample_weight)`, rows SGD did not see; a
    group without training rows at offset 0) is kept. It is finished again without f
    (w = 0: the linear mixed model), giving eta_0, and each candidate w is scored by the
    validation NLL at `(1 - w) eta_0 + w eta_1` (a Gaussian's at the noise scale of w = 1,
    so it ranks w by squared error). That is exactly the predictor a finish with `w * f`
    held gives when the variance parameters are held: the posterior mean of the linear
    part is linear in the y it fits, y - w f. The kept model is left with f scaled by the
    chosen w (a tie goes to the smaller; a w > 0 only where its gain over w = 0 is clear,
    `_clearly_better`) and the linear part of the finish nearer to it, w = 0 or w = 1.

    A finish that fails (a `ValueError` or `LinAlgError`: SGD blew the model up) scores
    infinity; if the finish without f fails from SGD's state, it starts again from the
    weights `start` (the untrained model's, as a fit without SGD does). Returns the index
    of the kept model, the weight, every candidate's score and the error of the failed
    finish with f held, or None.

    Example:
        >>> from reffects.encoding import EncodedData
        >>> from reffects.models import build_mixed_model
        >>> x = np.linspace(-2, 2, 40, dtype="float32")[:, None]
        >>> data = EncodedData(x, [np.zeros(40, int)])
        >>> model = build_mixed_model(1, [2], hidden_units=(4,), num_examples=40, seed=0)
        >>> y = np.sin(2 * data.features[:, 0])
        >>> index, weight, scores, error = choose_subnetwork_weight(
        ...     [model], lambda m: None, (data.model_inputs(), y, None), candidates=(0.0, 1.0)
        ... )
        >>> index, weight in scores, error
        (0, True, None)
    """
    inputs, y, weights = validation
    fits, failure = [], None
    for model in models:
        try:
            finish(model)
        except (ValueError, np.linalg.LinAlgError) as error:
            fits.append((math.inf, None, None))
            failure = failure or error
            continue
        eta = predict_means(model.network, inputs)
        fits.append((_nll(model.likelihood, eta, y, weights), eta, model.get_weights()))
    index = min(range(len(fits)), key=lambda i: fits[i][0])  # the first on ties
    model, (_, eta_1, state_1) = models[index], fits[index]
    kernel = model.network.get_layer("subnetwork_output").kernel
    trained = keras.ops.convert_to_numpy(kernel).copy()
    kernel.assign(0.0 * trained)
    try:
        finish(model)
    except (ValueError, np.linalg.LinAlgError):
        if start is None:
            raise
        model.set_weights(start)
        kernel.assign(0.0 * trained)
        finish(model)
    eta_0, state_0 = predict_means(model.network, inputs), model.get_weights()
    scores = {}
    for weight in sorted(float(w) for w in candidates):
        if eta_1 is None and weight > 0.0:
            continue  # no finish with f held: only w = 0 is left
        eta = eta_0 if weight == 0.0 else (1.0 - weight) * eta_0 + weight * eta_1
        scores[weight] = _nll(model.likelihood, eta, y, weights)
    finite = {w: score for w, score in scores.items() if math.isfinite(score)}
    best = min(finite, key=finite.get) if finite else 0.0
    if best > 0.0:
        eta = (1.0 - best) * eta_0 + best * eta_1
        if not _clearly_better(model.likelihood, eta, eta_0, y, weights):
            best = 0.0
    model.set_weights(state_0 if best < 0.5 else state_1)  # a later finish starts nearer
    kernel.assign(trained * best)
    return index, best, scores, (failure if eta_1 is None else None)


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
) -> dict:
    """SGD on the ELBO through Keras `fit`; returns its history.

    `LazyAdam` starts at `learning_rate` and decays to 1% of it along a cosine over the
    run. With `validation_data`, Keras's `EarlyStopping` stops after `n_iter_no_change`
    epochs without improvement and keeps the best weights.

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
    history = model.fit(
        stream,
        epochs=epochs,
        steps_per_epoch=steps,
        validation_data=validation_data,
        callbacks=callbacks,
        shuffle=False,
        verbose=verbose,
    )
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


class FitProbe:
    """The mean NLL of up to 4,096 training rows before SGD, to tell a blow-up after it.

    A subnetwork that SGD blew up without a NaN (a learning rate too high) moves the mean
    NLL by orders of magnitude; a few noisy steps of an honest fit can raise it by a
    fraction, which the finish repairs, so only a rise of more than max(1, |before|) nats
    counts.

    Example:
        >>> from reffects.encoding import EncodedData
        >>> data = EncodedData(np.zeros((8, 0), "float32"), [np.arange(8) % 2])
        >>> y = np.zeros(8, "float32")
        >>> model = build_starting_model(
        ...     Gaussian(), data, y, None, random_slopes=[None], num_groups=[3], seed=0
        ... )
        >>> FitProbe(model, data.model_inputs(), y, None).divergence(model, 0.01) is None
        True
    """

    def __init__(self, model, inputs, model_y, weights):
        rows = slice(0, _PROBE_ROWS)
        self.rows = (
            [values[rows] for values in inputs],
            model_y[rows],
            None if weights is None else weights[rows],
        )
        self.before = mean_nll(model, *self.rows)

    def divergence(self, model, learning_rate) -> str | None:
        """A message saying that training diverged, or None if it did not."""
        after = mean_nll(model, *self.rows)
        if after <= self.before + max(1.0, abs(self.before)):
            return None
        return (
            f"training diverged: the mean negative log-likelihood of the first "
            f"{len(self.rows[1])} training rows rose from {self.before:.4g} before training "
            f"to {after:.4g} after it; lower `learning_rate` (got {learning_rate})"
        )


def mean_nll(model, inputs, y, weights) -> float:
    """The mean negative log-likelihood of `y` (`(n,)`, weighted by `weights` or None)
    under `model` at its posterior means (a group without training rows at offset 0)."""
    return _nll(model.likelihood, predict_means(model.network, inputs), y, weights)


def _clearly_better(likelihood, eta, eta_0, y, weights) -> bool:
    """Whether the predictor `eta` beats `eta_0` on the validation rows by more than
    `GUARD_STANDARD_ERRORS` standard errors of the mean per-row difference in NLL (weighted
    rows count their weight). On small validation sets the best w is mostly noise: on
    sleepstudy's 15 validation rows it chose w = 1 and a held-out MSE 1.051 times the
    linear model's.

    Example:
        >>> y = np.array([0.0, 1.0, 0.0, 1.0])
        >>> _clearly_better(Gaussian(), y + 0.01, np.full(4, 0.5), y, None)
        True
        >>> _clearly_better(Gaussian(), np.full(4, 0.49), np.full(4, 0.5), y, None)
        False
    """
    weights = np.ones(len(y)) if weights is None else np.asarray(weights, "float64")
    difference = _row_nll(likelihood, eta_0, y) - _row_nll(likelihood, eta, y)
    total = weights.sum()
    gain = weights @ difference / total
    spread = weights @ np.square(difference - gain) / total
    return bool(gain > GUARD_STANDARD_ERRORS * np.sqrt(spread / max(total - 1.0, 1.0)))


def _row_nll(likelihood, eta, y):
    """Each row's negative log-likelihood at the predictor `eta` (as `_nll` reads them)."""
    y = np.asarray(y, "float32").reshape(len(y), -1)
    eta = np.reshape(eta, (len(y), likelihood.predictor_units))
    mean = likelihood.call(keras.ops.cast(keras.ops.convert_to_tensor(eta), "float32"))
    nll = keras.ops.sum(likelihood.nll(y, mean), axis=-1)
    return keras.ops.convert_to_numpy(nll).astype("float64")


def _nll(likelihood, eta, y, weights):
    """The mean negative log-likelihood of `y` at the predictor `eta`: both `(n,)`, or with
    K classes y one-hot `(n, K)` and eta `predict_means`'s flattened `(n, K - 1)`."""
    rows = _row_nll(likelihood, eta, y)
    return float(np.mean(rows if weights is None else np.asarray(weights, "float64") * rows))


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
