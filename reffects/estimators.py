"""scikit-learn estimators for mixed models; the only module that imports scikit-learn.

Data flows one way: validate and encode X, standardise, build the Keras model with
`build_mixed_model`, train it on the ELBO, then read the posteriors back on the data's scale.
"""

import math
import numbers
import time
import warnings

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from scipy import sparse, stats
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from reffects.finish import finish_gaussian, finish_glmm
from reffects.layers import RandomIntercept
from reffects.likelihoods import Bernoulli, Gaussian, Poisson, get_likelihood
from reffects.models import build_mixed_model, mixed_model_layers
from reffects.optimizers import LazyAdam
from reffects.posteriors import inverse_softplus
from reffects.training import StopOnNonFiniteLoss, check_finite_parameters, predict_means

_MAX_BATCH_SIZE = 1024
_MAX_SUBNETWORK_BATCH_SIZE = 256
_MIN_BATCHES_PER_EPOCH = 10
_TARGET_STEPS = 4000
_MAX_EPOCHS = 400
_MIN_EPOCHS = 10
_WARM_START_STEPS = 100
_STEPS_PER_EXECUTION = 32
_FEW_STEPS = 1000
_FAMILIES = ("gaussian", "binomial", "poisson")
_PREDICTIVE_DRAWS = 1000
_INITIAL_GROUP_SCALE = 0.5
_PROBE_ROWS = 4096  # rows on which a subnetwork fit is checked to have improved
_ROWS_PER_DRAW_CHUNK = 2_000_000  # rows x draws per chunk of predictive draws
_INITIAL_NOISE_SCALE = 0.7
_FLOAT32_MAX = float(np.finfo("float32").max)
"""The model computes in float32: values it is given must stay below this."""
_UNSEEN_WARNING_SHARE = 0.5
"""Warn when more than this share of a factor's labels at predict were not seen in fit."""


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


_SHARED_PARAMETERS = """
    group_cols : list of column names (DataFrame) or integer positions (ndarray)
        The grouping factors; every other column is a numeric fixed-effect feature.
        `()` leaves no grouping factor (a Bayesian generalised linear model).
    random_slopes : dict or None
        Group column -> list of feature columns whose slopes vary by that factor's groups,
        as lme4's `(1 + x | g)`: `{"Subject": ["Days"]}`. The columns stay fixed effects
        too; the factor's intercept and slopes get one covariance matrix (see
        `correlated_slopes`). None: a random intercept per factor only.
    correlated_slopes : bool
        True: each factor's intercept and slopes are correlated (lme4's `|`); False:
        independent (lme4's `||`, on the features' own origin).
    hidden_units : tuple of int
        `()` for a linear mixed model; e.g. `(32, 16)` adds a ReLU subnetwork f.
    subnetwork_cols : list of column names or positions, or None
        The feature columns f sees, given as `group_cols` are; None: every non-group column.
        x . beta always sees every non-group column. `subnetwork_cols`, `dropout` and
        `l2_regularization` are ignored when `hidden_units=()` (so one grid can search
        both), though still checked (`subnetwork_cols` against X).
    dropout : float in [0, 1)
        Dropout rate after each hidden layer of f (in training only).
    l2_regularization : float >= 0
        L2 penalty on the weights of f (not the biases), scaled as MLPRegressor's `alpha`
        (here `alpha` is the global intercept): `0.5 * l2_regularization * ||W||^2 /
        n_samples` is added to the loss per row, a Normal(0, l2_regularization**-0.5) prior
        on each weight. For "gaussian" the loss is on standardised y over the noise variance
        s^2, so it acts as MLPRegressor(alpha=l2_regularization * s^2) on standardised y.
    epochs, batch_size : int or None
        None chooses them from the data size (`default_schedule`).
    learning_rate : float
        Starting Adam learning rate; it decays to 1% of itself along a cosine.
    scale_prior : None, "exponential", "half_normal" or a ScalePrior
        None learns each sigma_k as a point estimate (empirical Bayes).
    prior_scale : float
        Standard deviation of the Normal priors of alpha and beta (features are
        standardised, so beta's prior is per standard deviation of its feature).
    early_stopping : bool
        Hold out `validation_fraction` of the rows and stop when the validation loss has not
        improved for `n_iter_no_change` epochs, keeping the best weights.
    validation_fraction : float in (0, 1)
    n_iter_no_change : int
    random_state : int or None
        Seeds the initial weights, the shuffling, the training noise and the predictive
        draws; fits with the same value agree to float32 round-off.
    verbose : int
        Passed to Keras's `fit` (0 silent, 1 progress bar, 2 one line per epoch).
"""

_SHARED_ATTRIBUTES = """
    intercept_ : float
    coef_ : ndarray of shape (n_fixed_features,)
        Posterior means of the linear fixed effects, in the order of the non-group columns.
    variance_components_ : dict
        Group column -> sigma_k, the standard deviation of its offsets (of its random
        intercept, with random slopes).
    random_effects_covariance_ : dict
        Group column -> DataFrame whose index and columns are `["(Intercept)", *slope
        columns]`, the covariance of each group's coefficients (1 x 1 without slopes).
    random_effects_ : dict
        Group column -> DataFrame indexed by level with columns mean, sd, lower, upper (the
        intercept offset's), then `mean_<col>`, `sd_<col>`, `lower_<col>`, `upper_<col>` per
        slope column, and n.
    feature_names_in_, n_features_in_ : as in scikit-learn
    model_ : the fitted `ELBOModel`
    history_ : dict of per-epoch `loss`, `nll` and `kl` (and `val_*` with early stopping)
    fit_time_ : float, seconds
"""


class _MixedModelEstimator(BaseEstimator):
    """What the regressor and the classifier share: validation, encoding, fitting, reading.

    Subclasses choose the likelihood and how y is put on the model's scale
    (`_model_target`); everything else is here.
    """

    # ----------------------------------------------------------------------- validation
    def _check_params(self):
        if not (isinstance(self.prior_scale, numbers.Real) and self.prior_scale > 0):
            raise ValueError(
                f"`prior_scale` must be positive. Received: prior_scale={self.prior_scale!r}"
            )
        for name in ("epochs", "batch_size", "n_iter_no_change"):
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
        if not (
            isinstance(self.validation_fraction, numbers.Real) and 0 < self.validation_fraction < 1
        ):
            raise ValueError(
                "`validation_fraction` must be in (0, 1). "
                f"Received: validation_fraction={self.validation_fraction!r}"
            )
        self._hidden_layers()
        if not isinstance(self.correlated_slopes, (bool, np.bool_)):
            raise ValueError(
                "`correlated_slopes` must be True or False. "
                f"Received: correlated_slopes={self.correlated_slopes!r}"
            )
        if self.random_slopes and self.scale_prior is not None:
            raise ValueError(
                "`scale_prior` applies to random intercepts; with `random_slopes` each "
                "factor's covariance is a point estimate (lme4's). Received: "
                f"scale_prior={self.scale_prior!r}, random_slopes={self.random_slopes!r}"
            )
        self._seed = self._random_seed()

    def _hidden_layers(self) -> tuple:
        """`hidden_units` as a tuple of layer widths; an int is one layer, as in MLPRegressor."""
        units = self.hidden_units
        if _is_positive_int(units):
            return (int(units),)
        if (
            isinstance(units, (str, bytes, dict))
            or not np.iterable(units)
            or not all(_is_positive_int(u) for u in units)
        ):
            raise ValueError(
                "`hidden_units` must be a positive integer or a tuple of positive integers "
                f"(() for no subnetwork). Received: hidden_units={units!r}"
            )
        return tuple(int(u) for u in units)

    def _random_seed(self) -> int:
        """The one int seed of a fit, from `random_state` (None, an int or a RandomState).

        An int is used as it is; a RandomState gives one draw (advancing it, as scikit-learn
        estimators do); None a fresh random seed.
        """
        state = self.random_state
        if state is None:
            return int(np.random.default_rng().integers(2**31 - 1))
        if isinstance(state, numbers.Integral) and not isinstance(state, bool):
            if not 0 <= state < 2**32:
                raise ValueError(
                    "`random_state` must be None, an integer in [0, 2**32 - 1] or a "
                    f"numpy.random.RandomState. Received: random_state={state!r}"
                )
            return int(state)
        if isinstance(state, np.random.RandomState):
            return int(state.randint(2**31 - 1))
        raise ValueError(
            "`random_state` must be None, an integer in [0, 2**32 - 1] or a "
            f"numpy.random.RandomState. Received: random_state={state!r}"
        )

    def _group_positions(self, X):
        if self.group_cols is None:
            raise ValueError(
                "`group_cols` must name the grouping columns (names for a DataFrame, "
                "positions for an ndarray; () fits a Bayesian linear regression). "
                "Received: group_cols=None"
            )
        cols = _as_column_list(self.group_cols)
        return cols, _column_positions(X, cols, "group")

    def _subnetwork_positions(self, X, group_positions, feature_positions):
        """Positions in the feature matrix of `subnetwork_cols` (None: every feature)."""
        if self.subnetwork_cols is None:
            return None
        cols = _as_column_list(self.subnetwork_cols)
        if not cols:
            raise ValueError(
                "`subnetwork_cols` must list at least one feature column, or be None for "
                f"all of them. Received: subnetwork_cols={self.subnetwork_cols!r}"
            )
        positions = _column_positions(X, cols, "subnetwork")
        for col, pos in zip(cols, positions):
            if pos in group_positions:
                raise ValueError(
                    f"subnetwork column {col!r} is a group column; `subnetwork_cols` lists "
                    "numeric feature columns, which must not be in `group_cols`"
                )
        return [feature_positions.index(pos) for pos in positions]

    def _slope_positions(self, X, cols, group_positions, feature_positions):
        """Per grouping factor, the positions in the feature matrix of its random slopes'
        columns (None for a random intercept alone)."""
        slopes = self.random_slopes
        if slopes is None:
            return [None] * len(cols)
        if not isinstance(slopes, dict):
            raise ValueError(
                "`random_slopes` must be a dict mapping group columns to lists of feature "
                f"columns, e.g. {{'Subject': ['Days']}}. Received: random_slopes={slopes!r}"
            )
        unknown = [key for key in slopes if key not in cols]
        if unknown:
            raise ValueError(
                f"`random_slopes` names {unknown[0]!r}, which is not in `group_cols` "
                f"({cols}); its keys are grouping columns"
            )
        result = []
        for col in cols:
            slope_cols = _as_column_list(slopes.get(col, []))
            if not slope_cols:
                result.append(None)
                continue
            if len(set(map(str, slope_cols))) != len(slope_cols):
                raise ValueError(f"`random_slopes[{col!r}]` lists a column twice: {slope_cols}")
            positions = _column_positions(X, slope_cols, "random slope")
            for slope_col, pos in zip(slope_cols, positions):
                if pos in group_positions:
                    raise ValueError(
                        f"random slope column {slope_col!r} of {col!r} is a group column; "
                        "slopes vary on numeric feature columns"
                    )
            result.append([feature_positions.index(pos) for pos in positions])
        return result

    @staticmethod
    def _as_frame(X):
        """X as a DataFrame, after the checks scikit-learn users expect of any estimator."""
        if sparse.issparse(X):
            raise TypeError(
                "sparse input is not supported: X holds group labels and numeric features; "
                "pass a dense array or DataFrame (X.toarray())"
            )
        if isinstance(X, pd.DataFrame):
            frame = X
        else:
            array = np.asarray(X)
            if array.ndim != 2:
                raise ValueError(
                    f"Expected a 2D X, got shape {array.shape} instead. Reshape your data "
                    "with X.reshape(-1, 1) if it has a single column."
                )
            frame = pd.DataFrame(array)
        if any(np.iscomplexobj(frame[c].to_numpy()) for c in frame.columns):
            raise ValueError("Complex data not supported")
        num_rows, num_columns = frame.shape
        if num_rows == 0:
            raise ValueError(
                f"Found array with 0 sample(s) (shape=({num_rows}, {num_columns})) while a "
                "minimum of 1 is required."
            )
        if num_columns == 0:
            raise ValueError(
                f"Found array with 0 feature(s) (shape=({num_rows}, 0)) while a minimum of 1 "
                "is required."
            )
        return frame

    def _align_columns(self, frame, reset):
        """The columns of `frame` in fit's order, found by name as in fit.

        Group columns are found by name and the features are the other columns in order, so
        a DataFrame whose columns come in another order than in fit is put back in fit's
        order. (scikit-learn already rejects reordered string names; this covers other
        labels, such as integers.) A frame with default labels 0..n-1, as an ndarray gets,
        is taken by position; other labels must be the ones seen in fit.
        """
        labels = list(frame.columns)
        if reset:
            self._fit_columns = labels
            return frame
        fitted = getattr(self, "_fit_columns", None)
        if fitted is None or labels == fitted or labels == list(range(len(labels))):
            return frame
        if fitted == list(range(len(fitted))) or len(set(fitted)) != len(fitted):
            return frame  # fitted on positions (an ndarray) or repeated names: by position
        if len(set(labels)) == len(labels) and set(labels) == set(fitted):
            return frame[fitted]
        missing = [c for c in fitted if c not in labels]
        unexpected = [c for c in labels if c not in fitted]
        raise ValueError(
            f"X's columns differ from those seen in fit: missing {missing}, unexpected "
            f"{unexpected}; pass the columns of fit ({fitted}), in any order"
        )

    def _split_columns(self, X, reset):
        """Validated (features as float64, group columns' labels, group keys, and
        the positions in the features of the subnetwork's columns)."""
        frame = self._as_frame(X)
        validate_data(
            self, frame, reset=reset, dtype=None, ensure_all_finite=False, skip_check_array=True
        )
        frame = self._align_columns(frame, reset)
        cols, positions = self._group_positions(frame)
        groups = []
        for col, pos in zip(cols, positions):
            values = _group_labels(frame.iloc[:, pos])
            # Missing values first: comparing pd.NA with anything is an error of its own.
            missing = pd.isna(values)
            if missing.any():
                raise ValueError(
                    f"group column {col!r} has a missing value at row {int(np.argmax(missing))} "
                    "(NaN, None or NA); every row needs a group label"
                )
            infinite = np.isin(values, [np.inf, -np.inf])
            if infinite.any():
                raise ValueError(
                    f"group column {col!r} holds infinity at row {int(np.argmax(infinite))}; "
                    "every row needs a finite group label"
                )
            groups.append(values)
        names = [str(c) for c in frame.columns]
        feature_positions = [i for i in range(frame.shape[1]) if i not in positions]
        if reset:
            self._feature_labels = [names[pos] for pos in feature_positions]
        subnetwork_features = self._subnetwork_positions(frame, positions, feature_positions)
        slopes = self._slope_positions(frame, cols, positions, feature_positions)
        features = np.empty((frame.shape[0], len(feature_positions)))
        for j, pos in enumerate(feature_positions):
            column = frame.iloc[:, pos]
            try:
                features[:, j] = column.to_numpy(dtype="float64")
            except (ValueError, TypeError) as error:
                missing = np.asarray(pd.isna(column))
                if missing.any():
                    raise ValueError(
                        f"feature column {names[pos]!r} has a missing value at row "
                        f"{int(np.argmax(missing))} (NaN, None or NA)"
                    ) from None
                raise type(error)(
                    f"feature column {names[pos]!r} is not numeric ({error}); "
                    "list it in `group_cols` if it is a grouping factor"
                ) from None
            bad = ~np.isfinite(features[:, j])
            if bad.any():
                raise ValueError(
                    f"feature column {names[pos]!r} contains NaN or infinity "
                    f"(first at row {int(np.argmax(bad))})"
                )
        return features, groups, cols, subnetwork_features, slopes

    @staticmethod
    def _check_sample_weight(sample_weight, num_rows):
        if sample_weight is None:
            return None
        given = np.asarray(sample_weight)
        try:
            weights = given.astype("float64")
        except (ValueError, TypeError):
            missing = np.asarray(pd.isna(given))
            if missing.any():
                raise ValueError(
                    "`sample_weight` has a missing value at row "
                    f"{int(np.argmax(missing.reshape(-1)))}"
                ) from None
            raise ValueError(
                "`sample_weight` must hold numbers (frequency weights, >= 0). Received "
                f"dtype {given.dtype}: sample_weight[:3]={given.reshape(-1)[:3].tolist()!r}"
            ) from None
        if weights.ndim != 1 or len(weights) != num_rows:
            raise ValueError(
                f"sample_weight must have shape ({num_rows},); got shape {weights.shape}"
            )
        bad = ~np.isfinite(weights) | (weights < 0)
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(
                "sample_weight must hold finite, non-negative values; got "
                f"sample_weight={weights[row]:g} at row {row}"
            )
        if weights.max() > _FLOAT32_MAX:
            raise ValueError(
                f"sample_weight reaches {weights.max():g}, beyond the largest float32 "
                f"({_FLOAT32_MAX:.4g}) the model computes in; rescale the weights"
            )
        if not weights.any():
            raise ValueError("sample_weight is zero for every row; nothing to fit")
        return weights

    # ----------------------------------------------------------------------- encoding
    def _encode(self, X, reset):
        features, groups, cols, subnetwork_features, slopes = self._split_columns(X, reset)
        # `features` is this method's own copy, standardised in place.
        if reset:
            self._group_keys = cols
            self._subnetwork_features = subnetwork_features
            self._random_slopes = slopes
            self._levels = [_group_levels(col, values) for col, values in zip(cols, groups)]
            self._feature_mean, self._feature_scale = _standardise(
                features, self._feature_labels, "feature column"
            )
        else:
            features -= self._feature_mean
            features /= self._feature_scale
        model_features = features.astype("float32")
        too_large = ~np.isfinite(model_features)
        if too_large.any():
            row, j = np.argwhere(too_large)[0]
            raise ValueError(
                f"feature column {self._feature_labels[j]!r} at row {row} is "
                f"{features[row, j]:.3g} standard deviations from its mean in fit, beyond "
                f"the largest float32 ({_FLOAT32_MAX:.4g}) the model computes in; "
                "rescale the column"
            )
        # Unseen labels map to the reserved last row: a new group, never trained.
        codes = [
            _group_codes(col, levels, values, warn_unseen=not reset)
            for col, levels, values in zip(cols, self._levels, groups)
        ]
        return _EncodedData(model_features, codes)

    # ----------------------------------------------------------------------- fitting
    def _fit(self, X, y, sample_weight, callbacks):
        """Validates, encodes, builds and trains the model; `y` is already 1-d."""
        start = time.perf_counter()
        self._check_params()
        validation = None
        if self.early_stopping:
            X, y, sample_weight, validation = self._hold_out(X, y, sample_weight)
        data = self._encode(X, reset=True)
        weights = self._check_sample_weight(sample_weight, len(data.features))
        likelihood, model_y = self._model_target(y, weights)
        initial_mean, row_information = self._initial_mean(likelihood, model_y, weights)

        num_rows = len(model_y)
        # The finish solves a linear predictor's model in full, except q(sigma_k) of a
        # Gaussian model with a hyperprior, which only SGD fits.
        exact_finish = not self.hidden_units and (
            not isinstance(likelihood, Gaussian) or self.scale_prior is None
        )
        batch_size, epochs = default_schedule(num_rows, exact_finish, bool(self.hidden_units))
        batch_size = min(self.batch_size or batch_size, num_rows)
        epochs = self.epochs or epochs
        seed = self._seed  # set by _check_params from random_state

        self.model_ = build_mixed_model(
            num_features=data.features.shape[1],
            num_groups=[len(levels) + 1 for levels in self._levels],
            hidden_units=self._hidden_layers(),
            subnetwork_features=self._subnetwork_features,
            dropout=self.dropout,
            l2_regularization=self.l2_regularization,
            likelihood=likelihood,
            intercept_init=float(likelihood.link(initial_mean)),
            prior_scale=self.prior_scale,
            scale_prior=self.scale_prior,
            initial_group_scale=_INITIAL_GROUP_SCALE,
            num_examples=num_rows,
            seed=seed,
            random_slopes=self._random_slopes,
            correlated_slopes=bool(self.correlated_slopes),
            slope_shifts=self._slope_shifts(),
        )
        self._initialise_offsets(data.codes, row_information)
        # Without a subnetwork the finish solves the model in full from any start (lme4's
        # REML, glmer's Laplace fit), so SGD runs only when asked for (`epochs` or
        # `early_stopping`); it costs seconds of Keras start-up and changes no estimate.
        history = {}
        if not exact_finish or self.epochs is not None or self.early_stopping:
            history = self._train(
                data, model_y, weights, likelihood, batch_size, epochs, callbacks, validation
            )
        layers = mixed_model_layers(self.model_)
        finish = finish_gaussian if isinstance(likelihood, Gaussian) else finish_glmm
        options = {"reml": self.reml} if isinstance(likelihood, Gaussian) else {}
        self.joint_posterior_ = finish(
            self.model_,
            layers.intercept,
            list(zip(layers.factors, data.codes, self._slope_inputs(data))),
            layers.fixed_effects,
            data.features,
            y=model_y,
            # Without a subnetwork the predictor is the sum of the finished terms.
            held=self._subnetwork_part(data) if self.hidden_units else 0.0,
            sample_weight=weights,
            **options,
        )
        self.fit_time_ = time.perf_counter() - start
        self.history_ = history
        self._read_posteriors()
        return self

    def _train(self, data, model_y, weights, likelihood, batch_size, epochs, callbacks, validation):
        """SGD on the ELBO through Keras `fit`; returns its history."""
        seed = self._seed
        stream, steps = _shuffled_batches(
            data.model_inputs(),
            model_y,
            None if weights is None else weights.astype("float32"),
            batch_size,
            seed,
        )
        # Keras runs whole multiples of steps_per_execution per epoch, so an epoch here is
        # one pass rounded up to that multiple; the stream is endless, so nothing runs dry.
        # Its multi-step loop traces the training step a second time (about a second), more
        # than one call per step costs over a short warm start.
        steps_per_execution = (
            1 if epochs * steps <= _FEW_STEPS else min(steps, _STEPS_PER_EXECUTION)
        )
        steps = math.ceil(steps / steps_per_execution) * steps_per_execution
        schedule = keras.optimizers.schedules.CosineDecay(
            self.learning_rate, decay_steps=epochs * steps, alpha=0.01
        )
        self.model_.compile(optimizer=LazyAdam(schedule), steps_per_execution=steps_per_execution)
        callbacks = list(callbacks or [])
        validation_data = None
        if validation is not None:
            validation_data = self._validation_data(likelihood, *validation)
            callbacks.append(
                keras.callbacks.EarlyStopping(
                    patience=self.n_iter_no_change, restore_best_weights=True
                )
            )
        probe = self._probe(data, model_y, weights) if self.hidden_units else None
        history = self.model_.fit(
            stream,
            epochs=epochs,
            steps_per_epoch=steps,
            validation_data=validation_data,
            callbacks=callbacks,
            shuffle=False,
            verbose=self.verbose,
        )
        if probe is not None:
            self._check_training_helped(*probe)
        return history.history

    def _fit_checked(self, X, y, sample_weight, callbacks):
        """`_fit`, stopping SGD when its loss is not finite, and raising when it diverged.

        An error after a diverged SGD (the finish on NaN weights) is reported as the
        divergence it comes from.
        """
        callbacks = [*(callbacks or []), self._divergence_callback()]
        try:
            self._fit(X, y, sample_weight, callbacks)
        except Exception as error:
            self._raise_if_diverged(cause=error)
            raise
        self._check_finite_estimates()
        return self

    def _divergence_callback(self):
        """A fresh `StopOnNonFiniteLoss` for this fit (`_raise_if_diverged` reads it)."""
        self._divergence = StopOnNonFiniteLoss()
        return self._divergence

    def _raise_if_diverged(self, cause=None):
        """After Keras's `fit`: a `ValueError` if the loss became NaN or infinite."""
        # Popped: a callback holds the Keras model and has no place in a pickled estimator.
        divergence = self.__dict__.pop("_divergence", None)
        message = divergence.message(self.learning_rate) if divergence else None
        if message:
            raise ValueError(message) from cause

    def _check_finite_estimates(self):
        """After the finish: a `ValueError` naming the first estimate that is not finite."""
        self._raise_if_diverged()
        estimates = {"intercept_": self.intercept_, "coef_": self.coef_}
        if hasattr(self, "noise_scale_"):
            estimates["noise_scale_"] = self.noise_scale_
        for col, sigma in self.variance_components_.items():
            estimates[f"variance_components_[{col!r}]"] = sigma
        for col, table in self.random_effects_.items():
            for column in table.select_dtypes("number").columns:
                estimates[f"random_effects_[{col!r}][{column!r}]"] = table[column].to_numpy()
        for name, value in estimates.items():
            values = np.asarray(value, dtype="float64")
            if not np.all(np.isfinite(values)):
                first = values.reshape(-1)[~np.isfinite(values.reshape(-1))][0]
                raise ValueError(
                    f"training diverged: the estimate {name} is {first} after the fit; lower "
                    f"`learning_rate` (got {self.learning_rate}), and check that y and the "
                    "features are finite and on a moderate scale"
                )

    def _hold_out(self, X, y, sample_weight):
        """Splits off `validation_fraction` of the rows at random (seeded)."""
        num_rows = len(y)
        num_valid = int(round(self.validation_fraction * num_rows))
        if num_valid < 1 or num_valid >= num_rows:
            raise ValueError(
                f"validation_fraction={self.validation_fraction} leaves no training or no "
                f"validation rows out of {num_rows}"
            )
        # `_seed` is the fit's one seed, set by `_check_params` from `random_state`.
        order = np.random.default_rng(self._seed).permutation(num_rows)
        train, valid = np.sort(order[num_valid:]), np.sort(order[:num_valid])

        def rows(values, index):
            if values is None:
                return None
            if isinstance(values, (pd.DataFrame, pd.Series)):
                return values.iloc[index]
            return np.asarray(values)[index]

        validation = (rows(X, valid), rows(y, valid), rows(sample_weight, valid))
        return rows(X, train), rows(y, train), rows(sample_weight, train), validation

    def _validation_data(self, likelihood, X, y, sample_weight):
        data = self._encode(X, reset=False)
        target = likelihood.check_targets(np.asarray(y, dtype="float64"), sample_weight)
        model_y = ((target - self._y_mean) / self._y_scale).astype("float32")
        if sample_weight is None:
            return data.model_inputs(), model_y
        return data.model_inputs(), model_y, np.asarray(sample_weight, dtype="float32")

    @staticmethod
    def _initial_mean(likelihood, model_y, weights):
        """The starting response mean (the intercept starts at its link) and the Fisher
        information about eta of each row there, on the model's scale."""
        weights = np.ones(len(model_y)) if weights is None else weights
        if isinstance(likelihood, Gaussian):
            return 0.0, weights / _INITIAL_NOISE_SCALE**2
        mean = float(np.sum(weights * model_y) / max(np.sum(weights), 1e-12))
        if isinstance(likelihood, Poisson):
            mean = max(mean, 1e-3)
            return mean, weights * mean
        mean = min(max(mean, 1e-3), 1.0 - 1e-3)
        return mean, weights * mean * (1.0 - mean)

    def _initialise_offsets(self, codes, row_information):
        """Starts each group's posterior sd at its Laplace value at the starting point."""
        for k, group_codes in enumerate(codes):
            layer = mixed_model_layers(self.model_).factors[k]
            layer.adapt(group_codes)
            if self._random_slopes[k]:
                continue  # a RandomEffects layer keeps its own starting q
            information = np.bincount(
                group_codes, weights=row_information, minlength=layer.num_groups
            )
            sd = 1.0 / np.sqrt(information + 1.0 / _INITIAL_GROUP_SCALE**2)
            layer.offset_untransformed_scale.assign(inverse_softplus(sd)[:, None].astype("float32"))

    def _slope_shifts(self):
        """Per factor, what the slope inputs add to the standardised features: nothing when
        the terms are correlated (the fit does not depend on the origin), the features'
        mean over sd when they are independent, so that independence holds at the data's
        own origin, as lme4's `||` means it."""
        shifts = []
        for positions in self._random_slopes:
            if not positions or self.correlated_slopes:
                shifts.append(None)
                continue
            shifts.append(list(self._feature_mean[positions] / self._feature_scale[positions]))
        return shifts

    def _slope_inputs(self, data):
        """Per factor, its rows' slope covariates on the model's scale, or None."""
        inputs = []
        for positions, shift in zip(self._random_slopes, self._slope_shifts()):
            if not positions:
                inputs.append(None)
                continue
            z = data.features[:, positions].astype("float64")
            inputs.append(z if shift is None else z + np.asarray(shift))
        return inputs

    def _factor_terms(self, data):
        """Per factor, its rows' term vectors `[1, z]` (None for a random intercept)."""
        return [
            None if z is None else np.column_stack([np.ones(len(z)), z])
            for z in self._slope_inputs(data)
        ]

    def _term_scale(self, k):
        """The map A from factor k's coefficients on the model's scale to the data's, less
        the response scale: a group's `[intercept, *slopes]` on the data's scale is
        `response_scale * A` times the model's."""
        positions = self._random_slopes[k] or []
        matrix = np.eye(1 + len(positions))
        if positions:
            scale = self._feature_scale[positions]
            matrix[1:, 1:] = np.diag(1.0 / scale)
            if self.correlated_slopes:  # centred slopes move the intercept
                matrix[0, 1:] = -self._feature_mean[positions] / scale
        return matrix

    # ----------------------------------------------------------------------- reading
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
        layers = mixed_model_layers(self.model_)
        shift, matrix, response_scale = self._data_scale()
        alpha = layers.intercept.intercept_loc.numpy()
        if layers.fixed_effects is not None:
            beta = layers.fixed_effects.kernel_loc.numpy()[:, 0]
        else:
            beta = np.zeros(0)
        fixed = shift + matrix @ np.concatenate([alpha, beta]).astype("float64")
        self.intercept_, self.coef_ = float(fixed[0]), fixed[1:]
        if isinstance(self.model_.likelihood, Gaussian):
            self.noise_scale_ = response_scale * float(self.model_.likelihood.noise_scale())
        self.variance_components_ = {}
        self.random_effects_covariance_ = {}
        self.random_effects_ = {}
        for k, (col, levels) in enumerate(zip(self._group_keys, self._levels)):
            layer = layers.factors[k]
            slope_names = [self._feature_labels[j] for j in self._random_slopes[k] or []]
            names = ["(Intercept)", *slope_names]
            matrix = self._term_scale(k)  # the data's scale is response_scale times it
            posterior = layer.posterior()["offset"]
            loc = keras.ops.convert_to_numpy(posterior.mean()).astype("float64")[: len(levels)]
            if isinstance(layer, RandomIntercept):
                covariance = np.square(keras.ops.convert_to_numpy(posterior.stddev()))
                sigma = keras.ops.convert_to_numpy(layer.group_scale()).reshape(1, 1)
                group_covariance = sigma**2
            else:
                covariance = keras.ops.convert_to_numpy(posterior.covariance())
                group_covariance = keras.ops.convert_to_numpy(layer.covariance())
            covariance = covariance.astype("float64").reshape(-1, len(names), len(names))
            covariance = covariance[: len(levels)]
            group_covariance = matrix @ group_covariance.astype("float64") @ matrix.T
            with np.errstate(over="ignore"):  # y on a scale near 1e200: the variances overflow
                self.random_effects_covariance_[col] = pd.DataFrame(
                    group_covariance * response_scale * response_scale, index=names, columns=names
                )
            self.variance_components_[col] = response_scale * float(np.sqrt(group_covariance[0, 0]))
            mean = response_scale * (loc.reshape(len(levels), -1) @ matrix.T)
            sd = response_scale * np.sqrt(np.einsum("ij,gjk,ik->gi", matrix, covariance, matrix))
            counts = keras.ops.convert_to_numpy(layer.group_counts).astype("int64")
            self.random_effects_[col] = _effects_table(col, levels, names, mean, sd, counts)

    def _probe(self, data, model_y, weights):
        """Up to 4,096 training rows and the mean NLL of the untrained model on them."""
        rows = slice(0, _PROBE_ROWS)
        probe = (
            [values[rows] for values in data.model_inputs()],
            model_y[rows],
            None if weights is None else weights[rows],
        )
        return probe, self._mean_nll(*probe)

    def _mean_nll(self, inputs, y, weights):
        eta = keras.ops.convert_to_tensor(predict_means(self.model_.network, inputs)[:, None])
        mean = self.model_.likelihood.call(keras.ops.cast(eta, "float32"))
        sample_weight = None if weights is None else weights.astype("float32")[:, None]
        nll = self.model_.likelihood.mean_nll(y[:, None], mean, sample_weight)
        return float(keras.ops.convert_to_numpy(nll))

    def _check_training_helped(self, probe, before):
        """A subnetwork that SGD blew up without a NaN (a learning rate too high) is an error;
        the finish holds it and cannot repair it. A blow-up moves the mean NLL by orders of
        magnitude; a few noisy steps of an honest fit can raise it by a fraction, which the
        finish repairs, so only a rise of more than max(1, |before|) nats counts."""
        after = self._mean_nll(*probe)
        if not after <= before + max(1.0, abs(before)):
            raise ValueError(
                f"training diverged: the mean negative log-likelihood of the first "
                f"{len(probe[1])} training rows rose from {before:.4g} before training to "
                f"{after:.4g} after it; lower `learning_rate` (got {self.learning_rate})"
            )

    def _subnetwork_part(self, data):
        """The subnetwork's output per row (the predictor less its linear part), on the
        model's scale, at the current posterior means."""
        layers = mixed_model_layers(self.model_)
        linear = float(layers.intercept.intercept_loc.numpy()[0])
        if layers.fixed_effects is not None:
            kernel = layers.fixed_effects.kernel_loc.numpy()[:, 0]
            linear = linear + data.features.astype("float64") @ kernel
        for k, (codes, terms) in enumerate(zip(data.codes, self._factor_terms(data))):
            offsets = keras.ops.convert_to_numpy(layers.factors[k].posterior()["offset"].mean())
            offsets = offsets.reshape(len(offsets), -1)[codes]
            linear = linear + (offsets[:, 0] if terms is None else np.sum(offsets * terms, axis=1))
        return predict_means(self.model_.network, data.model_inputs()) - linear

    def _posterior_mean_response(self, data):
        """The response mean at the posterior means, on the model's scale.

        The inverse link is applied in float64 to the network's float32 predictor, so a
        row's value does not depend on where it sits in the batch (vectorised float32
        exp/sigmoid kernels can differ in the last bit between positions).
        """
        eta = keras.ops.convert_to_tensor(predict_means(self.model_.network, data.model_inputs()))
        return keras.ops.convert_to_numpy(self.model_.likelihood.call(eta)).astype("float64")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.string = True
        tags.input_tags.categorical = True
        tags.non_deterministic = self.random_state is None
        return tags


def _effects_table(col, levels, names, mean, sd, counts) -> pd.DataFrame:
    """`random_effects_[col]`: per level, the intercept offset's mean, sd and 95% interval,
    the same for each slope (`mean_<name>`, ...), and the training count n."""
    half_width = stats.norm.ppf(0.975) * sd
    table = pd.DataFrame(index=levels.rename(col))
    for j, name in enumerate(names):
        suffix = "" if j == 0 else f"_{name}"
        table[f"mean{suffix}"] = mean[:, j]
        table[f"sd{suffix}"] = sd[:, j]
        table[f"lower{suffix}"] = mean[:, j] - half_width[:, j]
        table[f"upper{suffix}"] = mean[:, j] + half_width[:, j]
    table["n"] = counts[: len(levels)]
    return table


def _is_positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _as_column_list(cols) -> list:
    return [cols] if isinstance(cols, (str, numbers.Integral)) else list(cols)


def _column_positions(X, cols, kind) -> list:
    """Positions in the DataFrame X of `cols`: names, or integer positions if not names."""
    names = list(X.columns)
    positions = []
    for col in cols:
        if col in names:
            positions.append(names.index(col))
        elif isinstance(col, numbers.Integral) and not isinstance(col, bool):
            if not 0 <= col < X.shape[1]:
                raise ValueError(
                    f"{kind} column position {col} is out of range for X with {X.shape[1]} columns"
                )
            positions.append(int(col))
        else:
            raise ValueError(f"{kind} column {col!r} is not in X; its columns are {names}")
    if len(set(positions)) != len(positions):
        raise ValueError(f"`{kind}_cols` repeats a column: {cols!r}")
    return positions


def _group_labels(column: pd.Series) -> np.ndarray:
    """A group column's labels: its own array when numeric (fast to hash), else objects."""
    values = column.to_numpy()
    return values if values.dtype.kind in "iufb" else column.to_numpy(dtype=object)


def _standardise(values: np.ndarray, labels, kind: str):
    """Centres and scales the float64 columns of `values` in place; returns (mean, scale).

    Stable for any spread around any mean (1000 + 1e-7 z) and any magnitude (1e200 z,
    1e-200 z): a column is constant only when all its values are equal (it becomes exact
    zeros, scale 1); the mean is corrected by the mean of the column centred at it (what
    rounding left); the sd is taken after centring, of the column divided by its largest
    |value|, whose squares neither overflow nor underflow. The columns are then centred
    and scaled by the returned mean and scale, exactly as `predict` does. A column whose
    centred values float64 cannot hold is an error naming it (`labels[j]`, a `kind` such
    as "feature column").
    """
    num_rows = len(values)
    ones = np.ones(num_rows)
    highest, lowest = values.max(axis=0), values.min(axis=0)
    constant = highest == lowest
    with np.errstate(over="ignore", invalid="ignore"):
        mean = ones @ values / num_rows  # BLAS: several times faster than `mean(axis=0)`
        for j in np.flatnonzero(~np.isfinite(mean)):  # the sum overflowed
            peak = max(abs(highest[j]), abs(lowest[j]))
            mean[j] = peak * np.mean(values[:, j] / peak)
        mean = np.where(constant, lowest, mean + ones @ (values - mean) / num_rows)
        peak = np.maximum(highest - mean, mean - lowest)  # largest |centred value|
    bad = ~(np.isfinite(mean) & np.isfinite(peak))
    if bad.any():
        j = int(np.argmax(bad))
        raise ValueError(
            f"{kind} {labels[j]!r} is too large to centre in float64 (values from "
            f"{lowest[j]:.3g} to {highest[j]:.3g}; their differences must stay below "
            f"{np.finfo('float64').max:.3g}); rescale it"
        )
    values -= mean
    peak = np.where(constant, 1.0, peak)
    normalised = values / peak
    np.square(normalised, out=normalised)
    scale = np.where(constant, 1.0, peak * np.sqrt(ones @ normalised / num_rows))
    values /= scale
    return mean, scale


def _unhashable_label_error(col, values) -> ValueError:
    for row, value in enumerate(values):
        try:
            hash(value)
        except TypeError:
            return ValueError(
                f"group column {col!r} holds an unhashable label at row {row} "
                f"({type(value).__name__} {value!r}); group labels must be scalars such as "
                "strings or integers"
            )
    return ValueError(f"group column {col!r} holds labels that cannot be compared")


def _group_levels(col, values) -> pd.Index:
    """The distinct labels of a group column, in order of first appearance."""
    try:
        return pd.Index(pd.unique(pd.Series(values)))
    except TypeError:
        raise _unhashable_label_error(col, values) from None


def _group_codes(col, levels: pd.Index, values, warn_unseen: bool) -> np.ndarray:
    """Each row's position in `levels`; unseen labels get `len(levels)` (a new group).

    With `warn_unseen`, warns when most rows' labels are unseen and they look like the
    seen ones in another type (3 in fit, "3" now) or are of another kind altogether
    (numbers in fit, strings now): then they are probably not new groups.
    """
    try:
        codes = levels.get_indexer(values)
    except TypeError:
        raise _unhashable_label_error(col, values) from None
    unseen = codes < 0
    if warn_unseen and len(levels) and unseen.mean() > _UNSEEN_WARNING_SHARE:
        _warn_if_label_types_differ(col, levels, pd.unique(pd.Series(values[unseen])), unseen)
    return np.where(unseen, len(levels), codes).astype("int64")


def _label_kind(labels) -> str:
    kind = pd.api.types.infer_dtype(labels, skipna=True)
    if kind in ("integer", "floating", "mixed-integer-float", "decimal", "boolean"):
        return "number"
    if kind in ("string", "bytes"):
        return "string"
    return kind


def _warn_if_label_types_differ(col, levels, new_labels, unseen):
    sample = new_labels[:1000]
    seen_text = {str(label) for label in levels[:100_000]}
    looks_seen = any(str(label) in seen_text for label in sample)
    if not looks_seen and _label_kind(levels) == _label_kind(sample):
        return  # new groups of the same kind: what GroupKFold gives, nothing to warn about
    warnings.warn(
        f"{unseen.mean():.0%} of the rows of group column {col!r} have labels not seen in fit "
        f"(e.g. {sample[0]!r} of type {type(sample[0]).__name__}; fit saw labels such as "
        f"{levels[0]!r} of type {type(levels[0]).__name__}). They are predicted as new "
        "groups (offset 0); check that the labels have the same type as in fit.",
        UserWarning,
        stacklevel=6,  # the caller of predict (through _encode)
    )


class RandomEffectsRegressor(RegressorMixin, _MixedModelEstimator):
    __doc__ = (
        """A Bayesian (generalised) linear mixed model, or random-effects neural network.

        eta = alpha + sum_k b_k[group_k] + x . beta + f(x),     b_k ~ Normal(0, sigma_k)
        gaussian: y ~ Normal(eta, noise_scale)
        binomial: y = proportion of n trials, n y ~ Binomial(n, sigmoid(eta))
        poisson:  y ~ Poisson(exp(eta))
        alpha ~ Normal(0, prior_scale), beta ~ Normal(0, prior_scale)

    Fitted by variational inference on the ELBO through Keras `fit`, which ends with an
    exact finish of everything but a subnetwork: for "gaussian", lme4's REML estimates
    of the scales (ML with `reml=False`; a factor's sigma_k under a `scale_prior` stays
    SGD's) and the exact joint posterior of the intercept, fixed effects and every offset
    (`reffects.finish`, kept as `joint_posterior_`); for the other families, glmer's
    Laplace estimates and the Laplace joint posterior at the mode. Features are
    standardised internally; for "gaussian" y is standardised too; for the other
    families y is not, so `prior_scale` is on the logit or log scale, as in Statistical
    Rethinking's m13.2 (`prior_scale=1.5, scale_prior="exponential"`). Every estimate is
    reported on the data's scale (the link scale for the other families).

    Parameters
    ----------
    family : "gaussian", "binomial" or "poisson"
        For "binomial", y is the proportion of successes and `sample_weight` the number of
        trials of each row (1 when none is given), as in R's `glm`.
    reml : bool
        "gaussian" only: the scales sigma_k and the noise scale by REML (lme4's default);
        False: by maximum likelihood (lme4's `REML = FALSE`)."""
        + _SHARED_PARAMETERS
        + """
    Attributes
    ----------"""
        + _SHARED_ATTRIBUTES
        + """    noise_scale_ : float, "gaussian" only

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = pd.DataFrame({"school": rng.choice(["a", "b", "c"], 300), "x": rng.normal(size=300)})
    >>> y = X["school"].map({"a": -1.0, "b": 0.0, "c": 1.0}) + 2 * X["x"] + rng.normal(size=300)
    >>> est = RandomEffectsRegressor(group_cols=["school"], random_state=0).fit(X, y)
    >>> bool(abs(est.coef_[0] - 2.0) < 0.2)
    True
    >>> mean, sd = est.predict(X.head(2), return_std=True)

    A subnetwork on some of the features; every feature stays in the linear term:

    >>> X_more = X.assign(z=rng.normal(size=300))
    >>> deep = RandomEffectsRegressor(
    ...     group_cols=["school"], hidden_units=(8,), subnetwork_cols=["z"], dropout=0.1, epochs=5
    ... ).fit(X_more, y)
    >>> deep.coef_.shape, deep.model_.network.get_layer("subnetwork_features").indices
    ((2,), [1])
    """
    )

    def __init__(
        self,
        *,
        group_cols=None,
        random_slopes=None,
        correlated_slopes: bool = True,
        hidden_units=(),
        subnetwork_cols=None,
        dropout: float = 0.0,
        l2_regularization: float = 0.0,
        family: str = "gaussian",
        reml: bool = True,
        epochs: int | None = None,
        batch_size: int | None = None,
        learning_rate: float = 0.01,
        scale_prior=None,
        prior_scale: float = 10.0,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        random_state: int | None = None,
        verbose: int = 0,
    ):
        self.group_cols = group_cols
        self.random_slopes = random_slopes
        self.correlated_slopes = correlated_slopes
        self.hidden_units = hidden_units
        self.subnetwork_cols = subnetwork_cols
        self.dropout = dropout
        self.l2_regularization = l2_regularization
        self.family = family
        self.reml = reml
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.scale_prior = scale_prior
        self.prior_scale = prior_scale
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.random_state = random_state
        self.verbose = verbose

    def fit(self, X, y, sample_weight=None, *, callbacks=None):
        """Fits the model to X (group columns and numeric features) and y.

        Parameters
        ----------
        X : DataFrame or array of shape (n_samples, n_columns)
        y : array of shape (n_samples,)
        sample_weight : array of shape (n_samples,) or None
            Frequency weights: a row of weight w counts as w identical rows, so the total
            weight is how much data the priors are weighed against. Weights that sum to 1
            make the whole data worth one row, and the priors dominate; for relative
            weights, rescale them to sum to the number of rows. For family="binomial", the
            number of trials of each row instead (1 when None).
        callbacks : list of Keras callbacks, passed on to Keras's `fit`

        Raises a `ValueError` when training diverges (the loss becomes NaN or infinite,
        which stops it, or an estimate is not finite): lower `learning_rate`.
        """
        if self.family not in _FAMILIES:
            raise ValueError(
                f"`family` must be one of {', '.join(map(repr, _FAMILIES))}. "
                f"Received: family={self.family!r}"
            )
        if not isinstance(self.reml, (bool, np.bool_)):
            raise ValueError(f"`reml` must be True or False. Received: reml={self.reml!r}")
        X = self._as_frame(X)
        return self._fit_checked(X, _target_vector(self, y, X), sample_weight, callbacks)

    def _model_target(self, y, weights):
        """The likelihood and y on the model's scale (standardised for "gaussian")."""
        try:
            target = np.asarray(y, dtype="float64")
        except (ValueError, TypeError):
            raise ValueError("y must be numeric for RandomEffectsRegressor") from None
        bad = ~np.isfinite(target)
        if bad.any():
            raise ValueError(f"y contains NaN or infinity (first at row {int(np.argmax(bad))})")
        if self.family == "gaussian":
            likelihood = Gaussian(initial_noise_scale=_INITIAL_NOISE_SCALE)
            # Stable for any magnitude (y * 1e200 included): centred, then scaled (1 for a
            # constant y); the model sees the standardised y, the estimates are mapped back.
            standardised = target[:, None].copy()
            mean, scale = _standardise(standardised, ["y"], "target")
            self._y_mean, self._y_scale = float(mean[0]), float(scale[0])
            return likelihood, standardised[:, 0].astype("float32")
        likelihood = get_likelihood(self.family)
        target = likelihood.check_targets(target, weights)
        if np.abs(target).max() > _FLOAT32_MAX:
            raise ValueError(
                f"y reaches {np.abs(target).max():.3g}, beyond the largest float32 "
                f"({_FLOAT32_MAX:.4g}) the model computes in for family={self.family!r}"
            )
        self._y_mean, self._y_scale = 0.0, 1.0
        return likelihood, target.astype("float32")

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
        trials = self._check_trials(trials, len(data.features))
        mean = self._y_mean + self._y_scale * self._posterior_mean_response(data)
        if not return_std:
            return mean
        if self.family == "gaussian":
            return mean, self._y_scale * np.sqrt(self._predictive_variance(data))
        sd = np.empty(len(mean))
        for rows, means, _ in self._predictive_draws(data, _PREDICTIVE_DRAWS, trials):
            noise = np.mean(self.model_.likelihood.variance(means, _rows(trials, rows)), axis=0)
            sd[rows] = np.sqrt(noise + np.var(means, axis=0))
        return mean, sd

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
        if not 0.0 < level < 1.0:
            raise ValueError(f"`level` must be in (0, 1). Received: level={level}")
        tail = (1.0 - level) / 2.0
        lower, upper = np.empty(len(data.features)), np.empty(len(data.features))
        for rows, _, y in self._predictive_draws(data, num_samples, trials):
            # inverted CDF: bounds are values y can take, holding at least `level`
            bounds = np.quantile(y, [tail, 1.0 - tail], axis=0, method="inverted_cdf")
            lower[rows], upper[rows] = bounds
        return self._y_mean + self._y_scale * lower, self._y_mean + self._y_scale * upper

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

    def _predictive_variance(self, data):
        """Var(y_new) on the standardised scale: the joint posterior's variance of the
        linear predictor (its correlations included) plus the noise."""
        design = np.column_stack([np.ones(len(data.features)), data.features])
        variance = self.joint_posterior_.predictor_variance(
            design, data.codes, self._factor_terms(data)
        )
        return variance + float(self.model_.likelihood.noise_scale()) ** 2

    def _predictive_draws(self, data, num_samples, trials=None):
        """Posterior predictive draws, by chunks of rows: `(rows, means, ys)`, the draws of
        the response mean and of y on the model's scale, each `(num_samples, len(rows))`.

        The linear predictor is drawn from the joint posterior (rows of one group share its
        offset, and every correlation is kept), a subnetwork adds its fixed output, and y
        is drawn from the likelihood (seeded by `random_state`).
        """
        check_finite_parameters(self.model_)  # a NaN rate would hang a Poisson sampler
        rng = np.random.default_rng(self._seed)
        design = np.column_stack([np.ones(len(data.features)), data.features])
        subnetwork = self._subnetwork_part(data) if self.hidden_units else None
        likelihood = self.model_.likelihood
        terms = self._factor_terms(data)
        rows_per_chunk = max(1, _ROWS_PER_DRAW_CHUNK // num_samples)
        for start in range(0, len(design), rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            eta = self.joint_posterior_.sample_predictor(
                design[rows],
                [c[rows] for c in data.codes],
                num_samples,
                rng,
                [None if t is None else t[rows] for t in terms],
            )
            if subnetwork is not None:
                eta += subnetwork[rows]
            if isinstance(likelihood, Gaussian):
                means = eta
                y = eta + float(likelihood.noise_scale()) * rng.standard_normal(eta.shape)
            elif isinstance(likelihood, Poisson):
                means = np.exp(np.minimum(eta, 700.0))
                y = rng.poisson(means).astype("float64")
            else:
                means = expit(eta)
                chunk_trials = _rows(trials, rows)
                n = np.ones(eta.shape[1]) if chunk_trials is None else chunk_trials
                y = rng.binomial(n.astype("int64"), means) / np.maximum(n, 1.0)
            yield rows, means, y


def _rows(values, rows):
    return None if values is None else values[rows]


class RandomEffectsClassifier(ClassifierMixin, _MixedModelEstimator):
    __doc__ = (
        """A Bayesian logistic mixed model, or random-effects neural network, for two classes.

        logit P(y = classes_[1]) = alpha + sum_k b_k[group_k] + x . beta + f(x)
        b_k ~ Normal(0, sigma_k),   alpha ~ Normal(0, prior_scale),   beta ~ Normal(0, prior_scale)

    Fitted by variational inference on the ELBO through Keras `fit` with a Bernoulli
    likelihood, ending with glmer's Laplace fit of everything but a subnetwork and its
    joint posterior (`reffects.finish`, kept as `joint_posterior_`). Labels may be any two
    values (strings too); more than two classes is an error. Estimates are on the logit scale.

    Parameters
    ----------"""
        + _SHARED_PARAMETERS
        + """
    Attributes
    ----------
    classes_ : ndarray of the two labels, sorted"""
        + _SHARED_ATTRIBUTES
        + """
    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = pd.DataFrame({"clinic": rng.choice(["a", "b", "c"], 400), "x": rng.normal(size=400)})
    >>> logit = X["clinic"].map({"a": -1.0, "b": 0.0, "c": 1.0}) + 2 * X["x"]
    >>> y = np.where(rng.random(400) < 1 / (1 + np.exp(-logit)), "sick", "well")
    >>> clf = RandomEffectsClassifier(group_cols=["clinic"], random_state=0).fit(X, y)
    >>> clf.classes_.tolist(), clf.predict_proba(X.head(2)).shape
    (['sick', 'well'], (2, 2))
    """
    )

    def __init__(
        self,
        *,
        group_cols=None,
        random_slopes=None,
        correlated_slopes: bool = True,
        hidden_units=(),
        subnetwork_cols=None,
        dropout: float = 0.0,
        l2_regularization: float = 0.0,
        epochs: int | None = None,
        batch_size: int | None = None,
        learning_rate: float = 0.01,
        scale_prior=None,
        prior_scale: float = 10.0,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        random_state: int | None = None,
        verbose: int = 0,
    ):
        self.group_cols = group_cols
        self.random_slopes = random_slopes
        self.correlated_slopes = correlated_slopes
        self.hidden_units = hidden_units
        self.subnetwork_cols = subnetwork_cols
        self.dropout = dropout
        self.l2_regularization = l2_regularization
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.scale_prior = scale_prior
        self.prior_scale = prior_scale
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.random_state = random_state
        self.verbose = verbose

    def fit(self, X, y, sample_weight=None, *, callbacks=None):
        """Fits the model to X (group columns and numeric features) and labels y.

        Parameters
        ----------
        X : DataFrame or array of shape (n_samples, n_columns)
        y : array of shape (n_samples,), two distinct labels
        sample_weight : array of shape (n_samples,) or None
            Frequency weights: a row of weight w counts as w identical rows, so the total
            weight is how much data the priors are weighed against. Weights that sum to 1
            make the whole data worth one row, and the priors dominate; for relative
            weights, rescale them to sum to the number of rows.
        callbacks : list of Keras callbacks, passed on to Keras's `fit`

        Raises a `ValueError` when training diverges (the loss becomes NaN or infinite,
        which stops it, or an estimate is not finite): lower `learning_rate`.
        """
        X = self._as_frame(X)
        y = _target_vector(self, y, X)
        check_classification_targets(y)
        classes = np.unique(y)
        if len(classes) != 2:
            kind = f"{len(classes)} classes" if len(classes) > 2 else "only 1 class"
            raise ValueError(
                "Only binary classification is supported: RandomEffectsClassifier is a "
                f"Bernoulli model and needs exactly 2 classes in y; got {kind}: "
                f"{classes.tolist()[:10]}"
            )
        self.classes_ = classes
        return self._fit_checked(X, y, sample_weight, callbacks)

    def _model_target(self, y, weights):
        self._y_mean, self._y_scale = 0.0, 1.0
        return Bernoulli(), (np.asarray(y) == self.classes_[1]).astype("float32")

    def predict_proba(self, X):
        """Class probabilities at the posterior means: shape (n, 2), columns `classes_`."""
        check_is_fitted(self, "model_")
        p = self._posterior_mean_response(self._encode(X, reset=False))
        return np.column_stack([1.0 - p, p])

    def decision_function(self, X):
        """The logit of P(y = classes_[1]) at the posterior means, shape (n,)."""
        check_is_fitted(self, "model_")
        return predict_means(self.model_.network, self._encode(X, reset=False).model_inputs())

    def predict(self, X):
        """The more probable class of each row."""
        check_is_fitted(self, "model_")
        return self.classes_[(self.decision_function(X) > 0).astype(int)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags


def _target_vector(estimator, y, X):
    """y as a 1-d array with one entry per row of X, as scikit-learn checks it."""
    if y is None:
        raise ValueError(
            f"{type(estimator).__name__} requires y to be passed, but the target y is None"
        )
    y = column_or_1d(np.asarray(y), warn=True)
    if len(y) != len(X):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
    if y.dtype == object:  # None or pd.NA; numeric NaN is reported by each estimator
        missing = np.asarray(pd.isna(y))
        if missing.any():
            raise ValueError(f"y has a missing value at row {int(np.argmax(missing))}")
    return y
