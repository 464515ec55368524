"""Missing feature values as latent variables: the model's columns jointly Normal.

    x_i ~ Normal(mu, Sigma)      (every model column but the missing indicators)
    x_i,missing | x_i,observed ~ Normal(m_i, C_i)

`GaussianImputer.fit` estimates mu and Sigma by EM on the training rows, which is maximum
likelihood when values are missing at random (whether a value is missing may depend on the
row's observed columns). `fill` replaces each missing value by its conditional mean m_i
given the row's observed columns (a regression on them, not the column's mean), and
`latent_rows` gives each row's conditional covariance C_i, from which the estimators draw
the missing inputs in a binomial or Poisson model's predictive draws
(`latent_predictor_draws`), and which sets a Gaussian row's noise when its pattern of
missing columns was not seen in fit (`latent_predictor_variance`): a prediction's interval
widens by what its missing inputs leave unknown. The conditionals come from the precision matrix
Lambda = Sigma^-1: m = mu_m - Lambda_mm^-1 Lambda_mo (x_o - mu_o), C = Lambda_mm^-1, so a
step costs one p x p inversion plus one small solve per pattern of missing columns.

Example:
    >>> rng = np.random.default_rng(0)
    >>> x2 = rng.normal(size=2000)
    >>> x1 = 0.8 * x2 + 0.6 * rng.normal(size=2000)
    >>> values = np.column_stack([x1, x2])
    >>> values[:500, 0] = np.nan
    >>> imputer = GaussianImputer.fit(values, latent_columns=[0])
    >>> filled, latent = imputer.fill(values)
    >>> round(float(filled[0, 0] / values[0, 1]), 1), latent[:2].tolist()  # E[x1 | x2] = 0.8 x2
    (0.8, [[True, False], [True, False]])
    >>> [(rows.size, columns.tolist(), covariance.round(2).tolist())
    ...  for rows, columns, covariance in imputer.latent_rows(latent)]  # Var(x1 | x2) = 0.36
    [(500, [0], [[0.36]])]
"""

import warnings

import numpy as np
from scipy import special

MAX_EM_ITERATIONS = 200
EM_TOLERANCE = 1e-7
"""EM stops when no entry of mu or Sigma, on the columns' own scale (each divided by its sd
under the current Sigma), moves by more than this in an iteration."""
_RIDGE = 1e-8
"""Added to the diagonal of the standardised Sigma before inverting it: collinear columns
(a categorical's dummies with an intercept-like sum, a copy of a column) stay invertible."""


class GaussianImputer:
    """A joint Normal(mu, Sigma) over the model's columns, for filling missing values with
    their conditional means and reading their conditional covariances.

    Args:
        mean: `(q,)` mu of the modelled `columns`, on their own scale.
        covariance: `(q, q)` Sigma.
        columns: the `q` model columns modelled jointly (positions in a row of the model's
            columns); the others (missing indicators) are never read.
        latent_columns: the model columns that may be missing (among `columns`); the
            others are read, never filled.
        iterations: the EM iterations the fit took.
    """

    def __init__(self, mean, covariance, columns, latent_columns, iterations=0):
        self.mean = np.asarray(mean, "float64")
        self.covariance = np.asarray(covariance, "float64")
        self.columns = np.asarray(columns, "int64")
        self.latent_columns = np.asarray(latent_columns, "int64")
        self.iterations = int(iterations)
        scale = np.sqrt(np.maximum(np.diag(self.covariance), 0.0))
        self._scale = np.where(scale > 0.0, scale, 1.0)
        standardised = self.covariance / np.outer(self._scale, self._scale)
        standardised[np.diag_indices_from(standardised)] += _RIDGE
        self._precision = np.linalg.inv(standardised)  # of the standardised columns

    @classmethod
    def fit(cls, values, latent_columns, sample_weight=None, columns=None) -> "GaussianImputer":
        """mu and Sigma by EM from `values` (`(n, p)`, NaN where missing, only in
        `latent_columns`), each row counted `sample_weight` times (a row of weight 0 not
        at all). `columns` (default all) are the columns modelled jointly: the others
        (missing indicators) are left out and never read."""
        values = np.asarray(values, "float64")
        columns = np.arange(values.shape[1]) if columns is None else np.asarray(columns, "int64")
        weight = np.ones(len(values)) if sample_weight is None else np.asarray(sample_weight)
        counted = weight > 0
        rows, weight = values[counted][:, columns], weight[counted].astype("float64")
        missing = np.isnan(rows)
        total = weight.sum()
        # A column never observed starts (and, having no data, stays) at mean 0, sd 1,
        # uncorrelated: its fill is 0, a constant.
        observed_weight = weight @ ~missing
        seen = np.maximum(observed_weight, 1e-300)
        shift = np.nansum(weight[:, None] * rows, axis=0) / seen
        rows = rows - shift  # EM works on columns centred at their observed means
        variance = (weight @ np.square(np.where(missing, 0.0, rows))) / seen
        variance = np.where((observed_weight > 0) & (variance > 0.0), variance, 1.0)
        model = cls(np.zeros(len(columns)), np.diag(variance), columns, latent_columns)
        # Only the latent columns change between iterations: the cross-products of the
        # others are computed once, those of the latent ones each time (n x |L| x p).
        latent = np.flatnonzero(missing.any(axis=0))
        gram = (np.where(missing, 0.0, rows).T * weight) @ np.where(missing, 0.0, rows)
        groups = _missing_patterns(missing)
        for iteration in range(1, MAX_EM_ITERATIONS + 1):
            filled = model._fill_modelled(rows, missing, groups)
            new_mean = weight @ filled / total
            part = (filled[:, latent].T * weight) @ filled
            gram[latent, :] = part
            gram[:, latent] = part.T
            new_covariance = gram / total - np.outer(new_mean, new_mean)
            for pattern_rows, pattern in groups:
                share = weight[pattern_rows].sum() / total
                new_covariance[np.ix_(pattern, pattern)] += share * model._conditional(pattern)
            scale = model._scale
            moved = max(
                np.max(np.abs(new_mean - model.mean) / scale),
                np.max(np.abs(new_covariance - model.covariance) / np.outer(scale, scale)),
            )
            model = cls(new_mean, new_covariance, columns, latent_columns, iteration)
            if moved <= EM_TOLERANCE:
                return cls(new_mean + shift, new_covariance, columns, latent_columns, iteration)
        warnings.warn(
            f"the missing-value model (a joint Normal of the feature columns, fitted by EM) "
            f"moved by {moved:.2g} in its last of {MAX_EM_ITERATIONS} iterations; its fills "
            "are used as they are",
            UserWarning,
            stacklevel=3,
        )
        return cls(model.mean + shift, model.covariance, columns, latent_columns, iteration)

    def fill(self, values):
        """`(filled, latent)`: a copy of `values` with each NaN in the latent columns
        replaced by its conditional mean given the row's observed columns, and the mask
        of the entries filled. NaN in another column is left for the caller."""
        values = np.array(values, dtype="float64")
        latent = np.zeros(values.shape, dtype=bool)
        latent[:, self.latent_columns] = np.isnan(values[:, self.latent_columns])
        rows = np.flatnonzero(latent.any(axis=1))  # only these change
        if rows.size:
            block = np.ix_(rows, self.columns)
            values[block] = self._fill_modelled(values[block], latent[block])
        return values, latent

    def latent_rows(self, latent):
        """Per pattern of missing columns in the mask `latent` (as `fill` returns it):
        `(rows, columns, C)`, the rows with that pattern, its columns (the model's
        positions) and their conditional covariance given the rest of the row."""
        for rows, pattern, conditional in self._patterns(latent[:, self.columns]):
            yield rows, self.columns[pattern], conditional

    def _fill_modelled(self, rows, missing, groups=None):
        """The modelled columns `rows` with their `missing` entries at the conditional
        means (`groups`: `_missing_patterns(missing)`, if already known)."""
        filled = np.where(missing, 0.0, rows)
        for pattern_rows, pattern in _missing_patterns(missing) if groups is None else groups:
            standard = (filled[pattern_rows] - self.mean) / self._scale
            cross = self._precision[pattern].copy()
            cross[:, pattern] = 0.0  # the observed columns only
            block = self._precision[np.ix_(pattern, pattern)]
            shift = -np.linalg.solve(block, cross @ standard.T).T
            filled[np.ix_(pattern_rows, pattern)] = (
                self.mean[pattern] + shift * self._scale[pattern]
            )
        return filled

    def _conditional(self, pattern):
        """The conditional covariance of the modelled columns `pattern` given the others."""
        scale = self._scale[pattern]
        return np.linalg.inv(self._precision[np.ix_(pattern, pattern)]) * np.outer(scale, scale)

    def _patterns(self, missing):
        """`(rows, columns, C)` per distinct nonempty pattern of missing columns."""
        for rows, pattern in _missing_patterns(missing):
            yield rows, pattern, self._conditional(pattern)


def _missing_patterns(missing):
    """`(rows, columns)` per distinct nonempty pattern of missing columns in the mask."""
    rows = np.flatnonzero(missing.any(axis=1))
    if not rows.size:
        return []
    columns = np.flatnonzero(missing.any(axis=0))
    part = missing[np.ix_(rows, columns)]
    if len(columns) < 63:  # each pattern as one integer
        keys = part.astype("int64") @ (np.int64(1) << np.arange(len(columns), dtype="int64"))
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        patterns = part[first]
    else:
        patterns, inverse = np.unique(part, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(patterns) + 1))
    return [
        (rows[order[bounds[i] : bounds[i + 1]]], columns[patterns[i]]) for i in range(len(patterns))
    ]


_NEWTON_STEPS = 8
"""Newton steps of `mean_preserving`'s shift under a logit link (from 0; the mean of a
logistic's draws is smooth and monotone in the shift)."""
_SUBNETWORK_CHUNK = 1 << 22
"""At most this many feature values (draws x rows x columns) go through a subnetwork at once."""


def latent_predictor_draws(
    imputer, latent, features, feature_scale, coefficients, subnetwork, num_samples, rng
):
    """Draws of what each row's missing inputs add to its predictor: `(num_samples, n)`,
    zeros for a complete row.

    A row's missing columns are drawn from their conditional Normal given its observed
    columns (`GaussianImputer.latent_rows`), as deviations delta from the fill; the draw is
    `coefficients_i . delta` plus, with a subnetwork f, `f(x_i + delta)` less its mean over
    the row's draws: the prediction keeps f's output at the fill (where f, which sees the
    missing indicators, learned the mean of such rows), and the draws add the spread the
    unknown value gives f.

    Args:
        imputer: the fitted `GaussianImputer`; `latent` the mask of filled entries.
        features: `(n, p)` the rows on the model's scale (standardised, filled).
        feature_scale: `(p,)` the standardisation's scales (the imputer works on the
            data's scale).
        coefficients: `(n, p)` each row's coefficient on each column in the linear part
            (beta plus its groups' random slopes), at their posterior means; `(p,)` when
            every row has the same (beta).
        subnetwork: None, or a function of `(m, p)` model-scale features giving the
            subnetwork's `(m,)` output (the estimators read it as if the drawn values had
            been observed: the missing indicators at 0).
        rng: a numpy `Generator`.

    Example:
        >>> values = np.array([[1.0, 2.0], [np.nan, 0.0], [3.0, 4.0], [2.0, 2.5]])
        >>> imputer = GaussianImputer.fit(values, latent_columns=[0])
        >>> filled, latent = imputer.fill(values)
        >>> draws = latent_predictor_draws(imputer, latent, filled, np.ones(2),
        ...     np.ones((4, 2)), None, 5000, np.random.default_rng(0))
        >>> draws[:, [0, 2, 3]].any(), bool(draws[:, 1].std() > 0)
        (np.False_, True)
    """
    draws = np.zeros((num_samples, len(features)))
    width = features.shape[1]
    for rows, columns, covariance in imputer.latent_rows(latent):
        scale = feature_scale[columns]
        factor = np.linalg.cholesky(covariance / np.outer(scale, scale))
        step = max(1, _SUBNETWORK_CHUNK // (num_samples * width))
        for start in range(0, len(rows), step):
            part = rows[start : start + step]
            deviation = rng.standard_normal((num_samples, len(part), len(columns))) @ factor.T
            draws[:, part] = np.einsum(
                "srj,rj->sr", deviation, _row_coefficients(coefficients, part, columns)
            )
            if subnetwork is None:
                continue
            moved = np.repeat(features[part][None].astype("float64"), num_samples, axis=0)
            moved[:, :, columns] += deviation
            output = subnetwork(moved.reshape(-1, width)).reshape(num_samples, len(part))
            draws[:, part] += output - output.mean(axis=0)
    return draws


def latent_predictor_variance(imputer, latent, feature_scale, coefficients):
    """The variance each row's missing inputs add to a linear predictor,
    `coefficients_i' C_i coefficients_i` (`(n,)`, 0 for a complete row; arguments as
    `latent_predictor_draws`'s).

    Example:
        >>> values = np.array([[1.0, 2.0], [np.nan, 0.0], [3.0, 4.0], [2.0, 2.5]])
        >>> imputer = GaussianImputer.fit(values, latent_columns=[0])
        >>> variance = latent_predictor_variance(
        ...     imputer, imputer.fill(values)[1], np.ones(2), np.ones((4, 2)))
        >>> variance[[0, 2, 3]].tolist(), bool(variance[1] > 0)
        ([0.0, 0.0, 0.0], True)
    """
    variance = np.zeros(len(latent))
    for rows, columns, covariance in imputer.latent_rows(latent):
        scale = feature_scale[columns]
        c = _row_coefficients(coefficients, rows, columns)
        variance[rows] = np.einsum("rj,jk,rk->r", c, covariance / np.outer(scale, scale), c)
    return variance


def _row_coefficients(coefficients, rows, columns):
    """`(len(rows), len(columns))` coefficients, from an `(n, p)` or a shared `(p,)` array."""
    if coefficients.ndim == 1:
        return np.broadcast_to(coefficients[columns], (len(rows), len(columns)))
    return coefficients[np.ix_(rows, columns)]


def mean_preserving(latent, eta, family):
    """`latent` draws (`(num_samples, n)`, on the link scale) shifted per row so that the
    mean response over them at the predictor `eta` (`(n,)`) is the response at `eta`.

    A fit holds each filled value as if observed, so the missing indicator and the
    intercept already learned the mean response of rows with a missing value; the draws of
    a "poisson" or "binomial" model add only the spread the unknown value gives (without
    the shift, exp's convexity would raise a Poisson row's mean by about exp(b^2 C / 2)).
    `family` is "poisson" (log link: the shift is exact) or "binomial" (logit link: Newton
    steps on the shift).

    Example:
        >>> latent = np.array([[-1.0, 0.0], [1.0, 0.0]])
        >>> shifted = mean_preserving(latent, np.zeros(2), "poisson")
        >>> np.exp(shifted).mean(axis=0).round(6).tolist()
        [1.0, 1.0]
    """
    if family == "poisson":
        largest = latent.max(axis=0)
        return latent - largest - np.log(np.mean(np.exp(latent - largest), axis=0))
    target = special.expit(eta)
    shift = np.zeros(latent.shape[1])
    for _ in range(_NEWTON_STEPS):
        mean = special.expit(eta + latent + shift)
        slope = np.maximum(np.mean(mean * (1.0 - mean), axis=0), 1e-12)
        shift -= (mean.mean(axis=0) - target) / slope
    return latent + shift
