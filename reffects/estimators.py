"""scikit-learn estimators for mixed models; the only module that imports scikit-learn.

Data flows one way: check X (`reffects.checks`), encode it (`reffects.encoding`), build the
Keras model and train it on the ELBO (`reffects.training_recipe`), finish the linear part
exactly (`reffects.finish`), then read the posteriors back on the data's scale (here).
"""

import time

import keras
import numpy as np
import pandas as pd
from scipy import stats
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from reffects.checks import (
    FLOAT32_MAX,
    align_columns,
    as_frame,
    check_params,
    check_sample_weight,
    hidden_layers,
    split_columns,
)
from reffects.encoding import (
    DataScale,
    EncodedData,
    factor_term_scale,
    factor_terms,
    group_codes,
    group_levels,
    model_features,
    slope_inputs,
    slope_shifts,
    standardise,
)
from reffects.finish import finish_gaussian, finish_glmm
from reffects.layers import RandomIntercept
from reffects.likelihoods import Bernoulli, Gaussian, Poisson, get_likelihood
from reffects.models import mixed_model_layers
from reffects.training import StopOnNonFiniteLoss, check_finite_parameters, predict_means
from reffects.training_recipe import (
    INITIAL_NOISE_SCALE,
    build_starting_model,
    check_finite_estimates,
    default_schedule,
    hold_out,
    raise_if_diverged,
    run_sgd,
)

_FAMILIES = ("gaussian", "binomial", "poisson")
_PREDICTIVE_DRAWS = 1000
_ROWS_PER_DRAW_CHUNK = 2_000_000  # rows x draws per chunk of predictive draws

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
    """What the regressor and the classifier share: encoding X, fitting, reading.

    Subclasses choose the likelihood and how y is put on the model's scale
    (`_model_target`); everything else is here, built on `reffects.checks`,
    `reffects.encoding`, `reffects.training_recipe` and `reffects.finish`.
    """

    # ----------------------------------------------------------------------- encoding
    def _split_columns(self, X, reset):
        """X's checked `SplitColumns`, its columns in fit's order (found by name)."""
        frame = as_frame(X)
        validate_data(
            self, frame, reset=reset, dtype=None, ensure_all_finite=False, skip_check_array=True
        )
        if reset:
            self._fit_columns = list(frame.columns)
        else:
            frame = align_columns(frame, getattr(self, "_fit_columns", None))
        columns = split_columns(frame, self.group_cols, self.subnetwork_cols, self.random_slopes)
        if reset:
            self._feature_labels = columns.feature_labels
        return columns

    def _encode(self, X, reset):
        columns = self._split_columns(X, reset)
        features, cols, groups = columns.features, columns.group_cols, columns.groups
        # `features` is this method's own copy, standardised in place.
        if reset:
            self._group_keys = cols
            self._subnetwork_features = columns.subnetwork_features
            self._random_slopes = columns.random_slopes
            self._levels = [group_levels(col, values) for col, values in zip(cols, groups)]
            self._feature_mean, self._feature_scale = standardise(
                features, self._feature_labels, "feature column"
            )
        else:
            features -= self._feature_mean
            features /= self._feature_scale
        float32_features = model_features(features, self._feature_labels)
        # Unseen labels map to the reserved last row: a new group, never trained.
        codes = [
            group_codes(col, levels, values, warn_unseen=not reset)
            for col, levels, values in zip(cols, self._levels, groups)
        ]
        return EncodedData(float32_features, codes)

    def _slope_shifts(self):
        """Per factor, what its slope inputs add to the standardised features."""
        return slope_shifts(
            self._random_slopes, self.correlated_slopes, self._feature_mean, self._feature_scale
        )

    def _slope_inputs(self, data):
        """Per factor, its rows' slope covariates on the model's scale, or None."""
        return slope_inputs(data.features, self._random_slopes, self._slope_shifts())

    def _factor_terms(self, data):
        """Per factor, its rows' term vectors `[1, z]` (None for a random intercept)."""
        return factor_terms(self._slope_inputs(data))

    # ----------------------------------------------------------------------- fitting
    def _fit(self, X, y, sample_weight, callbacks):
        """Validates, encodes, builds and trains the model; `y` is already 1-d."""
        start = time.perf_counter()
        self._seed = check_params(self)  # the fit's one seed, from random_state
        validation = None
        if self.early_stopping:
            X, y, sample_weight, validation = hold_out(
                X, y, sample_weight, self.validation_fraction, self._seed
            )
        data = self._encode(X, reset=True)
        weights = check_sample_weight(sample_weight, len(data.features))
        likelihood, model_y = self._model_target(y, weights)

        num_rows = len(model_y)
        # The finish solves a linear predictor's model in full, except q(sigma_k) of a
        # Gaussian model with a hyperprior, which only SGD fits.
        exact_finish = not self.hidden_units and (
            not isinstance(likelihood, Gaussian) or self.scale_prior is None
        )
        batch_size, epochs = default_schedule(num_rows, exact_finish, bool(self.hidden_units))
        batch_size = min(self.batch_size or batch_size, num_rows)
        epochs = self.epochs or epochs

        self.model_ = build_starting_model(
            likelihood,
            data,
            model_y,
            weights,
            random_slopes=self._random_slopes,
            num_groups=[len(levels) + 1 for levels in self._levels],
            hidden_units=hidden_layers(self.hidden_units),
            subnetwork_features=self._subnetwork_features,
            dropout=self.dropout,
            l2_regularization=self.l2_regularization,
            prior_scale=self.prior_scale,
            scale_prior=self.scale_prior,
            seed=self._seed,
            correlated_slopes=bool(self.correlated_slopes),
            slope_shifts=self._slope_shifts(),
        )
        # Without a subnetwork the finish solves the model in full from any start (lme4's
        # REML, glmer's Laplace fit), so SGD runs only when asked for (`epochs` or
        # `early_stopping`); it costs seconds of Keras start-up and changes no estimate.
        history = {}
        if not exact_finish or self.epochs is not None or self.early_stopping:
            history = run_sgd(
                self.model_,
                data.model_inputs(),
                model_y,
                weights,
                batch_size=batch_size,
                epochs=epochs,
                learning_rate=self.learning_rate,
                seed=self._seed,
                callbacks=callbacks,
                validation_data=(
                    None if validation is None else self._validation_data(likelihood, *validation)
                ),
                n_iter_no_change=self.n_iter_no_change,
                verbose=self.verbose,
                check_subnetwork=bool(self.hidden_units),
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

    def _fit_checked(self, X, y, sample_weight, callbacks):
        """`_fit`, stopping SGD when its loss is not finite, and raising when it diverged.

        An error after a diverged SGD (the finish on NaN weights) is reported as the
        divergence it comes from.
        """
        divergence = StopOnNonFiniteLoss()
        try:
            self._fit(X, y, sample_weight, [*(callbacks or []), divergence])
        except Exception as error:
            raise_if_diverged(divergence, self.learning_rate, cause=error)
            raise
        raise_if_diverged(divergence, self.learning_rate)
        estimates = {"intercept_": self.intercept_, "coef_": self.coef_}
        if hasattr(self, "noise_scale_"):
            estimates["noise_scale_"] = self.noise_scale_
        for col, sigma in self.variance_components_.items():
            estimates[f"variance_components_[{col!r}]"] = sigma
        for col, table in self.random_effects_.items():
            for column in table.select_dtypes("number").columns:
                estimates[f"random_effects_[{col!r}][{column!r}]"] = table[column].to_numpy()
        check_finite_estimates(estimates, self.learning_rate)
        return self

    def _validation_data(self, likelihood, X, y, sample_weight):
        """Keras's `validation_data` from the held-out rows, encoded as in fit."""
        data = self._encode(X, reset=False)
        target = likelihood.check_targets(np.asarray(y, dtype="float64"), sample_weight)
        model_y = ((target - self._y_mean) / self._y_scale).astype("float32")
        if sample_weight is None:
            return data.model_inputs(), model_y
        return data.model_inputs(), model_y, np.asarray(sample_weight, dtype="float32")

    # ----------------------------------------------------------------------- reading
    def data_scale(self) -> DataScale:
        """The affine map from the model's standardised parameters to the data's scale.

        A `reffects.encoding.DataScale` `(shift, matrix, response_scale)`: the fit's
        `coef_`, `intercept_` and every other estimate come through it, and
        `reffects.inspection` maps posterior sds and draws with it too.

        Example:
            >>> rng = np.random.default_rng(0)
            >>> X = pd.DataFrame({"g": rng.choice(["a", "b"], 50), "x": rng.normal(size=50)})
            >>> y = 3 * X["x"] + rng.normal(size=50)
            >>> shift, matrix, response_scale = RandomEffectsRegressor(group_cols=["g"]).fit(
            ...     X, y
            ... ).data_scale()
            >>> bool(np.isclose(response_scale, np.std(y))), matrix.shape
            (True, (2, 2))
        """
        check_is_fitted(self, "model_")
        return DataScale.from_standardisation(
            self._y_mean, self._y_scale, self._feature_mean, self._feature_scale
        )

    def term_scale(self, group_col) -> np.ndarray:
        """The map A from a grouping factor's coefficients on the model's scale to the
        data's, less the response scale: a group's `[intercept, *slopes]` on the data's
        scale is `data_scale().response_scale * A` times the model's. `group_col` is a key
        of `random_effects_`.

        Example:
            >>> rng = np.random.default_rng(0)
            >>> X = pd.DataFrame({"g": rng.choice(["a", "b"], 50), "x": rng.normal(size=50)})
            >>> y = 3 * X["x"] + rng.normal(size=50)
            >>> est = RandomEffectsRegressor(group_cols=["g"], random_slopes={"g": ["x"]})
            >>> slope_scale = est.fit(X, y).term_scale("g")[1, 1]
            >>> bool(np.isclose(slope_scale, 1 / np.std(X["x"])))
            True
        """
        check_is_fitted(self, "model_")
        if group_col not in self._group_keys:
            raise ValueError(
                f"`group_col` must be one of the grouping factors {self._group_keys}. "
                f"Received: group_col={group_col!r}"
            )
        return self._term_scale(self._group_keys.index(group_col))

    def _term_scale(self, k):
        """`term_scale` of the k-th grouping factor."""
        return factor_term_scale(
            self._random_slopes[k], self.correlated_slopes, self._feature_mean, self._feature_scale
        )

    def _read_posteriors(self):
        layers = mixed_model_layers(self.model_)
        shift, matrix, response_scale = self.data_scale()
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
        X = as_frame(X)
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
            likelihood = Gaussian(initial_noise_scale=INITIAL_NOISE_SCALE)
            # Stable for any magnitude (y * 1e200 included): centred, then scaled (1 for a
            # constant y); the model sees the standardised y, the estimates are mapped back.
            standardised = target[:, None].copy()
            mean, scale = standardise(standardised, ["y"], "target")
            self._y_mean, self._y_scale = float(mean[0]), float(scale[0])
            return likelihood, standardised[:, 0].astype("float32")
        likelihood = get_likelihood(self.family)
        target = likelihood.check_targets(target, weights)
        if np.abs(target).max() > FLOAT32_MAX:
            raise ValueError(
                f"y reaches {np.abs(target).max():.3g}, beyond the largest float32 "
                f"({FLOAT32_MAX:.4g}) the model computes in for family={self.family!r}"
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
        X = as_frame(X)
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
