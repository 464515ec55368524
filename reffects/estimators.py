"""scikit-learn estimators for mixed models; the only module that imports scikit-learn.

Data flows one way: validate and encode X, standardise, build the Keras model with
`build_mixed_model`, train it on the ELBO, then read the posteriors back on the data's scale.
"""

import math
import numbers
import time

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from reffects.exact_updates import refine_gaussian
from reffects.likelihoods import Gaussian, get_likelihood
from reffects.models import build_mixed_model, centre_random_intercepts
from reffects.training import predict_interval, sample_predictive

_MAX_BATCH_SIZE = 1024
_MIN_BATCHES_PER_EPOCH = 10
_TARGET_STEPS = 4000
_MAX_EPOCHS = 400
_MIN_EPOCHS = 10
_WARM_START_STEPS = 500
_STEPS_PER_EXECUTION = 32
_FAMILIES = ("gaussian", "binomial", "poisson")
_PREDICTIVE_DRAWS = 1000
_INITIAL_GROUP_SCALE = 0.5
_INITIAL_NOISE_SCALE = 0.7


def default_schedule(num_rows: int, exact_finish: bool = False) -> tuple[int, int]:
    """Batch size and epochs used when the user leaves them at None.

    Batches of at most 1024 rows, at least 10 per epoch; about 4,000 optimizer steps in all,
    but never fewer than 10 epochs (each group's offsets only move when its rows are drawn).
    With `exact_finish` (a linear Gaussian model with point-estimate scales, which the exact
    updates of `reffects.exact_updates` solve in full after SGD) SGD is only a warm start:
    about 500 steps, at least one epoch.

    Example:
        >>> default_schedule(100)
        (10, 400)
        >>> default_schedule(1_000_000, exact_finish=True)
        (1024, 1)
    """
    batch_size = max(1, min(_MAX_BATCH_SIZE, num_rows // _MIN_BATCHES_PER_EPOCH))
    steps_per_epoch = max(1, num_rows // batch_size)
    target, fewest = (_WARM_START_STEPS, 1) if exact_finish else (_TARGET_STEPS, _MIN_EPOCHS)
    epochs = min(_MAX_EPOCHS, max(fewest, math.ceil(target / steps_per_epoch)))
    return batch_size, epochs


def _shuffled_batches(inputs, y, sample_weight, batch_size, seed):
    """An endless tf.data stream of reshuffled passes over the rows, full batches only.

    Each pass is one permutation cut into `len(y) // batch_size` batches that are gathered
    in bulk. Returns the stream of `(inputs, y[, sample_weight])` and the batches per pass.
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


class _EncodedData:
    """Design pieces of X: standardised features and integer group codes per factor."""

    def __init__(self, features, codes):
        self.features = features
        self.codes = codes

    def model_inputs(self):
        inputs = list(self.codes)
        if self.features.shape[1]:
            inputs.insert(0, self.features)
        return inputs


class RandomEffectsRegressor(RegressorMixin, BaseEstimator):
    """A Bayesian (generalised) linear mixed model, or random-effects neural network.

        eta = alpha + sum_k b_k[group_k] + x . beta + f(x),     b_k ~ Normal(0, sigma_k)
        gaussian: y ~ Normal(eta, noise_scale)
        binomial: y = proportion of n trials, n y ~ Binomial(n, sigmoid(eta))
        poisson:  y ~ Poisson(exp(eta))
        alpha ~ Normal(0, prior_scale), beta ~ Normal(0, prior_scale)

    Fitted by variational inference on the ELBO through Keras `fit`. Features are
    standardised internally (so beta's prior is per standard deviation of its feature, and
    alpha's prior is on eta at the mean features); for "gaussian" y is standardised too,
    for the other families it is not, so `prior_scale` is on the logit or log scale, as in
    Statistical Rethinking's m13.2 (`prior_scale=1.5, scale_prior="exponential"`). Every
    estimate is reported on the data's scale (link scale for the other families).

    Parameters
    ----------
    group_cols : list of column names (DataFrame) or integer positions (ndarray)
        The grouping factors; every other column is a numeric fixed-effect feature.
        `()` leaves no grouping factor: a Bayesian linear regression.
    hidden_units : tuple of int
        `()` for a linear mixed model; e.g. `(32, 16)` adds a ReLU subnetwork f.
    family : "gaussian", "binomial" or "poisson"
        For "binomial", y is the proportion of successes and `sample_weight` the number of
        trials of each row (1 when none is given), as in R's `glm`.
    epochs, batch_size : int or None
        None chooses them from the data size (`default_schedule`).
    learning_rate : float
        Starting Adam learning rate; it decays to 1% of itself along a cosine.
    scale_prior : None, "exponential", "half_normal" or a ScalePrior
        None learns each sigma_k as a point estimate (empirical Bayes).
    prior_scale : float
        Standard deviation of the Normal priors of alpha and beta (see above).
    random_state : int or None
    verbose : int
        Passed to Keras's `fit`.

    Attributes
    ----------
    intercept_ : float
    coef_ : ndarray of shape (n_fixed_features,)
        Posterior means of the linear fixed effects, in the order of the non-group columns.
    variance_components_ : dict
        Group column -> sigma_k, the standard deviation of its offsets.
    random_effects_ : dict
        Group column -> DataFrame indexed by level with columns mean, sd, lower, upper, n.
    noise_scale_ : float, "gaussian" only
    feature_names_in_, n_features_in_ : as in scikit-learn
    model_ : the fitted `ELBOModel`
    history_ : dict of per-epoch `loss`, `nll` and `kl`
    fit_time_ : float, seconds

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = pd.DataFrame({"school": rng.choice(["a", "b", "c"], 300), "x": rng.normal(size=300)})
    >>> y = X["school"].map({"a": -1.0, "b": 0.0, "c": 1.0}) + 2 * X["x"] + rng.normal(size=300)
    >>> est = RandomEffectsRegressor(group_cols=["school"], epochs=20, random_state=0)
    >>> est.fit(X, y).predict(X).shape
    (300,)
    """

    def __init__(
        self,
        *,
        group_cols=None,
        hidden_units=(),
        family: str = "gaussian",
        epochs: int | None = None,
        batch_size: int | None = None,
        learning_rate: float = 0.01,
        scale_prior=None,
        prior_scale: float = 10.0,
        random_state: int | None = None,
        verbose: int = 0,
    ):
        self.group_cols = group_cols
        self.hidden_units = hidden_units
        self.family = family
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.scale_prior = scale_prior
        self.prior_scale = prior_scale
        self.random_state = random_state
        self.verbose = verbose

    # ----------------------------------------------------------------------- validation
    def _check_params(self):
        if self.family not in _FAMILIES:
            raise ValueError(
                f"`family` must be one of {', '.join(map(repr, _FAMILIES))}. "
                f"Received: family={self.family!r}"
            )
        if not (isinstance(self.prior_scale, numbers.Real) and self.prior_scale > 0):
            raise ValueError(
                f"`prior_scale` must be positive. Received: prior_scale={self.prior_scale!r}"
            )
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1
            ):
                raise ValueError(
                    f"`{name}` must be a positive integer or None. Received: {name}={value!r}"
                )
        if not (isinstance(self.learning_rate, numbers.Real) and self.learning_rate > 0):
            raise ValueError(
                f"`learning_rate` must be positive. Received: learning_rate={self.learning_rate!r}"
            )
        if any(
            not isinstance(u, numbers.Integral) or isinstance(u, bool) or u < 1
            for u in self.hidden_units
        ):
            raise ValueError(
                "`hidden_units` must be a tuple of positive integers. "
                f"Received: hidden_units={self.hidden_units!r}"
            )

    def _group_positions(self, X):
        if self.group_cols is None:
            raise ValueError(
                "`group_cols` must name the grouping columns (names for a DataFrame, "
                "positions for an ndarray; () fits a Bayesian linear regression). "
                "Received: group_cols=None"
            )
        cols = (
            [self.group_cols]
            if isinstance(self.group_cols, (str, numbers.Integral))
            else list(self.group_cols)
        )
        names = list(X.columns) if isinstance(X, pd.DataFrame) else None
        positions = []
        for col in cols:
            if names is not None and col in names:
                positions.append(names.index(col))
            elif isinstance(col, numbers.Integral) and not isinstance(col, bool):
                if not 0 <= col < X.shape[1]:
                    raise ValueError(
                        f"group column position {col} is out of range for X with "
                        f"{X.shape[1]} columns"
                    )
                positions.append(int(col))
            else:
                raise ValueError(
                    f"group column {col!r} is not in X; its columns are {names}"
                    if names is not None
                    else f"group column {col!r} must be an integer position for an ndarray X"
                )
        if len(set(positions)) != len(positions):
            raise ValueError(f"`group_cols` repeats a column: {cols!r}")
        return cols, positions

    def _split_columns(self, X, reset):
        """Validated (features as float64, list of group columns as object arrays)."""
        if isinstance(X, pd.DataFrame):
            frame = X
        else:
            array = np.asarray(X)
            if array.ndim != 2:
                raise ValueError(f"X must be 2-dimensional. Received shape {array.shape}")
            frame = pd.DataFrame(array)
        validate_data(
            self, frame, reset=reset, dtype=None, ensure_all_finite=False, skip_check_array=True
        )
        if frame.shape[0] == 0:
            raise ValueError("X has 0 rows; at least 1 is required.")
        cols, positions = self._group_positions(X if isinstance(X, pd.DataFrame) else frame)
        column_names = [str(c) for c in frame.columns]
        groups = []
        for col, pos in zip(cols, positions):
            values = frame.iloc[:, pos].to_numpy(dtype=object)
            missing = pd.isna(values)
            if missing.any():
                raise ValueError(
                    f"group column {col!r} has a missing value at row {int(np.argmax(missing))}"
                )
            groups.append(values)
        feature_positions = [i for i in range(frame.shape[1]) if i not in positions]
        if not feature_positions and not positions:
            raise ValueError("X has no columns; at least 1 is required.")
        features = np.empty((frame.shape[0], len(feature_positions)))
        for j, pos in enumerate(feature_positions):
            column = frame.iloc[:, pos]
            try:
                features[:, j] = pd.to_numeric(column, errors="raise").to_numpy(dtype=float)
            except (ValueError, TypeError) as error:
                raise ValueError(
                    f"feature column {column_names[pos]!r} is not numeric ({error}); "
                    "list it in `group_cols` if it is a grouping factor"
                ) from None
            bad = ~np.isfinite(features[:, j])
            if bad.any():
                raise ValueError(
                    f"feature column {column_names[pos]!r} contains NaN or infinity "
                    f"(first at row {int(np.argmax(bad))})"
                )
        return features, groups, cols

    @staticmethod
    def _check_target(y, num_rows):
        values = np.asarray(y)
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1:
            raise ValueError(f"y must be 1-dimensional. Received shape {values.shape}")
        if len(values) != num_rows:
            raise ValueError(f"X has {num_rows} rows but y has {len(values)}")
        try:
            values = values.astype("float64")
        except (ValueError, TypeError):
            raise ValueError("y must be numeric for RandomEffectsRegressor") from None
        bad = ~np.isfinite(values)
        if bad.any():
            raise ValueError(f"y contains NaN or infinity (first at row {int(np.argmax(bad))})")
        return values

    # ----------------------------------------------------------------------- encoding
    def _encode(self, X, reset):
        features, groups, cols = self._split_columns(X, reset)
        if reset:
            self._group_keys = cols
            self._levels = [pd.Index(pd.unique(pd.Series(values))) for values in groups]
            self._feature_mean = features.mean(axis=0)
            scale = features.std(axis=0)
            self._feature_scale = np.where(scale > 0, scale, 1.0)
        # Unseen labels map to the reserved last row: a new group, never trained.
        codes = [
            np.where((c := levels.get_indexer(values)) < 0, len(levels), c).astype("int64")
            for levels, values in zip(self._levels, groups)
        ]
        standardized = ((features - self._feature_mean) / self._feature_scale).astype("float32")
        return _EncodedData(standardized, codes)

    # ----------------------------------------------------------------------- fitting
    def fit(self, X, y, sample_weight=None):
        """Fits the model to X (group columns and numeric features) and y."""
        self._check_params()
        data = self._encode(X, reset=True)
        target = self._check_target(y, len(data.features))
        weights = None
        if sample_weight is not None:
            weights = np.asarray(sample_weight, dtype="float64").reshape(-1)
            if (
                len(weights) != len(target)
                or not np.all(np.isfinite(weights))
                or (weights < 0).any()
            ):
                raise ValueError(
                    "sample_weight must hold one finite, non-negative value per row of X"
                )
        if self.family == "gaussian":
            likelihood = Gaussian(initial_noise_scale=_INITIAL_NOISE_SCALE)
            self._y_mean = float(target.mean())
            y_scale = float(target.std())
            self._y_scale = y_scale if y_scale > 0 else 1.0
        else:
            likelihood = get_likelihood(self.family)
            target = likelihood.check_targets(target, weights)
            self._y_mean, self._y_scale = 0.0, 1.0
        model_y = ((target - self._y_mean) / self._y_scale).astype("float32")
        initial_mean, row_information = self._initial_mean(target, weights)

        num_rows = len(target)
        exact_finish = (
            self.family == "gaussian" and not self.hidden_units and self.scale_prior is None
        )
        batch_size, epochs = default_schedule(num_rows, exact_finish)
        batch_size = min(self.batch_size or batch_size, num_rows)
        epochs = self.epochs or epochs
        seed = (
            np.random.default_rng().integers(2**31 - 1)
            if self.random_state is None
            else self.random_state
        )
        self._seed = seed = int(seed)

        self.model_ = build_mixed_model(
            num_features=data.features.shape[1],
            num_groups=[len(levels) + 1 for levels in self._levels],
            hidden_units=tuple(self.hidden_units),
            likelihood=likelihood,
            intercept_init=float(likelihood.link(initial_mean)),
            prior_scale=self.prior_scale,
            scale_prior=self.scale_prior,
            initial_group_scale=_INITIAL_GROUP_SCALE,
            num_examples=num_rows,
            seed=seed,
        )
        self._initialise_offsets(data.codes, row_information)

        stream, steps = _shuffled_batches(
            data.model_inputs(),
            model_y,
            None if weights is None else weights.astype("float32"),
            batch_size,
            seed,
        )
        # Keras runs whole multiples of steps_per_execution per epoch, so an epoch here is
        # one pass rounded up to that multiple; the stream is endless, so nothing runs dry.
        steps_per_execution = min(steps, _STEPS_PER_EXECUTION)
        steps = math.ceil(steps / steps_per_execution) * steps_per_execution
        schedule = keras.optimizers.schedules.CosineDecay(
            self.learning_rate, decay_steps=epochs * steps, alpha=0.01
        )
        self.model_.compile(
            optimizer=keras.optimizers.Adam(schedule), steps_per_execution=steps_per_execution
        )
        start = time.perf_counter()
        history = self.model_.fit(
            stream, epochs=epochs, steps_per_epoch=steps, shuffle=False, verbose=self.verbose
        )
        if self.family == "gaussian":
            network = self.model_.network
            refine_gaussian(
                self.model_,
                data.model_inputs(),
                model_y,
                {
                    network.get_layer(f"random_intercept_{k}"): codes
                    for k, codes in enumerate(data.codes)
                },
                sample_weight=weights,
                intercept=network.get_layer("global_intercept"),
                fixed_effects=network.get_layer("fixed_effects") if data.features.size else None,
                features=data.features,
            )
        else:
            centre_random_intercepts(self.model_)
        self.fit_time_ = time.perf_counter() - start
        self.history_ = history.history
        self._read_posteriors()
        return self

    def _initial_mean(self, target, weights):
        """The starting response mean (the intercept starts at its link) and the Fisher
        information about eta of each row there, on the model's scale."""
        weights = np.ones(len(target)) if weights is None else weights
        if self.family == "gaussian":
            return 0.0, weights / _INITIAL_NOISE_SCALE**2
        mean = float(np.sum(weights * target) / max(np.sum(weights), 1e-12))
        if self.family == "binomial":
            mean = min(max(mean, 1e-3), 1.0 - 1e-3)
            return mean, weights * mean * (1.0 - mean)
        mean = max(mean, 1e-3)
        return mean, weights * mean

    def _initialise_offsets(self, codes, row_information):
        """Starts each group's posterior sd at its Laplace value at the starting point."""
        for k, group_codes in enumerate(codes):
            layer = self.model_.network.get_layer(f"random_intercept_{k}")
            layer.adapt(group_codes)
            information = np.bincount(
                group_codes, weights=row_information, minlength=layer.num_groups
            )
            sd = 1.0 / np.sqrt(information + 1.0 / _INITIAL_GROUP_SCALE**2)
            raw = sd + np.log(-np.expm1(-sd))  # inverse softplus
            layer.offset_untransformed_scale.assign(raw[:, None].astype("float32"))

    def _data_scale(self):
        """The affine map from the model's standardised parameters to the data's scale.

        Returns `(shift, matrix, response_scale)`: `[intercept_, *coef_]` is
        `shift + matrix @ [alpha, *beta]` for the model's global intercept alpha and fixed
        effects beta, and each group offset, sigma_k and the noise scale is `response_scale`
        times the model's. `reffects.inspection` maps posterior sds and draws with it too.
        """
        ratio = self._y_scale / self._feature_scale
        matrix = np.zeros((ratio.size + 1, ratio.size + 1))
        matrix[0, 0] = self._y_scale
        matrix[0, 1:] = -ratio * self._feature_mean
        matrix[1:, 1:] = np.diag(ratio)
        shift = np.zeros(ratio.size + 1)
        shift[0] = self._y_mean
        return shift, matrix, self._y_scale

    def _read_posteriors(self):
        network = self.model_.network
        shift, matrix, response_scale = self._data_scale()
        alpha = network.get_layer("global_intercept").intercept_loc.numpy()
        if self._feature_mean.size:
            beta = network.get_layer("fixed_effects").kernel_loc.numpy()[:, 0]
        else:
            beta = np.zeros(0)
        fixed = shift + matrix @ np.concatenate([alpha, beta]).astype("float64")
        self.intercept_, self.coef_ = float(fixed[0]), fixed[1:]
        if self.family == "gaussian":
            self.noise_scale_ = response_scale * float(self.model_.likelihood.noise_scale())
        self.variance_components_ = {}
        self.random_effects_ = {}
        for k, (col, levels) in enumerate(zip(self._group_keys, self._levels)):
            layer = network.get_layer(f"random_intercept_{k}")
            self.variance_components_[col] = response_scale * float(layer.group_scale()[0])
            table = layer.posterior_summary().iloc[: len(levels)].copy()
            for column in ("mean", "sd", "lower", "upper"):
                table[column] *= response_scale
            table.index = levels.rename(col)
            self.random_effects_[col] = table

    # ----------------------------------------------------------------------- prediction
    def predict(self, X, return_std: bool = False, trials=None):
        """Predictions at the posterior means; with `return_std`, also the predictive sd.

        The prediction is the response mean at the posterior means of the parameters (a
        probability for "binomial", a rate for "poisson"). The sd is that of a new y: exact
        for "gaussian", from 1,000 posterior draws (seeded by `random_state`) otherwise, as
        sqrt(E[Var(y | mean)] + Var(mean)); for "binomial" y is a proportion of `trials`
        (one number per row, default 1). Unseen group labels are new groups: offset 0 in the
        prediction, the prior Normal(0, sigma_k) in the sd.
        """
        check_is_fitted(self, "model_")
        data = self._encode(X, reset=False)
        mean = self.model_.predict(data.model_inputs(), batch_size=8192, verbose=0)[:, 0].astype(
            "float64"
        )
        mean = self._y_mean + self._y_scale * mean
        if not return_std:
            return mean
        if self.family == "gaussian":
            return mean, self._y_scale * np.sqrt(self._predictive_variance(data))
        draws = sample_predictive(
            self.model_, data.model_inputs(), _PREDICTIVE_DRAWS, seed=self._seed
        )["mean"][..., 0].astype("float64")
        trials = self._check_trials(trials, len(mean))
        variance = np.mean(self.model_.likelihood.variance(draws, trials), axis=0)
        return mean, np.sqrt(variance + np.var(draws, axis=0))

    def predict_interval(self, X, level: float = 0.9, *, num_samples: int = 1000, trials=None):
        """Central posterior predictive intervals of y: `(lower, upper)`, each of shape (n,).

        Drawn with `reffects.training.predict_interval` (seeded by `random_state`): they
        include the posterior uncertainty of every parameter and, for unseen group labels,
        the prior Normal(0, sigma_k) of a new group's offset. For "binomial", y is a
        proportion of `trials` (one number per row, default 1).

        Example:
            >>> rng = np.random.default_rng(0)
            >>> X = pd.DataFrame({"g": rng.choice(["a", "b"], 200), "x": rng.normal(size=200)})
            >>> y = rng.poisson(np.exp(1 + 0.5 * X["x"]))
            >>> est = RandomEffectsRegressor(group_cols=["g"], family="poisson", epochs=20)
            >>> lower, upper = est.fit(X, y).predict_interval(X, level=0.9)
            >>> bool(np.all(lower <= upper))
            True
        """
        check_is_fitted(self, "model_")
        data = self._encode(X, reset=False)
        trials = self._check_trials(trials, len(data.features))
        lower, upper = predict_interval(
            self.model_,
            data.model_inputs(),
            level,
            num_samples,
            trials=trials,
            seed=self._seed,
        )
        return (
            self._y_mean + self._y_scale * lower[:, 0].astype("float64"),
            self._y_mean + self._y_scale * upper[:, 0].astype("float64"),
        )

    def _check_trials(self, trials, num_rows):
        if trials is None:
            return None
        if self.family != "binomial":
            raise ValueError(f"`trials` applies to family='binomial' only; family={self.family!r}")
        trials = np.asarray(trials, dtype="float64").reshape(-1)
        if len(trials) != num_rows:
            raise ValueError(f"X has {num_rows} rows but trials has {len(trials)}")
        self.model_.likelihood.check_targets(np.zeros(num_rows), trials)
        return trials

    def _fixed_part_variance(self, data):
        """Posterior variance of alpha + x . beta per row, on the standardised scale."""
        network = self.model_.network
        intercept_sd = network.get_layer("global_intercept").posterior().scale.numpy()[0]
        variance = np.full(len(data.features), float(intercept_sd) ** 2)
        if data.features.shape[1]:
            kernel_sd = network.get_layer("fixed_effects").posterior().scale.numpy()[:, 0]
            variance += np.square(data.features) @ np.square(kernel_sd)
        return variance

    def _predictive_variance(self, data):
        """Var(y_new) on the standardised scale: q's variance of eta plus the noise."""
        network = self.model_.network
        variance = self._fixed_part_variance(data)
        variance += float(self.model_.likelihood.noise_scale()) ** 2
        for k, group_codes in enumerate(data.codes):
            offset = network.get_layer(f"random_intercept_{k}").posterior()["offset"]
            variance += offset.scale.numpy()[group_codes, 0] ** 2
        return variance

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.string = True
        tags.input_tags.categorical = True
        return tags
