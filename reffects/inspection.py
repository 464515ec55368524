"""Reading a fitted model: fixed effects, variance components, group effects and a summary.

Every function takes either a Keras model built from the layers of `reffects.layers` (an
`ELBOModel`, or any Keras model that contains them) or a fitted `RandomEffectsRegressor`.
An estimator's numbers are on the data's scale (it standardises features and y internally
and maps its posteriors back with the same affine map it uses for `coef_`); a Keras model's
are on the scale it was trained on.

Intervals are central intervals of the posteriors: Normal for the intercept, the fixed
effects and the group offsets (for an estimator, from the joint posterior its finish
computed, correlations included; for a bare Keras model, from the layers' mean-field q,
where the intercept's sd ignores its correlation with the offsets), LogNormal for a grouping
factor's scale when it has a hyperprior. A scale learned as a point estimate has no interval.

A grouping factor with random slopes (a `RandomEffects` layer) has one coefficient per term
per group: `(Intercept)`, then one per slope column. `variance_components` then has a row
per term and their correlations, `random_effects_covariance` the whole matrix,
`group_effects(..., term=...)` one term's table, and `posterior_draws` a term axis. An
estimator's are on the data's scale (the intercept at the slope columns' zero, as lme4's).

For the lme4 user: `summary` is `summary()`, `group_effects` is `ranef()` and
`variance_components` is `VarCorr()`. For the ArviZ user: `to_inference_data`.

A `RandomEffectsClassifier` of K > 2 classes (a multinomial model: the Laplace finish of
`reffects.multinomial_finish`, with a subnetwork's output held fixed, or SGD alone with a
`scale_prior` or past the finish's size limit) is read by
`summary`, `fixed_effects` and `variance_components`, with one row per class and term
(the class's log odds against `classes_[0]`) and marginal sds, and by `group_effects`
(`term=` a class); the other readers take units=1 models.
"""

import math
from dataclasses import dataclass
from statistics import NormalDist

import keras
import numpy as np
import pandas as pd

from reffects.joint_posterior import GroupsGivenFixedPosterior, JointPosterior
from reffects.layers import FixedEffects, GlobalIntercept, RandomEffects, RandomIntercept
from reffects.models import mixed_model_layers
from reffects.posteriors import normal_summary
from reffects.training import ELBOModel

INTERCEPT = "(Intercept)"
"""Row label of the global intercept, as in lme4 and statsmodels."""

RESIDUAL = "Residual"
"""Row label of the noise scale in `variance_components`."""


def _walk_layers(layer):
    """Every layer nested in `layer` (models inside models included), each once."""
    seen = set()
    stack = list(getattr(layer, "layers", []))[::-1]
    while stack:
        child = stack.pop()
        if id(child) in seen:
            continue
        seen.add(id(child))
        yield child
        stack.extend(list(getattr(child, "layers", []))[::-1])


def _is_estimator(obj) -> bool:
    return hasattr(obj, "get_params") and hasattr(obj, "fit")


def _estimator_feature_names(estimator) -> list:
    """Names of the fixed-effect columns: the estimator's `feature_names_` (X's non-group
    columns, categorical ones as their dummies `x[T.level]`, and `x[missing]` indicators),
    or, for an estimator without them, every column of X that is not a group column."""
    coded = getattr(estimator, "feature_names_", None)
    if coded is not None:
        return [str(name) for name in coded]
    groups = set(estimator.random_effects_)
    names = getattr(estimator, "feature_names_in_", None)
    if names is None:
        names = [f"x{j}" for j in range(estimator.n_features_in_)]
    return [str(name) for j, name in enumerate(names) if name not in groups and j not in groups]


_VARIATIONAL_LAYERS = (GlobalIntercept, FixedEffects, RandomIntercept, RandomEffects)
_GROUP_LAYERS = (RandomIntercept, RandomEffects)


class _Fit:
    """A fitted model seen through its variational layers, plus the map to the data's scale.

    `[intercept, *coef]` on the reported scale is `shift + matrix @ [alpha, *beta]`; group
    offsets, scales and the noise scale are `response_scale` times the layers'. A factor's
    coefficient vector (one entry per term) on the reported scale is `response_scale *
    term_map(key) @` the layer's.
    """

    def __init__(self, obj):
        self.estimator = obj if _is_estimator(obj) else None
        if self.estimator is not None:
            if not hasattr(obj, "model_"):
                raise ValueError(
                    f"This {type(obj).__name__} is not fitted yet; call `fit` before reading it."
                )
            model = obj.model_
        else:
            model = obj
        if not isinstance(model, keras.Model):
            raise TypeError(
                "Expected a Keras model built from reffects layers or a fitted "
                f"RandomEffectsRegressor. Received: {type(obj).__name__}"
            )
        self.model = model
        layers = list(_walk_layers(model))
        for layer in layers:
            if isinstance(layer, _VARIATIONAL_LAYERS):
                if layer.units != 1:
                    raise ValueError(
                        f"reffects.inspection reads layers with units=1; layer '{layer.name}' "
                        f"has units={layer.units}. Use its `posterior_summary()` instead."
                    )
                if not layer.built:
                    raise ValueError(f"Layer '{layer.name}' is not built; call the model first.")
        self.intercept = self._at_most_one(layers, GlobalIntercept)
        self.fixed = self._at_most_one(layers, FixedEffects)
        self.likelihood = getattr(model, "likelihood", None)
        if self.estimator is not None:
            keys = list(obj.random_effects_)
            self.factors = dict(zip(keys, mixed_model_layers(model).factors))
            self.levels = {key: obj.random_effects_[key].index for key in keys}
            self.shift, self.matrix, self.response_scale = obj.data_scale()
            self.term_names = [INTERCEPT, *_estimator_feature_names(obj)]
        else:
            factors = [layer for layer in layers if isinstance(layer, _GROUP_LAYERS)]
            self.factors = {layer.name: layer for layer in factors}
            self.levels = {
                layer.name: pd.RangeIndex(layer.num_groups, name="group") for layer in factors
            }
            self.term_names = [INTERCEPT] if self.intercept is not None else []
            if self.fixed is not None:
                num_features = self.fixed.kernel_loc.shape[0]
                self.term_names += [f"x{j}" for j in range(num_features)]
            self.shift = np.zeros(len(self.term_names))
            self.matrix = np.eye(len(self.term_names))
            self.response_scale = 1.0

    @staticmethod
    def _at_most_one(layers, kind):
        found = [layer for layer in layers if isinstance(layer, kind)]
        if len(found) > 1:
            raise ValueError(
                f"reffects.inspection reads models with at most one {kind.__name__} layer; "
                f"found {[layer.name for layer in found]}"
            )
        return found[0] if found else None

    def factor(self, factor):
        """The key of `factor` (None: the only one) among this fit's grouping factors."""
        if factor is None:
            if len(self.factors) != 1:
                raise ValueError(
                    f"`factor` must name one of the grouping factors {list(self.factors)}. "
                    "Received: factor=None"
                )
            return next(iter(self.factors))
        if factor not in self.factors:
            raise ValueError(
                f"`factor` must be one of the grouping factors {list(self.factors)}. "
                f"Received: factor={factor!r}"
            )
        return factor

    def terms(self, key) -> list:
        """Names of factor `key`'s terms: `["(Intercept)"]` for a random intercept; with
        slopes, the intercept and then the estimator's slope columns (for a bare
        `RandomEffects` layer, its `term_names` or `"(Intercept)", "slope_0", ...`)."""
        if self.estimator is not None:
            return list(self.estimator.random_effects_covariance_[key].index)
        layer = self.factors[key]
        if isinstance(layer, RandomIntercept):
            return [INTERCEPT]
        if layer.term_names is not None:
            return list(layer.term_names)
        slopes = [f"slope_{j}" for j in range(layer.num_slopes)]
        return [INTERCEPT, *slopes] if layer.intercept else slopes

    def term_index(self, key, term) -> int:
        """The position of `term` (a name; None: the first) among factor `key`'s terms."""
        names = self.terms(key)
        if term is None:
            return 0
        for j, name in enumerate(names):
            if term == name or str(term) == str(name):
                return j
        raise ValueError(
            f"`term` must be one of the terms {names} of the grouping factor {key!r}. "
            f"Received: term={term!r}"
        )

    def has_slopes(self, key) -> bool:
        return isinstance(self.factors[key], RandomEffects)

    def term_map(self, key) -> np.ndarray:
        """A: factor `key`'s coefficients on the reported scale are `response_scale * A @`
        the layer's (the estimator's own map; the identity for a Keras model)."""
        if self.estimator is not None:
            return self.estimator.term_scale(key)
        return np.eye(len(self.terms(key)))

    def covariance(self, key) -> np.ndarray:
        """Sigma_k, the prior covariance of a group's coefficients, on the reported scale
        (under a hyperprior, at the posterior mean of sigma_k)."""
        layer = self.factors[key]
        if isinstance(layer, RandomIntercept):
            sigma = float(keras.ops.convert_to_numpy(layer.group_scale())[0])
            covariance = np.array([[sigma * sigma]])
        else:
            covariance = keras.ops.convert_to_numpy(layer.covariance()).astype("float64")
        matrix = self.term_map(key)
        with np.errstate(over="ignore"):  # y on a scale near 1e200: the variances overflow
            return self.response_scale**2 * (matrix @ covariance @ matrix.T)

    def correlated(self, key) -> bool:
        """Whether factor `key` estimates correlations between its terms."""
        layer = self.factors[key]
        return isinstance(layer, RandomEffects) and layer.correlated and layer.num_terms > 1

    def linear_posterior(self):
        """Posterior mean and sd of [alpha, *beta] on the layers' scale."""
        locs, scales = [], []
        if self.intercept is not None:
            posterior = self.intercept.posterior()
            locs.append(keras.ops.convert_to_numpy(posterior.loc))
            scales.append(keras.ops.convert_to_numpy(posterior.scale))
        if self.fixed is not None:
            posterior = self.fixed.posterior()
            locs.append(keras.ops.convert_to_numpy(posterior.loc)[:, 0])
            scales.append(keras.ops.convert_to_numpy(posterior.scale)[:, 0])
        if not locs:
            return np.zeros(0), np.zeros(0)
        return (
            np.concatenate(locs).astype("float64"),
            np.concatenate(scales).astype("float64"),
        )

    def linear_covariance(self):
        """Posterior covariance of [alpha, *beta] on the layers' scale: the joint
        posterior's where an estimator's finish computed one, else q's (diagonal)."""
        joint = getattr(self.estimator, "joint_posterior_", None)
        if joint is not None:
            return joint.fixed_covariance()
        return np.diag(np.square(self.linear_posterior()[1]))

    def intercept_mean(self) -> float:
        """Posterior mean of the global intercept on the reported scale (0 without one)."""
        if self.intercept is None:
            return 0.0
        loc, _ = self.linear_posterior()
        return float(self.shift[0] + self.matrix[0] @ loc)

    def noise_scale(self):
        """The Gaussian noise scale on the reported scale, or None for other likelihoods."""
        if self.estimator is not None:
            return getattr(self.estimator, "noise_scale_", None)
        if self.likelihood is None or not hasattr(self.likelihood, "noise_scale"):
            return None
        return float(keras.ops.convert_to_numpy(self.likelihood.noise_scale()))

    def predict(self, X) -> np.ndarray:
        """The response mean at the posterior means (a classifier's P(y = classes_[1]))."""
        if self.estimator is not None:
            if hasattr(self.estimator, "classes_"):
                return np.asarray(self.estimator.predict_proba(X)[:, 1], dtype="float64")
            return np.asarray(self.estimator.predict(X), dtype="float64")
        return np.asarray(self.model.predict(X, verbose=0), dtype="float64").reshape(-1)

    def response(self, y) -> np.ndarray:
        """y as numbers on the scale of `predict`: a classifier's labels as 1 for
        `classes_[1]` and 0 for `classes_[0]`, anything else as given."""
        classes = getattr(self.estimator, "classes_", None)
        if classes is None:
            return _as_vector(y)
        labels = np.asarray(y)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise ValueError(f"y must be 1-dimensional. Received shape {labels.shape}")
        unknown = ~np.isin(labels, classes)
        if unknown.any():
            row = int(np.argmax(unknown))
            raise ValueError(
                f"y holds {labels.tolist()[row]!r} at row {row}, which is not one of the "
                f"classifier's classes_ {classes.tolist()}"
            )
        return (labels == classes[1]).astype("float64")

    def group_codes(self, key, X) -> np.ndarray:
        """Each row's index into `self.levels[key]`, -1 for a level not seen in training."""
        if self.estimator is not None:
            labels = X[key] if isinstance(X, pd.DataFrame) else np.asarray(X)[:, key]
            return self.levels[key].get_indexer(np.asarray(labels, dtype=object))
        if not isinstance(self.model, ELBOModel):
            raise ValueError(
                "Group statistics of a Keras model need the ELBOModel that was trained "
                "(to find which input feeds each RandomIntercept or RandomEffects). "
                f"Received: {type(self.model)}"
            )
        kind = type(self.factors[key]).__name__
        for layer, ids in self.model._group_ids_by_layer(X):
            if layer is self.factors[key]:
                if ids is None:
                    raise ValueError(
                        f"The ids of {kind} '{key}' are not an input of the network, "
                        "so their groups cannot be read from X."
                    )
                return self.factors[key].validate_ids(ids)
        raise ValueError(f"{kind} '{key}' is not in the model's network")


def _as_vector(y) -> np.ndarray:
    try:
        values = np.asarray(y, dtype="float64")
    except (TypeError, ValueError):
        raise ValueError(
            f"y must be numeric. Received dtype {np.asarray(y).dtype}; a classifier's labels "
            "are read through the fitted estimator (pass it, not its model_)"
        ) from None
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise ValueError(f"y must be 1-dimensional. Received shape {values.shape}")
    return values


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"`level` must be in (0, 1). Received: level={level}")
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def fixed_effects(obj, level: float = 0.95) -> pd.DataFrame:
    """The global intercept and linear fixed effects: posterior mean, sd and interval.

    Args:
        obj: a Keras model built from reffects layers, or a fitted `RandomEffectsRegressor`.
        level: probability mass of the central interval.

    Returns:
        A DataFrame indexed by term (`"(Intercept)"`, then the feature names; `x0`, `x1`, ...
        for a Keras model) with columns `mean`, `sd`, `lower` and `upper`.

    Example:
        >>> from reffects.models import build_mixed_model
        >>> model = build_mixed_model(num_features=2, num_groups=[3])
        >>> table = fixed_effects(model)
        >>> list(table.index), list(table.columns)
        (['(Intercept)', 'x0', 'x1'], ['mean', 'sd', 'lower', 'upper'])
    """
    if is_multinomial(obj):
        return _multinomial_fixed_effects(obj, level)
    fit = _Fit(obj)
    loc, _ = fit.linear_posterior()
    # The posterior is Normal, so an affine map of it is Normal with these moments.
    mean = fit.shift + fit.matrix @ loc
    sd = np.sqrt(np.diag(fit.matrix @ fit.linear_covariance() @ fit.matrix.T))
    frame = pd.DataFrame(normal_summary(mean, sd, level), index=fit.term_names)
    frame.index.name = "term"
    return frame


def variance_components(obj, level: float = 0.95) -> pd.DataFrame:
    """Standard deviations of the group offsets per factor, and of the noise (lme4's VarCorr).

    Args:
        obj: a Keras model built from reffects layers, or a fitted `RandomEffectsRegressor`.
        level: probability mass of the interval given for a scale with a hyperprior.

    Returns:
        A DataFrame indexed by factor, plus a `"Residual"` row for a Gaussian likelihood, with
        columns `sd` (sigma_k: the point estimate, or its posterior mean under a hyperprior),
        `variance`, `lower` and `upper` (the central interval of q(sigma_k) under a
        hyperprior, NaN for point estimates) and `groups` (levels seen in training).

        When a factor has random slopes, the index is `(factor, term)`, one row per term
        (a random intercept's term is `"(Intercept)"`, the residual's `""`), and a column
        `corr` holds each term's correlation with its factor's first term (the intercept),
        as the first column of lme4's `Corr`; NaN for the first term, for a random
        intercept and for independent terms. `random_effects_covariance` gives the whole
        matrix.

    Example:
        >>> from reffects.models import build_mixed_model
        >>> model = build_mixed_model(num_features=0, num_groups=[4], scale_prior="exponential")
        >>> table = variance_components(model)
        >>> list(table.index), list(table.columns)
        (['random_intercept_0', 'Residual'], ['sd', 'variance', 'lower', 'upper', 'groups'])
        >>> slopes = build_mixed_model(num_features=1, num_groups=[4], random_slopes=[[0]])
        >>> variance_components(slopes).index.tolist()
        [('random_effects_0', '(Intercept)'), ('random_effects_0', 'slope_0'), ('Residual', '')]
    """
    if is_multinomial(obj):
        return _multinomial_variance_components(obj, level)
    fit = _Fit(obj)
    z = _z(level)
    by_term = any(fit.has_slopes(key) for key in fit.factors)
    rows = {}
    for key, layer in fit.factors.items():
        counts = keras.ops.convert_to_numpy(layer.group_counts)[: len(fit.levels[key])]
        groups = int(np.sum(counts > 0))
        if isinstance(layer, RandomIntercept):
            sd = fit.response_scale * float(keras.ops.convert_to_numpy(layer.group_scale())[0])
            lower = upper = math.nan
            if layer.scale_prior is not None:
                q_sigma = layer.posterior()["group_scale"]
                mu = float(keras.ops.convert_to_numpy(q_sigma.loc)[0])
                s = float(keras.ops.convert_to_numpy(q_sigma.scale)[0])
                lower = fit.response_scale * math.exp(mu - z * s)
                upper = fit.response_scale * math.exp(mu + z * s)
            row = {"sd": sd, "lower": lower, "upper": upper, "groups": groups, "corr": math.nan}
            rows[(key, INTERCEPT) if by_term else key] = row
            continue
        for name, row in zip(fit.terms(key), _term_components(fit, key, z)):
            rows[(key, name)] = {**row, "groups": groups}
    noise = fit.noise_scale()
    if noise is not None:
        row = {"sd": noise, "lower": math.nan, "upper": math.nan, "groups": 0, "corr": math.nan}
        rows[(RESIDUAL, "") if by_term else RESIDUAL] = row
    columns = ["sd", "lower", "upper", "groups", *(["corr"] if by_term else [])]
    frame = pd.DataFrame(
        [[row[column] for column in columns] for row in rows.values()], columns=columns
    ).astype({"sd": "float64", "lower": "float64", "upper": "float64", "groups": "int64"})
    if by_term:
        frame.index = pd.MultiIndex.from_tuples(list(rows), names=["factor", "term"])
    else:
        frame.index = pd.Index(list(rows), name="factor")
    frame.insert(1, "variance", np.square(frame["sd"]))
    return frame


def _term_components(fit, key, z) -> list:
    """`variance_components`' rows (sd, lower, upper, corr) of a factor with slopes."""
    layer = fit.factors[key]
    covariance = fit.covariance(key)
    sd = np.sqrt(np.diag(covariance))
    lower = upper = np.full(len(sd), math.nan)
    matrix = fit.term_map(key)
    # q(sigma_j) maps to the reported scale only when A is diagonal (a bare layer; an
    # estimator's factor without correlated slopes, or without a random intercept).
    if layer.scale_prior is not None and np.count_nonzero(matrix - np.diag(np.diag(matrix))) == 0:
        q_sigma = layer.posterior()["group_scale"]
        mu = keras.ops.convert_to_numpy(q_sigma.loc).astype("float64")
        s = keras.ops.convert_to_numpy(q_sigma.scale).astype("float64")
        scale = fit.response_scale * np.abs(np.diag(matrix))
        lower, upper = scale * np.exp(mu - z * s), scale * np.exp(mu + z * s)
    corr = np.full(len(sd), math.nan)
    if fit.correlated(key):
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero sd: no correlation
            corr[1:] = covariance[1:, 0] / (sd[1:] * sd[0])
    return [
        {"sd": sd[j], "lower": lower[j], "upper": upper[j], "corr": corr[j]} for j in range(len(sd))
    ]


def random_effects_covariance(obj) -> dict:
    """Sigma_k per grouping factor: the covariance of a group's coefficients (lme4's VarCorr
    matrices), on the data's scale for an estimator.

    Args:
        obj: a Keras model built from reffects layers, or a fitted `RandomEffectsRegressor`.

    Returns:
        A dict factor -> DataFrame with the factor's terms as index and columns (1 x 1 for a
        random intercept); under a hyperprior, at the posterior mean of sigma_k. An
        estimator's equal its `random_effects_covariance_`.

    Example:
        >>> from reffects.models import build_mixed_model
        >>> model = build_mixed_model(num_features=1, num_groups=[4, 3], random_slopes=[[0], None])
        >>> {key: frame.shape for key, frame in random_effects_covariance(model).items()}
        {'random_effects_0': (2, 2), 'random_intercept_1': (1, 1)}
    """
    fit = _Fit(obj)
    return {
        key: pd.DataFrame(fit.covariance(key), index=fit.terms(key), columns=fit.terms(key))
        for key in fit.factors
    }


def residuals(obj, X, y) -> np.ndarray:
    """`y` minus the posterior-mean prediction for `X` (the response mean).

    For a `RandomEffectsClassifier`, y's labels count 1 for `classes_[1]` and 0 otherwise,
    and the prediction is P(y = classes_[1]).

    Args:
        obj: an `ELBOModel`, or a fitted `RandomEffectsRegressor` or `RandomEffectsClassifier`.
        X: the inputs, as given to `predict`.
        y: the response (or a classifier's labels), shape `(n,)` or `(n, 1)`.

    Returns:
        An array of shape `(n,)`.

    Example:
        >>> from reffects.models import build_mixed_model
        >>> model = build_mixed_model(num_features=0, num_groups=[2])
        >>> residuals(model, np.array([0, 1]), np.array([1.0, -1.0]))
        array([ 1., -1.])
    """
    fit = _Fit(obj)
    return fit.response(y) - fit.predict(X)


def group_effects(
    obj, factor=None, X=None, y=None, level: float = 0.95, *, term=None
) -> pd.DataFrame:
    """The group offsets of one grouping factor (lme4's `ranef()`), with group statistics.

    Groups with no training rows show their prior, Normal(0, sigma_k). Given the training
    data, two within-group statistics are added: `raw_mean`, the mean of y over the group's
    rows, and `unpooled`, the group's level (intercept + offset) estimated from its own rows
    alone, that is the within-group mean of `y - prediction + intercept + offset` with every
    other term held at its posterior mean. Partial pooling pulls `intercept + mean` from
    `unpooled` towards the intercept, the more so the smaller `n`.

    A factor with random slopes has one table per term. For a slope term (an estimator's),
    `unpooled` is the group's slope (fixed effect + offset) estimated from its own rows
    alone with every other term held at its posterior mean: the fixed effect plus the
    within-group least-squares slope through the origin of `y - prediction + offset * z` on
    the slope column z (NaN where z is 0 on every row); there is no `raw_mean`.

    Args:
        obj: a Keras model built from reffects layers (an `ELBOModel` when `X` is given), or
            a fitted `RandomEffectsRegressor`.
        factor: the grouping factor: a group column of the estimator, or the name of a
            `RandomIntercept` or `RandomEffects` layer; None when there is only one.
        X, y: optional training data, as given to `fit`, for `raw_mean` and `unpooled`.
        level: probability mass of the central interval.
        term: the term of a factor with random slopes: `"(Intercept)"` or a slope column
            (`"slope_0"`, ... or the layer's `term_names` for a Keras model); None: the
            first term (the intercept). For a classifier of K > 2 classes, a class after
            `classes_[0]` (its offsets on the log odds against `classes_[0]`); None: the
            first of them. Its tables take no X and y.

    Returns:
        A DataFrame indexed by level (group id for a Keras model) with columns `mean`, `sd`,
        `lower`, `upper`, `n` (training rows), and `raw_mean`, `unpooled` when `X`, `y` are
        given (NaN for groups without rows in `X`). For an estimator, `mean` and `sd` are
        `random_effects_[factor]`'s `mean`, `sd` (the intercept) or `mean_<term>`,
        `sd_<term>`.

    Example:
        >>> from reffects.models import build_mixed_model
        >>> model = build_mixed_model(num_features=0, num_groups=[3])
        >>> ids, y = np.array([0, 0, 1]), np.array([1.0, 3.0, -1.0])
        >>> model.get_layer("mixed_model").get_layer("random_intercept_0").adapt(ids)
        >>> table = group_effects(model, X=ids, y=y)
        >>> table["n"].tolist(), table["raw_mean"].tolist()
        ([2, 1, 0], [2.0, -1.0, nan])
    """
    if is_multinomial(obj):
        return _multinomial_group_effects(obj, factor, X, y, level, term)
    fit = _Fit(obj)
    key = fit.factor(factor)
    j = fit.term_index(key, term)
    name = fit.terms(key)[j]
    levels = fit.levels[key]
    if fit.estimator is not None:
        table = fit.estimator.random_effects_[key]
        suffix = "" if j == 0 and name == INTERCEPT else f"_{name}"
        frame = pd.DataFrame(
            {"mean": table[f"mean{suffix}"], "sd": table[f"sd{suffix}"]}, index=table.index
        )
        stats = normal_summary(frame["mean"], frame["sd"], level)
        frame["lower"], frame["upper"] = stats["lower"], stats["upper"]
        frame["n"] = table["n"]
    elif fit.has_slopes(key):
        summary = fit.factors[key].posterior_summary(level)
        frame = summary[summary["term"] == name].drop(columns="term").set_index("group")
    else:
        frame = fit.factors[key].posterior_summary(level)
    frame = frame[["mean", "sd", "lower", "upper", "n"]]
    if X is None and y is None:
        return frame
    if X is None or y is None:
        raise ValueError("Pass both X and y (the training data) for the group statistics.")
    slope = j > 0 or (fit.has_slopes(key) and not fit.factors[key].intercept)
    if slope and fit.estimator is None:
        raise ValueError(
            f"Group statistics of the slope term {name!r} are read through a fitted "
            "estimator (which knows each slope's column of X); pass it, or leave out X and y"
        )
    target = fit.response(y)
    codes = fit.group_codes(key, X)
    if len(codes) != len(target):
        raise ValueError(f"X has {len(codes)} rows but y has {len(target)}")
    offsets = frame["mean"].to_numpy()
    own_part = np.where(codes >= 0, offsets[np.maximum(codes, 0)], 0.0)
    frame = frame.copy()
    if slope:
        column = X[name] if isinstance(X, pd.DataFrame) else np.asarray(X)[:, name]
        z = np.asarray(column, dtype="float64")
        own = (target - fit.predict(X) + own_part * z) * z
        rows = pd.DataFrame({"code": codes, "zy": own, "zz": z * z})
        sums = rows[rows["code"] >= 0].groupby("code")[["zy", "zz"]].sum()
        sums = sums.reindex(range(len(levels)))
        loc, _ = fit.linear_posterior()
        fixed = fit.shift + fit.matrix @ loc
        coef = fixed[fit.term_names.index(str(name))]
        with np.errstate(divide="ignore", invalid="ignore"):
            frame["unpooled"] = coef + (sums["zy"] / sums["zz"]).to_numpy()
        return frame
    level_part = fit.intercept_mean() + own_part
    rows = pd.DataFrame({"code": codes, "y": target, "own": target - fit.predict(X) + level_part})
    means = rows[rows["code"] >= 0].groupby("code")[["y", "own"]].mean()
    frame["raw_mean"] = means["y"].reindex(range(len(levels))).to_numpy()
    frame["unpooled"] = means["own"].reindex(range(len(levels))).to_numpy()
    return frame


def posterior_draws(obj, num_draws: int = 1000, seed: int | None = None) -> dict:
    """Independent draws from the variational posterior, on the reported scale.

    Groups with no training rows are drawn from the prior Normal(0, sigma_k), with sigma_k
    drawn from q(sigma_k) under a hyperprior. Scales learned as point estimates (sigma_k
    without a hyperprior, the Gaussian noise scale) are repeated in every draw.

    Args:
        obj: a Keras model built from reffects layers, or a fitted `RandomEffectsRegressor`.
        num_draws: number of draws.
        seed: seed of the NumPy generator.

    Returns:
        A dict of arrays whose first axis is the draw: `intercept` `(num_draws,)`, `coef`
        `(num_draws, num_features)`, and per grouping factor k `offset_k`
        `(num_draws, num_levels)` and `sigma_k` `(num_draws,)`; `noise_scale` for a
        Gaussian likelihood. A factor with random slopes has a last axis of terms (in the
        order of `random_effects_covariance`): `offset_k` `(num_draws, num_levels,
        num_terms)`, each group's coefficients on the reported scale (an estimator's as its
        `random_effects_`: intercept at the slope columns' zero, slopes per unit of them),
        and `sigma_k` `(num_draws, num_terms)`, the sd of each term.

    Example:
        >>> from reffects.models import build_mixed_model
        >>> draws = posterior_draws(build_mixed_model(2, [3]), num_draws=5, seed=0)
        >>> {name: value.shape for name, value in draws.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'intercept': (5,), 'coef': (5, 2), 'offset_random_intercept_0': (5, 3),
         'sigma_random_intercept_0': (5,), 'noise_scale': (5,)}
    """
    if isinstance(num_draws, bool) or not isinstance(num_draws, (int, np.integer)) or num_draws < 1:
        raise ValueError(
            f"`num_draws` must be a positive integer. Received: num_draws={num_draws!r}"
        )
    fit = _Fit(obj)
    rng = np.random.default_rng(seed)
    draws = {}
    joint = getattr(fit.estimator, "joint_posterior_", None)
    if joint is not None:
        return _joint_draws(fit, joint, num_draws, rng)
    loc, scale = fit.linear_posterior()
    if loc.size:
        linear = loc + scale * rng.standard_normal((num_draws, loc.size))
        linear = fit.shift + linear @ fit.matrix.T
        if fit.intercept is not None:
            draws["intercept"] = linear[:, 0]
            linear = linear[:, 1:]
        if fit.fixed is not None:
            draws["coef"] = linear
    for key, layer in fit.factors.items():
        if isinstance(layer, RandomEffects):
            draws.update(_term_draws(fit, key, num_draws, rng))
            continue
        num_levels = len(fit.levels[key])
        posterior = layer.posterior()
        offset_loc = keras.ops.convert_to_numpy(posterior["offset"].loc)[:num_levels, 0]
        offset_scale = keras.ops.convert_to_numpy(posterior["offset"].scale)[:num_levels, 0]
        if layer.scale_prior is None:
            sigma = np.full(num_draws, float(keras.ops.convert_to_numpy(layer.group_scale())[0]))
        else:
            mu = float(keras.ops.convert_to_numpy(posterior["group_scale"].loc)[0])
            s = float(keras.ops.convert_to_numpy(posterior["group_scale"].scale)[0])
            sigma = np.exp(mu + s * rng.standard_normal(num_draws))
        noise = rng.standard_normal((num_draws, num_levels))
        offsets = offset_loc + offset_scale * noise
        unseen = keras.ops.convert_to_numpy(layer.group_counts)[:num_levels] == 0
        offsets[:, unseen] = sigma[:, None] * noise[:, unseen]
        name = str(key)
        draws[f"offset_{name}"] = fit.response_scale * offsets
        draws[f"sigma_{name}"] = fit.response_scale * sigma
    noise_scale = fit.noise_scale()
    if noise_scale is not None:
        draws["noise_scale"] = np.full(num_draws, noise_scale)
    return draws


def _term_draws(fit, key, num_draws, rng) -> dict:
    """`posterior_draws` of a `RandomEffects` layer's q (a bare Keras model's)."""
    layer = fit.factors[key]
    num_levels = len(fit.levels[key])
    posterior = layer.posterior()
    loc = keras.ops.convert_to_numpy(posterior["offset"].loc).astype("float64")[:num_levels]
    scale_tril = keras.ops.convert_to_numpy(posterior["offset"].scale.to_dense())
    scale_tril = scale_tril.astype("float64")[:num_levels]
    num_terms = loc.shape[-1]
    if layer.scale_prior is None:
        sigma = keras.ops.convert_to_numpy(layer.group_scale()).astype("float64")
        sigma = np.tile(sigma, (num_draws, 1))
    else:
        mu = keras.ops.convert_to_numpy(posterior["group_scale"].loc).astype("float64")
        s = keras.ops.convert_to_numpy(posterior["group_scale"].scale).astype("float64")
        sigma = np.exp(mu + s * rng.standard_normal((num_draws, num_terms)))
    noise = rng.standard_normal((num_draws, num_levels, num_terms))
    offsets = loc + np.einsum("gjk,sgk->sgj", scale_tril, noise)
    correlation = keras.ops.convert_to_numpy(layer.correlation()).astype("float64")
    values, vectors = np.linalg.eigh(correlation)  # a factor F F' = R, R singular or not
    root = vectors * np.sqrt(np.clip(values, 0.0, None))
    unseen = keras.ops.convert_to_numpy(layer.group_counts)[:num_levels] == 0
    prior_tril = sigma[:, :, None] * root  # (num_draws, terms, terms): the prior MVN(0, Sigma)
    offsets[:, unseen] = np.einsum("sjk,sgk->sgj", prior_tril, noise[:, unseen])
    matrix = fit.term_map(key)
    covariance = sigma[:, :, None] * correlation * sigma[:, None, :]
    term_variance = np.einsum("ij,sjk,ik->si", matrix, covariance, matrix)
    return {
        f"offset_{key}": fit.response_scale * np.einsum("ij,sgj->sgi", matrix, offsets),
        f"sigma_{key}": fit.response_scale * np.sqrt(term_variance),
    }


def _joint_draws(fit, joint, num_draws, rng) -> dict:
    """`posterior_draws` from an estimator's joint posterior (its correlations kept)."""
    fixed, offsets = joint.sample(num_draws, rng)
    linear = fit.shift + fixed @ fit.matrix.T
    draws = {"intercept": linear[:, 0]}
    if fit.fixed is not None:
        draws["coef"] = linear[:, 1:]
    for k, (key, layer) in enumerate(fit.factors.items()):
        group_draws = offsets[k][:, : len(fit.levels[key])]
        if isinstance(layer, RandomEffects):
            # Each draw of a group's coefficients on the model's scale, mapped as
            # `random_effects_` is: response_scale * A @ b.
            matrix = fit.term_map(key)
            group_draws = np.einsum("ij,sgj->sgi", matrix, group_draws)
            sd = np.sqrt(np.diag(fit.covariance(key)))
            draws[f"offset_{key}"] = fit.response_scale * group_draws
            draws[f"sigma_{key}"] = np.tile(sd, (num_draws, 1))
            continue
        sigma = float(keras.ops.convert_to_numpy(layer.group_scale())[0])
        if group_draws.shape[-1] == 1:  # a random intercept: (num_draws, groups)
            group_draws = group_draws[..., 0]
        draws[f"offset_{key}"] = fit.response_scale * group_draws
        draws[f"sigma_{key}"] = np.full(num_draws, fit.response_scale * sigma)
    noise_scale = fit.noise_scale()
    if noise_scale is not None:
        draws["noise_scale"] = np.full(num_draws, noise_scale)
    return draws


def to_inference_data(obj, num_draws: int = 1000, num_chains: int = 4, seed: int | None = None):
    """The draws of `posterior_draws` as an `arviz.InferenceData`.

    Needs ArviZ (`pip install reffects[arviz]`). The independent draws are split into
    `num_chains` chains so that ArviZ's diagnostics that want several chains run (`r_hat` is
    then 1 up to noise, and the effective sample size about the number of draws).
    Dimensions: `feature` for `coef` (the feature names as coordinates) and one per grouping
    factor for its offsets (the levels as coordinates); a factor k with random slopes adds
    `k_term` (its term names) to `offset_k` and `sigma_k`.

    Args:
        obj: a Keras model built from reffects layers, or a fitted `RandomEffectsRegressor`.
        num_draws: draws per chain.
        num_chains: number of chains.
        seed: seed of the NumPy generator.

    Returns:
        An `arviz.InferenceData` with a `posterior` group.

    Example:
        >>> from reffects.models import build_mixed_model
        >>> idata = to_inference_data(build_mixed_model(2, [3]), num_draws=10, seed=0)
        >>> dict(idata.posterior.sizes)  # doctest: +NORMALIZE_WHITESPACE
        {'chain': 4, 'draw': 10, 'feature': 2, 'random_intercept_0': 3}
    """
    try:
        import arviz
    except ImportError as error:
        raise ImportError(
            "to_inference_data needs ArviZ; install it with `pip install reffects[arviz]`."
        ) from error
    if (
        isinstance(num_chains, bool)
        or not isinstance(num_chains, (int, np.integer))
        or num_chains < 1
    ):
        raise ValueError(
            f"`num_chains` must be a positive integer. Received: num_chains={num_chains!r}"
        )
    fit = _Fit(obj)
    draws = posterior_draws(obj, num_draws=num_chains * num_draws, seed=seed)
    coords, dims = {}, {}
    if "coef" in draws:
        names = fit.term_names[1:] if fit.intercept is not None else fit.term_names
        coords["feature"] = names
        dims["coef"] = ["feature"]
    for key in fit.factors:
        coords[str(key)] = np.asarray(fit.levels[key])
        dims[f"offset_{key}"] = [str(key)]
        if fit.has_slopes(key):
            coords[f"{key}_term"] = [str(name) for name in fit.terms(key)]
            dims[f"offset_{key}"].append(f"{key}_term")
            dims[f"sigma_{key}"] = [f"{key}_term"]
    posterior = {
        name: value.reshape(num_chains, num_draws, *value.shape[1:])
        for name, value in draws.items()
    }
    return arviz.from_dict(posterior=posterior, coords=coords, dims=dims)


def _text_table(columns: dict, left=(), headers=None) -> list:
    """Lines of a plain table, one space in front as in R's print: text left, numbers right.

    `headers` (one per column) replace the column keys in the first line."""
    headers = list(columns) if headers is None else list(headers)
    widths = {
        name: max(len(header), *map(len, values))
        for header, (name, values) in zip(headers, columns.items())
    }
    rows = [headers] + [list(row) for row in zip(*columns.values())]
    return [
        " "
        + " ".join(
            cell.ljust(widths[name]) if name in left else cell.rjust(widths[name])
            for name, cell in zip(columns, row)
        ).rstrip()
        for row in rows
    ]


def factors(obj) -> list:
    """The names of the grouping factors: the estimator's group columns, or layer names.

    Example:
        >>> from reffects.models import build_mixed_model
        >>> factors(build_mixed_model(num_features=1, num_groups=[3, 4]))
        ['random_intercept_0', 'random_intercept_1']
    """
    if is_multinomial(obj):
        return list(obj.random_effects_)
    return list(_Fit(obj).factors)


def training_history(obj):
    """The per-epoch metrics (`loss`, `nll`, `kl`, ...) of the last `fit`, or None.

    Args:
        obj: a fitted `RandomEffectsRegressor`, a Keras model after `fit`, or the `History`
            that `fit` returned.

    Example:
        >>> from reffects.models import build_mixed_model
        >>> training_history(build_mixed_model(num_features=1, num_groups=[3])) is None
        True
    """
    if _is_estimator(obj):
        return getattr(obj, "history_", None)
    history = getattr(obj, "history", None)
    if isinstance(history, dict):
        return history
    return getattr(history, "history", None)


@dataclass
class Summary:
    """What `summary` returns: its tables as attributes, an lme4-like text as `str()`.

    Attributes:
        family: the likelihood's name, e.g. `"gaussian"`.
        num_examples: training rows N, or None if unknown.
        last_epoch: the last epoch's `loss`, `nll` and `kl` (per training example, on the
            training scale), or None without a history.
        fixed_effects: the table of `fixed_effects`.
        variance_components: the table of `variance_components`.
        residual_quantiles: min, quartiles and max of the residuals (divided by the noise
            scale for a Gaussian likelihood), or None without data.
        subnetwork_weights: number of point-estimate weights outside the variational layers.
        level: the interval level of the tables.
        method: how the posterior was fitted, for the header.
        correlations: factor -> the correlation matrix of its terms (a DataFrame), for each
            factor with correlated random slopes; printed as lme4's `Corr`.
    """

    family: str
    num_examples: int | None
    last_epoch: dict | None
    fixed_effects: pd.DataFrame
    variance_components: pd.DataFrame
    residual_quantiles: pd.Series | None
    subnetwork_weights: int
    level: float
    method: str = "variational inference (mean-field, ELBO)"
    correlations: dict | None = None

    def __str__(self) -> str:
        lower = f"{50 * (1 - self.level):.3g} %"
        upper = f"{100 - 50 * (1 - self.level):.3g} %"
        lines = [
            f"Bayesian mixed model fit by {self.method}",
            f" Family: {self.family}",
        ]
        if self.subnetwork_weights:
            lines.append(f" Subnetwork f(x): {self.subnetwork_weights} point-estimate weights")
        if self.last_epoch:
            loss = self.last_epoch
            lines += [
                "",
                "ELBO per training example at the last epoch (training scale): "
                f"{-loss['loss']:.4f} "
                f"(NLL {loss['nll']:.4f}, KL / N {loss['kl']:.4f})",
            ]
        if self.residual_quantiles is not None:
            quantiles = self.residual_quantiles.to_frame().T.to_string(
                index=False, float_format="{:.4f}".format
            )
            title = (
                "Scaled residuals:"
                if "Residual" in self.variance_components.index
                else ("Residuals:")
            )
            lines += ["", title, quantiles]

        components = self.variance_components
        if isinstance(components.index, pd.MultiIndex):
            factor_names = list(components.index.get_level_values(0))
            term_names = [str(term) for term in components.index.get_level_values(1)]
        else:
            factor_names = list(components.index)
            term_names = ["" if name == RESIDUAL else INTERCEPT for name in factor_names]
        first_rows = [i == 0 or factor_names[i - 1] != name for i, name in enumerate(factor_names)]
        columns = {
            "Groups": [str(name) if first else "" for name, first in zip(factor_names, first_rows)],
            "Name": term_names,
            "Variance": [f"{v:.4f}" for v in components["variance"]],
            "Std.Dev.": [f"{v:.4f}" for v in components["sd"]],
        }
        if components[["lower", "upper"]].notna().any(axis=None):
            for column, label in (("lower", lower), ("upper", upper)):
                columns[label] = ["" if np.isnan(v) else f"{v:.4f}" for v in components[column]]
        headers = list(columns)
        columns.update(_correlation_columns(self.correlations or {}, factor_names, term_names))
        headers += ["Corr" if j == 0 else "" for j in range(len(columns) - len(headers))]
        groups = [
            f"{name}, {count}"
            for name, count, first in zip(factor_names, components["groups"], first_rows)
            if first and name != RESIDUAL
        ]
        lines += ["", "Random effects:"]
        if len(components):
            lines += _text_table(columns, left=("Groups", "Name"), headers=headers)
        observations = "unknown" if self.num_examples is None else str(self.num_examples)
        lines.append(f"Number of obs: {observations}, groups:  {'; '.join(groups) or 'none'}")

        fixed = self.fixed_effects.rename(
            columns={"mean": "Estimate", "sd": "Post.SD", "lower": lower, "upper": upper}
        )
        fixed.index.name = None
        lines += ["", "Fixed effects:"]
        if len(fixed):
            lines.append(fixed.to_string(float_format="{:.4f}".format))
        return "\n".join(lines)

    __repr__ = __str__


def _correlation_columns(correlations: dict, factor_names: list, term_names: list) -> dict:
    """lme4's `Corr` columns: on the row of a factor's term j, its correlations with the
    terms before it, two decimals."""
    width = max((len(matrix) - 1 for matrix in correlations.values()), default=0)
    columns = {f"corr_{c}": [""] * len(factor_names) for c in range(width)}
    for row, (factor, term) in enumerate(zip(factor_names, term_names)):
        matrix = correlations.get(factor)
        if matrix is None:
            continue
        j = [str(name) for name in matrix.index].index(term)
        for c in range(j):
            value = matrix.iloc[j, c]
            columns[f"corr_{c}"][row] = "" if np.isnan(value) else f"{value:.2f}"
    return columns


def summary(obj, X=None, y=None, level: float = 0.95) -> Summary:
    """A readable overview of a fitted model, laid out like lme4's `summary()`.

    Args:
        obj: a Keras model built from reffects layers (an `ELBOModel` when `X` is given), or
            a fitted `RandomEffectsRegressor`.
        X, y: optional training data, for the residual quantiles.
        level: probability mass of the intervals.

    Returns:
        A `Summary`; `print` it for the text, or read its tables.

    Example:
        >>> from reffects.models import build_mixed_model
        >>> print(summary(build_mixed_model(num_features=1, num_groups=[3])))
        Bayesian mixed model fit by variational inference (mean-field, ELBO)
         Family: gaussian
        <BLANKLINE>
        Random effects:
         Groups             Name        Variance Std.Dev.
         random_intercept_0 (Intercept)   1.0000   1.0000
         Residual                         1.0000   1.0000
        Number of obs: unknown, groups:  random_intercept_0, 0
        <BLANKLINE>
        Fixed effects:
                     Estimate  Post.SD   2.5 %  97.5 %
        (Intercept)    0.0000   0.0100 -0.0196  0.0196
        x0             0.0000   0.0100 -0.0196  0.0196
    """
    if is_multinomial(obj):
        return _multinomial_summary(obj, X, y, level)
    fit = _Fit(obj)
    excluded = {
        id(weight)
        for layer in _walk_layers(fit.model)
        if isinstance(layer, _VARIATIONAL_LAYERS) or layer is fit.likelihood
        for weight in layer.weights
    }
    subnetwork = sum(
        int(np.prod(weight.shape))
        for weight in fit.model.trainable_weights
        if id(weight) not in excluded
    )
    size = getattr(fit.model, "training_size", None)
    num_examples = None
    if size is not None and float(keras.ops.convert_to_numpy(size)) > 0:
        num_examples = int(keras.ops.convert_to_numpy(size))
    elif getattr(fit.model, "num_examples", None) is not None:  # stated, or a fit without SGD
        num_examples = int(fit.model.num_examples)
    history = training_history(obj)
    last_epoch = None
    if history and all(name in history for name in ("loss", "nll", "kl")):
        last_epoch = {name: float(history[name][-1]) for name in ("loss", "nll", "kl")}
    components = variance_components(obj, level)
    quantiles = None
    if X is not None or y is not None:
        if X is None or y is None:
            raise ValueError("Pass both X and y (the training data) for the residuals.")
        values = residuals(obj, X, y)
        noise = fit.noise_scale()
        if noise is not None:
            values = values / noise
        quantiles = pd.Series(
            np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0]),
            index=["Min", "1Q", "Median", "3Q", "Max"],
        )
    family = type(fit.likelihood).__name__.lower() if fit.likelihood is not None else "unknown"
    return Summary(
        family=family,
        num_examples=num_examples,
        last_epoch=last_epoch,
        fixed_effects=fixed_effects(obj, level),
        variance_components=components,
        residual_quantiles=quantiles,
        subnetwork_weights=subnetwork,
        level=level,
        method=_fit_method(obj),
        correlations=_correlations(fit),
    )


def _correlations(fit) -> dict:
    """Factor -> correlation matrix of its terms, for the factors with correlated slopes."""
    result = {}
    for key in fit.factors:
        if not fit.correlated(key):
            continue
        covariance = fit.covariance(key)
        sd = np.sqrt(np.diag(covariance))
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero sd: no correlation
            matrix = covariance / np.outer(sd, sd)
        result[key] = pd.DataFrame(matrix, index=fit.terms(key), columns=fit.terms(key))
    return result


def _fit_method(obj) -> str:
    """The header's account of how an estimator or a Keras model was fitted: an estimator
    without a subnetwork runs no SGD unless asked (`epochs`), and then its history is
    empty. A multinomial fit (K > 2 classes) keeps no `joint_posterior_`; it records whether
    its Laplace finish ran (with or without a subnetwork's output held)."""
    sgd = bool(getattr(obj, "history_", None))
    if is_multinomial(obj) and getattr(obj, "_multinomial_finished", False):
        laplace = "a Laplace approximation with beta at its joint mode (glmer's nAGQ = 0)"
        return f"SGD on the ELBO, then {laplace}" if sgd else f"{laplace}, no SGD"
    joint = getattr(obj, "joint_posterior_", None)
    if not isinstance(joint, (JointPosterior, GroupsGivenFixedPosterior)):
        return Summary.method  # SGD alone: the variational posterior
    if getattr(obj, "family", "bernoulli") == "gaussian":
        criterion = "REML" if obj.reml else "ML"
        if obj.scale_prior is not None:  # the sds at their posterior mode
            criterion += " with scale priors"
        posterior = ("exact joint posterior", "joint posterior")
        if isinstance(joint, GroupsGivenFixedPosterior):  # `sparse_finish`
            posterior = ("sparse Cholesky; offsets independent given beta",) * 2
        if not sgd:
            return f"lme4's {criterion} ({posterior[0]}), no SGD"
        return f"SGD on the ELBO, then lme4's {criterion} finish ({posterior[1]})"
    if not sgd:
        return "glmer's Laplace approximation (joint posterior), no SGD"
    return "SGD on the ELBO, then glmer's Laplace finish (joint posterior)"


def is_multinomial(obj) -> bool:
    """Whether `obj` is a fitted `RandomEffectsClassifier` of more than two classes (whose
    offsets and fixed effects come one set per class after `classes_[0]`).

    Example:
        >>> from reffects import RandomEffectsClassifier
        >>> is_multinomial(RandomEffectsClassifier(group_cols=["g"]))  # not fitted
        False
    """
    return _is_estimator(obj) and hasattr(obj, "model_") and len(getattr(obj, "classes_", ())) > 2


def _multinomial_fixed_effects(estimator, level) -> pd.DataFrame:
    """`fixed_effects` of a multinomial classifier: rows (class, term) for the classes after
    `classes_[0]`, from the mean-field q mapped to the data's scale."""
    layers = mixed_model_layers(estimator.model_)
    posterior = layers.intercept.posterior()
    loc = [keras.ops.convert_to_numpy(posterior.loc)[None, :]]
    scale = [keras.ops.convert_to_numpy(posterior.scale)[None, :]]
    if layers.fixed_effects is not None:
        posterior = layers.fixed_effects.posterior()
        loc.append(keras.ops.convert_to_numpy(posterior.loc))
        scale.append(keras.ops.convert_to_numpy(posterior.scale))
    loc, scale = np.vstack(loc).astype("float64"), np.vstack(scale).astype("float64")
    shift, matrix, _ = estimator.data_scale()
    terms = [INTERCEPT, *_estimator_feature_names(estimator)]
    frames = []
    for c, label in enumerate(estimator.classes_[1:].tolist()):
        sd = np.sqrt(np.einsum("ij,j,ij->i", matrix, np.square(scale[:, c]), matrix))
        frame = pd.DataFrame(normal_summary(shift + matrix @ loc[:, c], sd, level))
        frame.index = pd.MultiIndex.from_product([[label], terms], names=["class", "term"])
        frames.append(frame)
    return pd.concat(frames)


def _multinomial_variance_components(estimator, level) -> pd.DataFrame:
    """`variance_components` of a multinomial classifier: rows (factor, class), sigma of
    each class's offsets (an interval under a hyperprior), as the estimator's attribute."""
    z = _z(level)
    rows, index = [], []
    factors = mixed_model_layers(estimator.model_).factors
    for key, layer in zip(estimator.random_effects_, factors):
        counts = keras.ops.convert_to_numpy(layer.group_counts)
        groups = int(np.sum(counts[: len(estimator.random_effects_[key])] > 0))
        sigma = keras.ops.convert_to_numpy(layer.group_scale()).astype("float64")
        lower = upper = np.full(len(sigma), math.nan)
        if layer.scale_prior is not None:
            q_sigma = layer.posterior()["group_scale"]
            mu = keras.ops.convert_to_numpy(q_sigma.loc).astype("float64")
            s = keras.ops.convert_to_numpy(q_sigma.scale).astype("float64")
            lower, upper = np.exp(mu - z * s), np.exp(mu + z * s)
        for c, label in enumerate(estimator.classes_[1:].tolist()):
            index.append((key, label))
            rows.append([sigma[c], lower[c], upper[c], groups, math.nan])
    columns = ["sd", "lower", "upper", "groups", "corr"]
    frame = pd.DataFrame(rows, columns=columns).astype(
        {"sd": "float64", "lower": "float64", "upper": "float64", "groups": "int64"}
    )
    frame.index = pd.MultiIndex.from_tuples(index, names=["factor", "class"])
    frame.insert(1, "variance", np.square(frame["sd"]))
    return frame


def _multinomial_group_effects(estimator, factor, X, y, level, term) -> pd.DataFrame:
    """`group_effects` of a multinomial classifier: one class's offsets (`term`, a class
    after `classes_[0]`; None: the first), each group's log odds against `classes_[0]`."""
    keys = list(estimator.random_effects_)
    if factor is None and len(keys) != 1 or factor is not None and factor not in keys:
        raise ValueError(
            f"`factor` must be one of the grouping factors {keys}. Received: factor={factor!r}"
        )
    key = keys[0] if factor is None else factor
    others = estimator.classes_[1:].tolist()
    label = others[0] if term is None else term
    if label not in others:
        raise ValueError(
            f"`term` must be one of the classes {others} (a class's offsets on its log odds "
            f"against {estimator.classes_.tolist()[0]!r}) or None. Received: term={term!r}"
        )
    if X is not None or y is not None:
        raise ValueError(
            "group statistics from X and y (`raw_mean`, `unpooled`) are defined for one "
            "predictor; a multinomial model has one per class: leave out X and y"
        )
    table = estimator.random_effects_[key]
    summary = normal_summary(table[f"mean_{label}"], table[f"sd_{label}"], level)
    frame = pd.DataFrame(summary, index=table.index)
    frame["n"] = table["n"]
    return frame[["mean", "sd", "lower", "upper", "n"]]


def _multinomial_summary(estimator, X, y, level) -> Summary:
    """`summary` of a multinomial classifier (no residuals: they are not defined)."""
    if X is not None or y is not None:
        raise ValueError(
            "summary of a classifier with more than two classes reports no residuals; call "
            "summary(estimator) without X and y"
        )
    model = estimator.model_
    excluded = {
        id(weight)
        for layer in _walk_layers(model)
        if isinstance(layer, _VARIATIONAL_LAYERS) or layer is model.likelihood
        for weight in layer.weights
    }
    history = training_history(estimator)
    last_epoch = None
    if history and all(name in history for name in ("loss", "nll", "kl")):
        last_epoch = {name: float(history[name][-1]) for name in ("loss", "nll", "kl")}
    reference = estimator.classes_.tolist()[0]
    return Summary(
        family=f"categorical (log odds against the reference class {reference!r})",
        num_examples=int(keras.ops.convert_to_numpy(model.training_size)) or None,
        last_epoch=last_epoch,
        fixed_effects=_multinomial_fixed_effects(estimator, level),
        variance_components=_multinomial_variance_components(estimator, level),
        residual_quantiles=None,
        subnetwork_weights=sum(
            int(np.prod(w.shape)) for w in model.trainable_weights if id(w) not in excluded
        ),
        level=level,
        method=_fit_method(estimator),
    )
