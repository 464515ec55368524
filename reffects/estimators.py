"""scikit-learn estimators for mixed models; the only module that imports scikit-learn.

Data flows one way: check X (`reffects.checks`), encode it (`reffects.encoding`), build the
Keras model and train it on the ELBO (`reffects.training_recipe`), finish the linear part
exactly (`reffects.finish`), then read the posteriors back on the data's scale (here).
"""

import time
import warnings

import keras
import numpy as np
import pandas as pd
from scipy import stats
from scipy.special import expit, softmax
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data
from threadpoolctl import threadpool_limits

from reffects import finish
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
    FeatureCoding,
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
from reffects.imputation import (
    GaussianImputer,
    latent_predictor_draws,
    latent_predictor_variance,
    mean_preserving,
)
from reffects.joint_posterior import IndependentGroupsPosterior, JointPosterior
from reffects.layers import RandomIntercept
from reffects.likelihoods import Bernoulli, Categorical, Gaussian, Poisson, get_likelihood
from reffects.models import mixed_model_layers
from reffects.multinomial_finish import finish_multinomial
from reffects.training import StopOnNonFiniteLoss, check_finite_parameters, predict_means
from reffects.training_recipe import (
    INITIAL_NOISE_SCALE,
    FitProbe,
    build_starting_model,
    check_finite_estimates,
    choose_subnetwork_weight,
    default_schedule,
    raise_if_diverged,
    run_sgd,
    subnetwork_columns,
    subnetwork_head,
    subnetwork_output,
    subnetwork_schedules,
    validation_rows,
)

_FAMILIES = ("gaussian", "binomial", "poisson")
_PREDICTIVE_DRAWS = 1000
_ROWS_PER_DRAW_CHUNK = 2_000_000  # rows x draws per chunk of predictive draws
_LATENT_DRAWS = 200
"""Draws of a row's missing inputs from which the variance they add through a subnetwork is
estimated (`_latent_variance`); without a subnetwork it is exact."""
_PATTERN_REFITS = 3
_PATTERN_SETTLED = 1e-3
"""A Gaussian fit with missing inputs is finished again with each pattern of missing
columns' noise variance ratio, at most `_PATTERN_REFITS` times, until no ratio moves by
more than this fraction (`_finish_pattern_noise`)."""

_SHARED_PARAMETERS = """
    group_cols : list of column names (DataFrame) or integer positions (ndarray)
        The grouping factors; every other column is a fixed-effect feature.
        `()` leaves no grouping factor (a Bayesian generalised linear model).
        A feature column may be categorical (a string, `category` or True/False object
        column): it becomes treatment-coded dummies `col[T.level]` (reference: the first
        level sorted, or in the category's order; a single level gives none; an unseen
        level at predict gives zeros and a warning). A numeric feature may have missing
        values (NaN, None, NA), modelled as latent (`reffects.imputation`): the model's
        columns are jointly Normal (fitted by EM on fit's rows), a missing value is filled
        with its conditional mean given the row's observed columns and a 0/1 column
        `col[missing]` is added (for a categorical column, missing is a level of its own);
        in a "gaussian" model the rows of each pattern of missing columns get a noise
        variance of their own, s^2 lambda (lambda >= 1, estimated with the exact finish,
        a variance per pattern as nlme's `varIdent`, here a moment ratio of residuals;
        none when no row is complete), which `return_std` and `predict_interval` use; for
        "binomial" and "poisson" the predictive draws draw the missing values from their
        conditional Normal (through a subnetwork too), their mean response held at the
        prediction's. At predict, a missing value in a
        column complete in fit is filled with its mean in fit and a warning.
        `feature_names_` lists the resulting columns. Missing values in y, in a group
        column or in `sample_weight` are errors.
    random_slopes : dict or None
        Group column -> list of feature columns whose slopes vary by that factor's groups,
        as lme4's `(1 + x | g)`: `{"Subject": ["Days"]}`. The columns stay fixed effects
        too; the factor's intercept and slopes get one covariance matrix (see
        `correlated_slopes`). None: a random intercept per factor only.
    random_intercept : bool or dict
        Whether each factor has a random intercept: True (every factor), or a dict group
        column -> bool (a factor left out has one). A factor without one must have
        `random_slopes`, which then vary about the features' own origin, as lme4's
        `(0 + x | g)`: `random_slopes={"Subject": ["Days"]}, random_intercept={"Subject":
        False}`. lme4's `(1 | g) + (0 + x | g)` is `correlated_slopes=False` with the
        intercept kept.
    correlated_slopes : bool or dict
        True: each factor's terms (intercept and slopes) are correlated (lme4's `|`);
        False: independent (lme4's `||`, on the features' own origin); or a dict group
        column -> bool, one choice per factor (a factor left out: True), as lme4's
        `(1 + x | Subject) + (1 + x || Item)`: `{"Item": False}`.
    offset_col : str, int or None
        A numeric column of X added to the linear predictor with coefficient 1, on the
        link scale (lme4's `offset()`): log exposure for a Poisson rate, log trials or a
        known part of eta. It is not a feature (no coefficient) and must be in X at
        predict too. None: no offset. Not with more than two classes.
    hidden_units : tuple of int
        `()` for a linear mixed model; e.g. `(32, 16)` adds a ReLU subnetwork f, guarded so
        that it cannot make the fit worse than the mixed model: SGD trains on all but a
        random `validation_fraction` of the rows (at the default schedule twice, with
        batches of at most 256 and of at most 1,024 rows, `subnetwork_schedules`); the
        exact finish fits the linear part on those rows with f held (keeping the model that
        fits the held-out rows best) and without f, and f is weighted by the w in {0, 0.05,
        ..., 1} whose predictions fit the held-out rows best (`subnetwork_weight_`; w = 0
        is the mixed model); the finish then fits every row with w f held. Measured
        (`benchmarks/subnetwork_guard.py`): on a linear truth with 40 sparse dummies, held-out
        MSE equal to the mixed model's where an unguarded subnetwork on every column had 2.2
        times it; with a nonlinear term, 0.63 times the mixed model's. With more than two
        classes f has K - 1 outputs, held in the multinomial Laplace finish, and is guarded
        the same way.
    subnetwork_cols : list of column names or positions, or None
        The feature columns f sees, given as `group_cols` are. None: every non-group column
        but categorical ones and essentially binary ones (two values fill at least 99% of
        its rows: dummies, sparse word flags), which any function of one of them alone
        treats linearly and on which a subnetwork overfits (all of them if none is left); a
        column f sees brings its missing indicator.
        x . beta always sees every non-group column. A listed column brings all of its
        model columns (a categorical's dummies, a missing indicator). `subnetwork_cols`,
        `dropout` and `l2_regularization` are ignored when `hidden_units=()` (so one grid
        can search both), though still checked (`subnetwork_cols` against X).
    dropout : float in [0, 1)
        Dropout rate after each hidden layer of f (in training only).
    l2_regularization : float >= 0
        L2 penalty on the weights of f (not the biases), scaled as MLPRegressor's `alpha`
        (here `alpha` is the global intercept): `0.5 * l2_regularization * ||W||^2 /
        n_samples` is added to the loss per row, a Normal(0, l2_regularization**-0.5) prior
        on each weight. For "gaussian" the loss is on standardised y over the noise variance
        s^2, so it acts as MLPRegressor(alpha=l2_regularization * s^2) on standardised y.
    epochs, batch_size : int or None
        None chooses them from the data size (`default_schedule`; with a subnetwork, both
        None tries two schedules, see `hidden_units`).
    learning_rate : float
        Starting Adam learning rate; it decays to 1% of itself along a cosine.
    scale_prior : None, "exponential", "half_normal" or a ScalePrior
        None learns each sigma_k as a point estimate (empirical Bayes). A prior applies to
        the sd of each term of each factor (intercept and each slope) on the model's scale:
        y standardised for "gaussian" (the link scale otherwise), a slope per standard
        deviation of its feature, an intercept correlated with slopes at the features'
        mean. The finish puts each sd at the mode of its marginal posterior on the log
        scale (the correlations R_k at that mode, under `correlation_prior`) and
        q(sigma) = LogNormal at the Laplace sd there (with more than two classes, SGD fits
        q(sigma)).
    correlation_prior : None or float eta > 0
        An LKJ(eta) prior on the correlation R_k of the terms of every factor with
        correlated random slopes (density proportional to det(R_k)^(eta - 1)): eta = 1 is
        uniform (the fit equals None's), eta > 1 shrinks the correlations toward 0. R_k
        stays a point estimate, at the mode of the marginal posterior (the finish) or the
        MAP of the ELBO (SGD). None: a flat prior. Ignored for a factor whose terms are
        independent (`correlated_slopes`) or without slopes.
    prior_scale : float
        Standard deviation of the Normal priors of alpha and beta (features are
        standardised, so beta's prior is per standard deviation of its feature).
    early_stopping : bool
        Stop SGD when the loss on the held-out `validation_fraction` of the rows has not
        improved for `n_iter_no_change` epochs, keeping the best weights; the exact finish
        still fits every row.
    validation_fraction : float in (0, 1)
        The share of the rows, drawn at random (seeded by `random_state`), that SGD does not
        train on when there is a subnetwork or `early_stopping`: they stop SGD early and
        choose the subnetwork's weight.
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
        Posterior means of the linear fixed effects, named by `feature_names_`.
    feature_names_ : ndarray of str
        The model's feature columns, in the order of `coef_`: X's non-group columns, a
        categorical one as its dummies `col[T.level]`, a missing-value indicator
        `col[missing]` after its column (see `group_cols`).
    variance_components_ : dict
        Group column -> sigma_k, the standard deviation of its offsets (of its random
        intercept, with random slopes; of its first slope without a random intercept).
    random_effects_covariance_ : dict
        Group column -> DataFrame whose index and columns are `["(Intercept)", *slope
        columns]` (the slope columns alone without a random intercept), the covariance of
        each group's coefficients (1 x 1 without slopes).
    random_effects_ : dict
        Group column -> DataFrame indexed by level with columns mean, sd, lower, upper (the
        intercept offset's; absent without a random intercept), then `mean_<col>`,
        `sd_<col>`, `lower_<col>`, `upper_<col>` per slope column, and n.
    feature_names_in_, n_features_in_ : as in scikit-learn
    model_ : the fitted `ELBOModel`
    history_ : dict of per-epoch `loss`, `nll` and `kl` (and `val_*` with early stopping)
    subnetwork_weight_ : float in [0, 1], or None without a subnetwork
        The weight w on the subnetwork's output chosen on the held-out rows (see
        `hidden_units`); 0: the subnetwork is left out and the fit is the mixed model's.
    subnetwork_validation_nll_ : dict, or None without a subnetwork
        Each candidate w -> mean negative log-likelihood of the held-out rows (a Gaussian's
        at one noise scale, so it ranks w by squared error).
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
        return split_columns(
            frame,
            self.group_cols,
            self.subnetwork_cols,
            self.random_slopes,
            self.random_intercept,
            self.correlated_slopes,
            self.offset_col,
        )

    def _encode(self, X, reset, sample_weight=None):
        """X as the model's inputs: the feature columns coded (`FeatureCoding`: dummies
        for categorical columns, filled values and indicators for missing ones) and
        standardised, and each factor's group codes. With `reset` (fit), the coding and
        the standardisation are learned, weighted by `sample_weight` (checked weights)."""
        columns = self._split_columns(X, reset)
        cols, groups = columns.group_cols, columns.groups
        if reset:
            coding = FeatureCoding.learn(columns.feature_labels, columns.features, sample_weight)
            self._feature_coding = coding
            self._feature_labels = coding.names
            self.feature_names_ = np.asarray(coding.names, dtype=object)
            self._group_keys = cols
            self._subnetwork_features = coding.expand(columns.subnetwork_features)
            self._random_slopes = [
                coding.slope_positions(col, positions, columns.feature_labels)
                for col, positions in zip(cols, columns.random_slopes)
            ]
            self._random_intercepts = columns.random_intercepts
            self._correlated_slopes = columns.correlated_slopes
            self._levels = [group_levels(col, values) for col, values in zip(cols, groups)]
        # `features` is this method's own array, standardised in place.
        features = self._feature_coding.encode(columns.features, columns.num_rows, not reset)
        if reset:
            self._imputer = self._missing_value_model(features, sample_weight)
        latent = None
        if self._imputer is not None:
            features, latent = self._imputer.fill(features)
        if reset:
            self._feature_mean, self._feature_scale = standardise(
                features, self._feature_labels, "feature column", sample_weight
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
        offset = columns.offset  # at fit, `_fit` puts it on the model's scale
        if offset is not None and not reset:
            offset = self._model_offset(offset)
        return EncodedData(float32_features, codes, latent, offset)

    def _model_offset(self, offset):
        """The offset on the model's scale: less its mean in fit (the intercept holds that),
        over y's scale."""
        return (offset - self._offset_centre) / self._y_scale

    def _missing_value_model(self, features, sample_weight):
        """The joint Normal of the model's columns (`GaussianImputer`) whose conditional
        means fill the missing values, fitted on fit's rows; None when none is missing."""
        coding = self._feature_coding
        if not coding.latent:
            return None
        modelled = np.setdiff1d(np.arange(features.shape[1]), coding.indicators)
        return GaussianImputer.fit(features, coding.latent, sample_weight, columns=modelled)

    def _latent_coefficients(self, data):
        """Each row's coefficient on each model column in the linear part, at the posterior
        means: beta, `(p,)`, or with random slopes on a column that had missing values,
        `(n, p)` with each row's groups' slopes added."""
        coefficients = np.asarray(self.joint_posterior_.fixed_mean(), "float64")[1:]
        latent = set(self._feature_coding.latent)
        sloped = [k for k, slopes in enumerate(self._random_slopes) if latent & set(slopes or [])]
        if not sloped:
            return coefficients
        coefficients = np.tile(coefficients, (len(data.features), 1))
        for k in sloped:
            first = int(self._random_intercepts[k])  # the slopes follow an intercept
            means = self.joint_posterior_.offset_mean(k)[data.codes[k]]
            coefficients[:, self._random_slopes[k]] += means[:, first:]
        return coefficients

    def _subnetwork_in_use(self) -> bool:
        """Whether the fitted model has a subnetwork whose weight is not 0."""
        return (
            bool(self.hidden_units)
            and len(self._feature_labels) > 0
            and (self.subnetwork_weight_ is None or self.subnetwork_weight_ > 0)
        )

    def _latent_subnetwork(self):
        """The subnetwork as `latent_predictor_draws` reads it (the missing indicators at
        0: as if the drawn values had been observed), or None when there is none in use or
        it sees no column that had missing values."""
        seen = self._subnetwork_features  # None: every column
        sees_latent = seen is None or set(seen) & set(self._feature_coding.latent)
        if not (self._subnetwork_in_use() and sees_latent):
            return None
        indicators = self._feature_coding.indicators
        observed = -self._feature_mean[indicators] / self._feature_scale[indicators]
        head = subnetwork_head(self.model_)

        def subnetwork(features):
            features = features.astype("float32")
            features[:, indicators] = observed
            return subnetwork_output(self.model_, features, head)

        return subnetwork

    def _latent_draws(self, data, num_samples, rng):
        """`latent_predictor_draws` for `data`'s rows: `(num_samples, n)`, what their missing
        inputs add to the predictor, or None when fit saw no missing value."""
        if self._imputer is None:
            return None
        return latent_predictor_draws(
            self._imputer,
            data.latent,
            data.features,
            self._feature_scale,
            self._latent_coefficients(data),
            self._latent_subnetwork(),
            num_samples,
            rng,
        )

    def _latent_variance(self, data):
        """The variance `data`'s rows' missing inputs add to the predictor given their
        observed columns, `(n,)` on the model's scale: exact for the linear part (the
        coefficients at their posterior means: their own uncertainty, O(1/n), is left
        out), from `_LATENT_DRAWS` draws with a subnetwork; zeros when fit saw none."""
        if self._imputer is None:
            return np.zeros(len(data.features))
        if self._latent_subnetwork() is None:
            return latent_predictor_variance(
                self._imputer, data.latent, self._feature_scale, self._latent_coefficients(data)
            )
        rng = np.random.default_rng(self._seed)
        return np.var(self._latent_draws(data, _LATENT_DRAWS, rng), axis=0)

    def _slope_shifts(self):
        """Per factor, what its slope inputs add to the standardised features."""
        return slope_shifts(
            self._random_slopes,
            self._correlated_slopes,
            self._feature_mean,
            self._feature_scale,
            self._random_intercepts,
        )

    def _slope_inputs(self, data):
        """Per factor, its rows' slope covariates on the model's scale, or None."""
        return slope_inputs(data.features, self._random_slopes, self._slope_shifts())

    def _factor_terms(self, data):
        """Per factor, its rows' term vectors `[1, z]` or `z` (None for a random intercept)."""
        return factor_terms(self._slope_inputs(data), self._random_intercepts)

    # ----------------------------------------------------------------------- fitting
    def _fit(self, X, y, sample_weight, callbacks):
        """Validates, encodes, builds and trains the model; `y` is already 1-d.

        With a subnetwork (or `early_stopping`), SGD trains on all but a random
        `validation_fraction` of the rows; the subnetwork's weight is chosen on those
        rows (`_guard_subnetwork`), and the exact finish then runs on every row.
        """
        start = time.perf_counter()
        self._seed = check_params(self)  # the fit's one seed, from random_state
        every_weight = check_sample_weight(sample_weight, len(X))
        every = self._encode(X, reset=True, sample_weight=every_weight)
        # The model's offset is centred (the intercept takes its mean) and scaled as y is.
        self._offset_centre = 0.0
        if every.offset is not None:
            self._offset_centre = float(np.average(every.offset, weights=every_weight))
        likelihood, every_y = self._model_target(y, every_weight, every.offset)
        if every.offset is not None:
            every.offset = self._model_offset(every.offset)
        subnetwork = bool(self.hidden_units) and every.features.shape[1] > 0
        if subnetwork and self.subnetwork_cols is None:
            coding = self._feature_coding
            self._subnetwork_features = subnetwork_columns(
                every.features, coding.positions, coding.categorical
            )
        finishable = self._finishable(every, likelihood)
        held_out = None
        if (subnetwork and finishable) or self.early_stopping:
            held_out = validation_rows(len(every_y), self.validation_fraction, self._seed)
        data, model_y, weights = _row_subset(every, every_y, every_weight, held_out, False)

        num_rows = len(model_y)
        # The finish solves a linear predictor's model in full (q(sigma) under a
        # hyperprior too: its mode and Laplace sd).
        exact_finish = not self.hidden_units and finishable
        schedules = [default_schedule(num_rows, exact_finish, bool(self.hidden_units))]
        if subnetwork and self.batch_size is None and self.epochs is None:
            schedules = subnetwork_schedules(num_rows)
        schedules = [(min(self.batch_size or b, num_rows), self.epochs or e) for b, e in schedules]

        def starting_model():
            return build_starting_model(
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
                correlation_prior=self.correlation_prior,
                seed=self._seed,
                correlated_slopes=self._correlated_slopes,
                slope_shifts=self._slope_shifts(),
                random_intercepts=self._random_intercepts,
                offset=data.offset is not None,
            )

        self.model_ = starting_model()
        untrained = self.model_.get_weights()
        validation = None
        if held_out is not None:
            valid, valid_y, valid_weight = _row_subset(every, every_y, every_weight, held_out, True)
            valid_weight = None if valid_weight is None else valid_weight.astype("float32")
            validation = (valid.model_inputs(), valid_y, valid_weight)
        # Without a subnetwork the finish solves the model in full from any start (lme4's
        # REML, glmer's Laplace fit), so SGD runs only when asked for (`epochs` or
        # `early_stopping`); it costs seconds of Keras start-up and changes no estimate.
        history = {}
        probe = None
        if subnetwork:
            probe = FitProbe(self.model_, data.model_inputs(), model_y, weights)
        if not exact_finish or self.epochs is not None or self.early_stopping:
            trained = []
            for batch_size, epochs in schedules:  # two for a subnetwork at the defaults
                model = starting_model() if trained else self.model_
                history = run_sgd(
                    model,
                    data.model_inputs(),
                    model_y,
                    weights,
                    batch_size=batch_size,
                    epochs=epochs,
                    learning_rate=self.learning_rate,
                    seed=self._seed,
                    callbacks=callbacks,
                    validation_data=validation if self.early_stopping else None,
                    n_iter_no_change=self.n_iter_no_change,
                    verbose=self.verbose,
                )
                divergence = probe.divergence(model, self.learning_rate) if probe else None
                trained.append((model, history, divergence))
            self.model_, history, _ = trained[0]
        self.subnetwork_weight_ = self.subnetwork_validation_nll_ = None
        if subnetwork and finishable:
            history = self._guard_subnetwork(
                likelihood, data, model_y, weights, validation, trained, untrained
            )
        if held_out is not None and finishable:
            for layer, codes in zip(mixed_model_layers(self.model_).factors, every.codes):
                layer.adapt(codes)  # the finish fits every row: each group's n counts them all
            self.model_.training_size.assign(float(len(every_y)))
        self._noise_ratios = {}
        if finishable:
            held = _held(self.model_, every, subnetwork)
            self._finish(likelihood, every, every_y, every_weight, held)
            if isinstance(likelihood, Gaussian) and every.latent is not None:
                self._finish_pattern_noise(likelihood, every, every_y, every_weight, held)
        else:
            layers = mixed_model_layers(self.model_)
            self.joint_posterior_ = IndependentGroupsPosterior.from_layers(layers)
        if isinstance(likelihood, Gaussian):
            self.noise_ratios_ = self._named_noise_ratios()
        self.fit_time_ = time.perf_counter() - start
        self.history_ = history
        self._read_posteriors()
        return self

    # numpy's BLAS work in a fit is products over the rows and small matrices: on a shared
    # 2-core machine OpenBLAS's second thread waits for a core at every call and then spins,
    # slowing what follows (a linear fit with slopes, 1,500 groups, measured under the same
    # load: 0.25 s with two threads, 0.14 s with one). Keras's SGD runs on TensorFlow's own
    # threads, unaffected; the finish's kernels already ran on one (`finish._one_blas_thread`).
    @threadpool_limits.wrap(limits=1, user_api="blas")
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

    def _finish_size(self, data):
        """The exact finish's `(num_levels, num_terms, num_fixed)`: each factor's levels (the
        unseen level included) and terms, and the number of fixed effects."""
        num_terms = [
            int(intercept) + len(slopes or [])
            for intercept, slopes in zip(self._random_intercepts, self._random_slopes)
        ]
        num_levels = [len(levels) + 1 for levels in self._levels]
        return num_levels, num_terms, 1 + data.features.shape[1]

    def _finishable(self, data, likelihood) -> bool:
        """Whether the exact finish can fit this model (`finish.exact_finish_fits`); warns
        when it cannot: the fit is then SGD's alone."""
        num_levels, num_terms, num_fixed = self._finish_size(data)
        sparse_ok = not isinstance(likelihood, Categorical)  # K > 2 classes: dense only
        if finish.exact_finish_fits(num_levels, num_terms, num_fixed, sparse_ok):
            return True
        dense = finish.dense_coefficients(num_levels, num_terms, num_fixed)
        warnings.warn(
            f"the exact finish factors the coefficients of every grouping factor but the "
            f"largest plus the fixed effects densely, at most {finish.MAX_DENSE_LEVELS}, "
            "beyond which it covers one term per factor (random intercepts) and two "
            "classes at most; this model "
            f"has {dense}. It is fitted by SGD alone (the default schedule, about 4,000 "
            "steps, unless `epochs` is set): the posterior is the variational one, each "
            "group independent of the others and of the fixed effects (`joint_posterior_` "
            "an IndependentGroupsPosterior), and the variance components are the ELBO's, "
            "which run low with few rows per group. lme4's answers need fewer levels outside "
            "the largest factor",
            UserWarning,
            stacklevel=4,
        )
        return False

    def _finish(self, likelihood, data, model_y, weights, held, noise_ratio=None):
        """The exact finish of `model_`'s linear part on `data`'s rows, `held` (a
        subnetwork's output, or 0) held fixed (a Gaussian's rows with noise variances
        `noise_ratio` times s^2, see `finish_gaussian`); keeps the joint posterior as
        `joint_posterior_`."""
        layers = mixed_model_layers(self.model_)
        finish = finish_gaussian if isinstance(likelihood, Gaussian) else finish_glmm
        if isinstance(likelihood, Categorical):
            finish = finish_multinomial
        options = {}
        if isinstance(likelihood, Gaussian):
            options = {"reml": self.reml, "noise_ratio": noise_ratio}
        self.joint_posterior_ = finish(
            self.model_,
            layers.intercept,
            list(zip(layers.factors, data.codes, self._slope_inputs(data))),
            layers.fixed_effects,
            data.features,
            y=model_y,
            held=held,
            sample_weight=weights,
            **options,
        )

    def _finish_pattern_noise(self, likelihood, data, model_y, weights, held):
        """Finishes a Gaussian model again with a noise variance of its own, s^2 lambda_P,
        for the rows of each pattern P of missing columns (nlme's `varIdent` by pattern):
        lambda_P is the ratio of the pattern's mean squared residual to the complete
        rows', at least 1 (an unknown input adds spread), and the finish weighs the rows by
        1 / lambda_P (`finish_gaussian`'s `noise_ratio`). Repeated from the new fit until
        no lambda moves by more than `_PATTERN_SETTLED`. Estimated from the residuals, not
        from the missing-value model, so a subnetwork's learned mean for such rows and a
        column far from Normal do not mislead it. Keeps `_noise_ratios` (pattern key ->
        lambda)."""
        keys = _pattern_keys(data.latent, self._feature_coding.latent)
        complete = keys == keys.dtype.type(b"")
        weights = np.ones(len(model_y)) if weights is None else np.asarray(weights, "float64")
        patterns = [key for key in np.unique(keys[~complete])]
        if not complete.any() or not patterns:
            return
        ratio = np.ones(len(model_y))
        for _ in range(_PATTERN_REFITS):
            residual = np.square(model_y - predict_means(self.model_.network, data.model_inputs()))
            base = weights[complete] @ residual[complete] / max(weights[complete].sum(), 1e-300)
            new_ratio, self._noise_ratios = np.ones(len(model_y)), {}
            for key in patterns:
                rows = keys == key
                spread = weights[rows] @ residual[rows] / max(weights[rows].sum(), 1e-300)
                self._noise_ratios[bytes(key)] = new_ratio[rows] = max(spread / base, 1.0)
            settled = np.max(np.abs(new_ratio / ratio - 1.0)) <= _PATTERN_SETTLED
            ratio = new_ratio
            self._finish(likelihood, data, model_y, weights, held, noise_ratio=ratio)
            if settled:
                return

    def _named_noise_ratios(self) -> dict:
        """`_noise_ratios` keyed by the tuple of the pattern's missing columns' names."""
        latent = self._feature_coding.latent
        named = {}
        for key, ratio in getattr(self, "_noise_ratios", {}).items():
            bits = np.unpackbits(np.frombuffer(key, "uint8"))[: len(latent)].astype(bool)
            names = tuple(self._feature_labels[j] for j, on in zip(latent, bits) if on)
            named[names] = float(ratio)
        return named

    def _noise_ratio(self, data):
        """Each row's noise variance over s^2 (a Gaussian's): 1 for a complete row, its
        pattern's lambda (`_finish_pattern_noise`), or for a pattern fit did not see (or a
        fit without the exact finish) 1 + what its missing inputs add to the predictor
        over s^2 (`_latent_variance`)."""
        ratio = np.ones(len(data.features))
        if self._imputer is None:
            return ratio
        keys = _pattern_keys(data.latent, self._feature_coding.latent)
        known = getattr(self, "_noise_ratios", {})
        unseen = np.zeros(len(ratio), dtype=bool)
        for key in np.unique(keys):
            rows = keys == key
            if bytes(key) in known:
                ratio[rows] = known[bytes(key)]
            elif key != keys.dtype.type(b""):
                unseen |= rows
        if unseen.any():
            noise = float(self.model_.likelihood.noise_scale()) ** 2
            ratio[unseen] += self._latent_variance(data.subset(unseen)) / noise
        return ratio

    def _guard_subnetwork(self, likelihood, data, model_y, weights, validation, trained, untrained):
        """Keeps the best of the `trained` `(model, history, divergence)` (one per SGD
        schedule) and the weight w in [0, 1] on its subnetwork's output f
        (`subnetwork_weight_`), by the validation rows' NLL after exact finishes on the
        other rows with f held and without it (`choose_subnetwork_weight`); w = 0 is the
        linear mixed model. Warns when SGD made the subnetwork's fit far worse (a blow-up).
        A blown-up model whose finish fails falls back to w = 0, finished from the untrained
        weights `untrained` if need be. Returns the kept model's history."""

        def finish(model):
            self.model_ = model
            self._finish(likelihood, data, model_y, weights, _held(model, data, True))

        index, weight, scores, failure = choose_subnetwork_weight(
            [model for model, _, _ in trained], finish, validation, start=untrained
        )
        self.model_, history, divergence = trained[index]
        self.subnetwork_weight_ = weight
        self.subnetwork_validation_nll_ = scores
        if failure is not None:
            divergence = (
                f"{divergence}; the exact finish failed with the subnetwork's output held "
                f"({failure})"
                if divergence
                else f"the exact finish failed with the subnetwork's output held ({failure})"
            )
        if divergence:
            warnings.warn(
                f"{divergence}; the subnetwork's weight chosen on the validation rows is "
                f"subnetwork_weight_={weight:g} (0: the subnetwork is left out)",
                UserWarning,
                stacklevel=5,
            )
        return history

    # ----------------------------------------------------------------------- reading
    def data_scale(self) -> DataScale:
        """The affine map from the model's standardised parameters to the data's scale.

        A `reffects.encoding.DataScale` `(shift, matrix, response_scale)`: the fit's
        `coef_`, `intercept_` and every other estimate come through it, and
        `reffects.inspection` maps posterior sds and draws with it too. With `offset_col`,
        a "gaussian" `response_scale` is the sd of y less the offset.

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
        # `_y_mean` shifts predictions; the model's intercept also holds the offset's mean
        return DataScale.from_standardisation(
            self._y_mean - self._offset_centre,
            self._y_scale,
            self._feature_mean,
            self._feature_scale,
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
            self._random_slopes[k],
            self._correlated_slopes[k],
            self._feature_mean,
            self._feature_scale,
            self._random_intercepts[k],
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
            names = ["(Intercept)", *slope_names] if self._random_intercepts[k] else slope_names
            matrix = self._term_scale(k)  # the data's scale is response_scale times it
            if isinstance(layer, RandomIntercept):
                posterior = layer.posterior()["offset"]
                loc = keras.ops.convert_to_numpy(posterior.mean()).astype("float64")
                covariance = np.square(keras.ops.convert_to_numpy(posterior.stddev()))
                sigma = keras.ops.convert_to_numpy(layer.group_scale()).reshape(1, 1)
                group_covariance = sigma**2
            else:
                loc, covariance = layer.posterior_moments()
                group_covariance = keras.ops.convert_to_numpy(layer.covariance())
            loc = loc[: len(levels)]
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

    def _held_part(self, data):
        """The predictor less its linear part per row (the subnetwork's output and the
        offset), on the model's scale, at the current posterior means."""
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
    """`random_effects_[col]`: per level, the intercept offset's mean, sd and 95% interval
    (when `names` starts with "(Intercept)"), the same for each slope (`mean_<name>`, ...),
    and the training count n."""
    half_width = stats.norm.ppf(0.975) * sd
    columns = {}  # one DataFrame of them all: 3x faster than inserting column by column
    for j, name in enumerate(names):
        suffix = "" if j == 0 and name == "(Intercept)" else f"_{name}"
        columns[f"mean{suffix}"] = mean[:, j]
        columns[f"sd{suffix}"] = sd[:, j]
        columns[f"lower{suffix}"] = mean[:, j] - half_width[:, j]
        columns[f"upper{suffix}"] = mean[:, j] + half_width[:, j]
    columns["n"] = counts[: len(levels)]
    return pd.DataFrame(columns, index=levels.rename(col))


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
    of the scales (ML with `reml=False`) and the exact joint posterior of the intercept,
    fixed effects and every offset (`reffects.finish`, kept as `joint_posterior_`); for
    the other families, glmer's Laplace estimates and the Laplace joint posterior at the
    mode. Under a `scale_prior`, the scales are at the mode of their marginal posterior
    on the log scale instead. Features are
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
    noise_ratios_ : dict, "gaussian" only
        Tuple of the feature columns missing in a row -> that pattern's noise variance over
        `noise_scale_ ** 2` (at least 1; see `group_cols`), one entry per pattern seen in
        fit; empty when fit saw no missing value or no complete row, or had no exact
        finish (every row with a missing value then takes its ratio from the missing-value
        model).

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
        random_intercept=True,
        correlated_slopes: bool | dict = True,
        offset_col=None,
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
        correlation_prior: float | None = None,
        prior_scale: float = 10.0,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        random_state: int | None = None,
        verbose: int = 0,
    ):
        self.group_cols = group_cols
        self.random_slopes = random_slopes
        self.random_intercept = random_intercept
        self.correlated_slopes = correlated_slopes
        self.offset_col = offset_col
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
        self.correlation_prior = correlation_prior
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

    def _model_target(self, y, weights, offset=None):
        """The likelihood and y on the model's scale: for "gaussian", y less `offset`
        standardised, plus the offset less its mean (`_offset_centre`) over the same sd."""
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
            # Weighted (frequency weights): a row of weight 2 is exactly two rows.
            standardised = target[:, None].copy()
            if offset is not None:
                standardised[:, 0] -= offset
            mean, scale = standardise(standardised, ["y"], "target", weights)
            self._y_mean = float(mean[0]) + self._offset_centre
            self._y_scale = float(scale[0])
            if offset is not None:
                standardised[:, 0] += (offset - self._offset_centre) / self._y_scale
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
        linear predictor (its correlations included) and the noise, s^2 times the row's
        ratio for its missing inputs (`_noise_ratio`)."""
        design = np.column_stack([np.ones(len(data.features)), data.features])
        variance = self.joint_posterior_.predictor_variance(
            design, data.codes, self._factor_terms(data)
        )
        noise = float(self.model_.likelihood.noise_scale()) ** 2
        return variance + noise * self._noise_ratio(data)

    def _predictive_draws(self, data, num_samples, trials=None):
        """Posterior predictive draws, by chunks of rows: `(rows, means, ys)`, the draws of
        the response mean and of y on the model's scale, each `(num_samples, len(rows))`.

        The linear predictor is drawn from the joint posterior (rows of one group share its
        offset, and every correlation is kept), a subnetwork adds its fixed output, and y
        is drawn from the likelihood (seeded by `random_state`). A Gaussian row with
        missing inputs has the noise sd s sqrt(`_noise_ratio`); for the other families a
        row's missing inputs are drawn from their conditional Normal given its observed
        columns (`reffects.imputation`).
        """
        check_finite_parameters(self.model_)  # a NaN rate would hang a Poisson sampler
        rng = np.random.default_rng(self._seed)
        design = np.column_stack([np.ones(len(data.features)), data.features])
        held = self._held_part(data) if self.hidden_units or data.offset is not None else None
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
            if held is not None:
                eta += held[rows]
            chunk = data.subset(rows)
            if isinstance(likelihood, Gaussian):
                means = eta
                noise = float(likelihood.noise_scale()) * np.sqrt(self._noise_ratio(chunk))
                y = eta + noise * rng.standard_normal(eta.shape)
                yield rows, means, y
                continue
            latent = self._latent_draws(chunk, num_samples, rng)
            if latent is not None:  # each draw its own values of the missing inputs
                centre = predict_means(self.model_.network, chunk.model_inputs())
                eta += mean_preserving(latent, centre, self.family)
            if isinstance(likelihood, Poisson):
                means = np.exp(np.minimum(eta, 700.0))
                y = rng.poisson(means).astype("float64")
            else:
                means = expit(eta)
                chunk_trials = _rows(trials, rows)
                n = np.ones(eta.shape[1]) if chunk_trials is None else chunk_trials
                y = rng.binomial(n.astype("int64"), means) / np.maximum(n, 1.0)
            yield rows, means, y


def _held(model, data, subnetwork) -> np.ndarray | float:
    """What the finish holds fixed in the predictor: the subnetwork's output (with
    `subnetwork`) plus the offset, on the model's scale; 0.0 when neither."""
    held = subnetwork_output(model, data.features) if subnetwork else 0.0
    return held if data.offset is None else held + data.offset.astype("float64")


def _rows(values, rows):
    return None if values is None else values[rows]


def _pattern_keys(latent, columns):
    """Each row's pattern of missing values among the model `columns` as a bytes key
    (`b""` for a complete row), an array of `len(latent)`.

    Example:
        >>> _pattern_keys(np.array([[True, False], [False, False]]), [0, 1]).tolist()
        [b'\\x80', b'']
    """
    if latent is None:
        return np.zeros(0, dtype="S1")
    packed = np.ascontiguousarray(np.packbits(latent[:, columns], axis=1))
    return packed.view(f"S{packed.shape[1]}").reshape(-1)


def _row_subset(data, model_y, weights, held_out, validation):
    """The validation rows (`validation`) or the others of `EncodedData`, y and weights;
    everything when `held_out` is None."""
    if held_out is None:
        return data, model_y, weights
    rows = held_out if validation else ~held_out
    return data.subset(rows), model_y[rows], _rows(weights, rows)


class RandomEffectsClassifier(ClassifierMixin, _MixedModelEstimator):
    __doc__ = (
        """A Bayesian logistic (or multinomial) mixed model, or random-effects neural network.

        two classes:   logit P(y = classes_[1]) = alpha + sum_k b_k[group_k] + x . beta + f(x)
        K > 2 classes: P(y = classes_[c]) = softmax_c(eta_0, ..., eta_{K-1}),  eta_0 = 0,
                       eta_c = alpha_c + sum_k b_k[group_k, c] + x . beta_c + f_c(x)
        b_k[., c] ~ Normal(0, sigma_kc),   alpha ~ Normal(0, prior_scale),
        beta ~ Normal(0, prior_scale)

    Two classes: fitted by variational inference on the ELBO through Keras `fit` with a
    Bernoulli likelihood, ending with glmer's Laplace fit of everything but a subnetwork and
    its joint posterior (`reffects.finish`, kept as `joint_posterior_`).

    K > 2 classes: a multinomial logit model with `classes_[0]` as the reference class (its
    eta is 0, which identifies the linear part); each grouping factor has one independent
    random intercept per other class, each with its own sigma (a `RandomIntercept` with K - 1
    units), and a subnetwork has K - 1 outputs. Without a `scale_prior`, the fit ends in the
    multinomial Laplace finish (`reffects.multinomial_finish`: glmer's Laplace carried over
    to K classes, sigma_kc maximising it), with a subnetwork's outputs held and guarded as
    for two classes (`hidden_units`); without a subnetwork there is no SGD unless `epochs`
    or `early_stopping` is given, and then only as its start, so the fit is deterministic.
    The layers hold the Laplace posterior's marginal means and sds (its correlations are
    not kept: `joint_posterior_` is None). With a `scale_prior`, SGD on the ELBO alone (the
    default schedule, about 4,000 steps, unless `epochs` is given), the posterior
    mean-field. `random_slopes` are not supported with K > 2.

    Labels may be any values (strings too) that sort. Estimates are on the logit scale (log
    odds against `classes_[0]` for K > 2).

    Parameters
    ----------"""
        + _SHARED_PARAMETERS
        + """
    Attributes
    ----------
    classes_ : ndarray of the labels, sorted"""
        + _SHARED_ATTRIBUTES
        + """
    With K > 2 classes the per-class attributes follow scikit-learn's multinomial
    `LogisticRegression` in shape, with the reference class's row at zero:

    intercept_ : ndarray of shape (K,)
        alpha_c, 0 for `classes_[0]`.
    coef_ : ndarray of shape (K, n_fixed_features)
        beta_c per row, zeros for `classes_[0]` (LogisticRegression centres its rows
        instead; only differences between rows are identified, and they agree).
    variance_components_ : dict
        Group column -> Series of sigma_kc indexed by `classes_[1:]` (name "class").
    random_effects_covariance_ : dict
        Group column -> diagonal DataFrame of sigma_kc ** 2 over `classes_[1:]` (each
        class's offsets are independent a priori).
    random_effects_ : dict
        Group column -> DataFrame indexed by level with `mean_<c>`, `sd_<c>`, `lower_<c>`,
        `upper_<c>` per class c in `classes_[1:]` (the Laplace marginals; with a
        `scale_prior` the mean-field q's), and n.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = pd.DataFrame({"clinic": rng.choice(["a", "b", "c"], 400), "x": rng.normal(size=400)})
    >>> logit = X["clinic"].map({"a": -1.0, "b": 0.0, "c": 1.0}) + 2 * X["x"]
    >>> y = np.where(rng.random(400) < 1 / (1 + np.exp(-logit)), "sick", "well")
    >>> clf = RandomEffectsClassifier(group_cols=["clinic"], random_state=0).fit(X, y)
    >>> clf.classes_.tolist(), clf.predict_proba(X.head(2)).shape
    (['sick', 'well'], (2, 2))

    Three classes (the multinomial Laplace finish; `epochs` adds SGD before it):

    >>> y3 = np.where(X["x"] > 0.5, "sick", np.where(X["x"] < -0.5, "well", "unsure"))
    >>> clf3 = RandomEffectsClassifier(group_cols=["clinic"], random_state=0)
    >>> proba = clf3.fit(X, y3).predict_proba(X.head(2))
    >>> clf3.classes_.tolist(), proba.shape, clf3.coef_.shape
    (['sick', 'unsure', 'well'], (2, 3), (3, 1))
    >>> clf3.variance_components_["clinic"].index.tolist()
    ['unsure', 'well']
    """
    )

    def __init__(
        self,
        *,
        group_cols=None,
        random_slopes=None,
        random_intercept=True,
        correlated_slopes: bool | dict = True,
        offset_col=None,
        hidden_units=(),
        subnetwork_cols=None,
        dropout: float = 0.0,
        l2_regularization: float = 0.0,
        epochs: int | None = None,
        batch_size: int | None = None,
        learning_rate: float = 0.01,
        scale_prior=None,
        correlation_prior: float | None = None,
        prior_scale: float = 10.0,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        random_state: int | None = None,
        verbose: int = 0,
    ):
        self.group_cols = group_cols
        self.random_slopes = random_slopes
        self.random_intercept = random_intercept
        self.correlated_slopes = correlated_slopes
        self.offset_col = offset_col
        self.hidden_units = hidden_units
        self.subnetwork_cols = subnetwork_cols
        self.dropout = dropout
        self.l2_regularization = l2_regularization
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.scale_prior = scale_prior
        self.correlation_prior = correlation_prior
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
        y : array of shape (n_samples,), at least two distinct labels
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
        if len(classes) < 2:
            raise ValueError(
                "RandomEffectsClassifier needs at least 2 classes in y; got only 1 class: "
                f"{classes.tolist()}"
            )
        self.classes_ = classes
        return self._fit_checked(X, y, sample_weight, callbacks)

    def _model_target(self, y, weights, offset=None):
        self._y_mean, self._y_scale = 0.0, 1.0
        if len(self.classes_) == 2:
            return Bernoulli(), (np.asarray(y) == self.classes_[1]).astype("float32")
        codes = np.searchsorted(self.classes_, np.asarray(y))
        one_hot = np.eye(len(self.classes_), dtype="float32")[codes]
        return Categorical(num_classes=len(self.classes_)), one_hot

    def _fit(self, X, y, sample_weight, callbacks):
        if len(self.classes_) > 2 and self.offset_col is not None:
            raise ValueError(
                "`offset_col` is not supported with more than two classes (an offset adds to "
                f"one predictor, the multinomial model has K - 1); y has {len(self.classes_)} "
                f"classes. Received: offset_col={self.offset_col!r}"
            )
        if len(self.classes_) > 2 and self.random_slopes:
            raise ValueError(
                "`random_slopes` are not supported with more than two classes (the "
                f"multinomial model has random intercepts only); y has {len(self.classes_)} "
                f"classes. Received: random_slopes={self.random_slopes!r}"
            )
        return super()._fit(X, y, sample_weight, callbacks)

    def _finishable(self, data, likelihood) -> bool:
        """K > 2 classes with a `scale_prior`: not finishable (the multinomial finish
        estimates sigma_kc as a point), so SGD alone; otherwise as for two classes."""
        if len(self.classes_) > 2 and self.scale_prior is not None:
            return False
        return super()._finishable(data, likelihood)

    def _finish_size(self, data):
        """K > 2 classes: the multinomial finish's size (`reffects.multinomial_finish`), K - 1
        terms per factor (one offset per class but the reference) and K - 1 coefficients
        per fixed effect."""
        num_levels, num_terms, num_fixed = super()._finish_size(data)
        if len(self.classes_) == 2:
            return num_levels, num_terms, num_fixed
        d = len(self.classes_) - 1
        return num_levels, [d * t for t in num_terms], d * num_fixed

    def _read_posteriors(self):
        if len(self.classes_) == 2:
            return super()._read_posteriors()
        # Whether the multinomial finish ran (for `inspection.summary`'s method line)
        self._multinomial_finished = isinstance(self.joint_posterior_, JointPosterior)
        self.joint_posterior_ = None  # K - 1 outputs, which its readers do not take
        self._read_multinomial_posteriors()

    def _read_multinomial_posteriors(self):
        """The fitted attributes of a K > 2 fit, from the layers' q, on the data's scale."""
        layers = mixed_model_layers(self.model_)
        shift, matrix, _ = self.data_scale()
        others = self.classes_[1:]
        alpha = keras.ops.convert_to_numpy(layers.intercept.intercept_loc)[None, :]
        if layers.fixed_effects is not None:
            beta = keras.ops.convert_to_numpy(layers.fixed_effects.kernel_loc)
        else:
            beta = np.zeros((0, len(others)))
        fixed = shift[:, None] + matrix @ np.vstack([alpha, beta]).astype("float64")
        self.intercept_ = np.concatenate([[0.0], fixed[0]])
        self.coef_ = np.vstack([np.zeros((1, fixed.shape[0] - 1)), fixed[1:].T])
        self.variance_components_ = {}
        self.random_effects_covariance_ = {}
        self.random_effects_ = {}
        class_index = pd.Index(others, name="class")
        for col, levels, layer in zip(self._group_keys, self._levels, layers.factors):
            sigma = keras.ops.convert_to_numpy(layer.group_scale()).astype("float64")
            self.variance_components_[col] = pd.Series(sigma, index=class_index, name="sd")
            self.random_effects_covariance_[col] = pd.DataFrame(
                np.diag(sigma**2), index=class_index, columns=class_index
            )
            posterior = layer.posterior()["offset"]
            mean = keras.ops.convert_to_numpy(posterior.mean()).astype("float64")[: len(levels)]
            sd = keras.ops.convert_to_numpy(posterior.stddev()).astype("float64")[: len(levels)]
            half_width = stats.norm.ppf(0.975) * sd
            table = pd.DataFrame(index=levels.rename(col))
            for c, label in enumerate(others):
                table[f"mean_{label}"] = mean[:, c]
                table[f"sd_{label}"] = sd[:, c]
                table[f"lower_{label}"] = mean[:, c] - half_width[:, c]
                table[f"upper_{label}"] = mean[:, c] + half_width[:, c]
            counts = keras.ops.convert_to_numpy(layer.group_counts).astype("int64")
            table["n"] = counts[: len(levels)]
            self.random_effects_[col] = table

    def _multinomial_logits(self, X):
        """(n, K) log odds against `classes_[0]` at the posterior means (first column 0)."""
        data = self._encode(X, reset=False)
        eta = predict_means(self.model_.network, data.model_inputs())
        eta = eta.reshape(len(data.features), len(self.classes_) - 1)
        return np.column_stack([np.zeros(len(eta)), eta])

    def predict_proba(self, X):
        """Class probabilities at the posterior means: shape (n, K), columns `classes_`;
        each row sums to 1 (K > 2: the softmax of `decision_function`, in float64)."""
        check_is_fitted(self, "model_")
        if len(self.classes_) > 2:
            return softmax(self._multinomial_logits(X), axis=1)
        p = self._posterior_mean_response(self._encode(X, reset=False))
        return np.column_stack([1.0 - p, p])

    def decision_function(self, X):
        """At the posterior means: two classes, the logit of P(y = classes_[1]), shape (n,);
        K > 2, the log odds of each class against `classes_[0]`, shape (n, K), first
        column 0 (scikit-learn's multinomial convention: the largest is the prediction)."""
        check_is_fitted(self, "model_")
        if len(self.classes_) > 2:
            return self._multinomial_logits(X)
        return predict_means(self.model_.network, self._encode(X, reset=False).model_inputs())

    def predict(self, X):
        """The most probable class of each row."""
        check_is_fitted(self, "model_")
        if len(self.classes_) > 2:
            return self.classes_[np.argmax(self._multinomial_logits(X), axis=1)]
        return self.classes_[(self.decision_function(X) > 0).astype(int)]


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
