"""The joint Gaussian posterior of a mixed model's linear part, as the finish computes it.

The linear part of the predictor is

    eta_i = d_i . beta + sum_k t_ik . b_k[g_k(i)]      (d_i = [1, x_i]: alpha is beta's first)

where factor k has d_k terms per group: t_ik is the row's term vector ([1] for a random
intercept, [1, z_i] with random slopes) and b_k[g] the group's coefficient vector. Its
posterior (exact for a Gaussian likelihood given the variance parameters; the Laplace
approximation for a GLMM) is one Normal over every coefficient together. It is stored
without a dense covariance over every group: the factor with the most coefficients
("first") is kept apart, and the rest r (the other factors' coefficients, group by group,
then beta) is small enough for a dense covariance:

    r             ~ Normal(rest_mean, rest_covariance)
    b_first[g] | r ~ Normal(first_mean[g] - coupling_g (r - rest_mean), first_covariance[g])

with `first_covariance` one d x d block per group and `coupling` sparse (a group of the
first factor is coupled only to the fixed effects and to the levels of other factors it
shares rows with). Everything is on the model's (standardised) scale.
"""

import numpy as np
from scipy import sparse

from reffects.group_sums import SplitRows


class JointPosterior:
    """A Normal posterior over fixed effects and every factor's group coefficients, jointly.

    Args:
        num_levels: levels of each factor, in the model's order.
        num_terms: terms per group of each factor (1 for a random intercept).
        first: index of the factor kept apart (None without factors).
        first_mean: `(num_levels[first], d)` its coefficients' mean (at r's mean).
        first_covariance: `(num_levels[first], d, d)` their covariance given r.
        coupling: sparse `(num_levels[first] * d, m)`, their regression on r (rows group
            by group, term fastest).
        rest_layout: factor index -> slice of r holding its coefficients, group by group.
        num_fixed: width of beta, the last entries of r.
        rest_mean, rest_covariance: `(m,)` and `(m, m)`.

    Example:
        >>> posterior = JointPosterior(
        ...     [2], [1], 0, np.array([[0.5], [-0.5]]), np.full((2, 1, 1), 0.1),
        ...     sparse.csr_matrix(np.array([[0.2], [0.2]])), {}, 1,
        ...     np.array([1.0]), np.array([[0.04]]))
        >>> posterior.fixed_sd().round(3).tolist()
        [0.2]
        >>> posterior.predictor_variance(np.ones((1, 1)), [np.array([0])]).round(4).tolist()
        [0.1256]
    """

    def __init__(
        self,
        num_levels,
        num_terms,
        first,
        first_mean,
        first_covariance,
        coupling,
        rest_layout,
        num_fixed,
        rest_mean,
        rest_covariance,
    ):
        self.num_levels = [int(g) for g in num_levels]
        self.num_terms = [int(d) for d in num_terms]
        self.first = first
        self.first_mean = first_mean
        self.first_covariance = first_covariance
        self.coupling = sparse.csr_matrix(coupling) if coupling is not None else None
        self.rest_layout = dict(rest_layout)
        self.num_fixed = int(num_fixed)
        self.rest_mean = rest_mean
        self.rest_covariance = rest_covariance

    @property
    def _fixed(self):
        return slice(len(self.rest_mean) - self.num_fixed, len(self.rest_mean))

    # ------------------------------------------------------------------ moments
    def fixed_mean(self) -> np.ndarray:
        """Posterior mean of beta (alpha first)."""
        return self.rest_mean[self._fixed]

    def fixed_covariance(self) -> np.ndarray:
        """Posterior covariance of beta (alpha first)."""
        return self.rest_covariance[self._fixed, self._fixed]

    def fixed_sd(self) -> np.ndarray:
        return np.sqrt(np.diag(self.fixed_covariance()))

    def offset_mean(self, k: int) -> np.ndarray:
        """Posterior means of factor k's coefficients: `(num_levels[k], num_terms[k])`."""
        if k == self.first:
            return self.first_mean
        return self.rest_mean[self.rest_layout[k]].reshape(self.num_levels[k], -1)

    def offset_covariance(self, k: int) -> np.ndarray:
        """Marginal posterior covariance of each group's coefficients (the fixed effects and
        the other factors integrated out): `(num_levels[k], d, d)`."""
        d = self.num_terms[k]
        if k != self.first:
            columns = self.rest_layout[k]
            block = self.rest_covariance[columns, columns]
            groups = np.arange(self.num_levels[k])[:, None] * d + np.arange(d)
            return block[groups[:, :, None], groups[:, None, :]]
        covariance = self.first_covariance.copy()
        rows_per_chunk = max(d, _CHUNK_ROWS // d * d)
        for start in range(0, self.coupling.shape[0], rows_per_chunk):
            rows = self.coupling[start : start + rows_per_chunk]
            product = np.asarray(rows @ self.rest_covariance)
            groups = slice(start // d, (start + rows.shape[0]) // d)
            for i in range(d):
                for j in range(d):
                    entries = rows[j::d].multiply(product[i::d]).sum(axis=1)
                    covariance[groups, i, j] += np.asarray(entries).reshape(-1)
        return covariance

    def offset_sd(self, k: int) -> np.ndarray:
        """Marginal posterior sds of factor k's coefficients: `(num_levels[k], num_terms[k])`."""
        if k != self.first:
            variance = np.diag(self.rest_covariance)[self.rest_layout[k]]
            return np.sqrt(variance).reshape(self.num_levels[k], -1)
        d = self.num_terms[k]
        variance = np.einsum("gjj->gj", self.first_covariance).reshape(-1).copy()
        for start in range(0, len(variance), _CHUNK_ROWS):
            rows = self.coupling[start : start + _CHUNK_ROWS]
            variance[start : start + rows.shape[0]] += _quadratic_rows(rows, self.rest_covariance)
        return np.sqrt(variance).reshape(-1, d)

    # ------------------------------------------------------------------ per row
    def _rest_rows(self, design, codes, terms):
        """Each row's coefficient vector over r, less its first-factor group's coupling."""
        num_rows = len(design)
        m = len(self.rest_mean)
        rows = sparse.csr_matrix((num_rows, m))
        for k, columns in self.rest_layout.items():
            d = self.num_terms[k]
            entries = columns.start + codes[k][:, None] * d + np.arange(d)
            rows = rows + _row_matrix(terms[k], entries, m)
        fixed = np.zeros((num_rows, m))
        fixed[:, self._fixed] = design
        rows = rows + sparse.csr_matrix(fixed)
        if self.first is not None:
            d = self.num_terms[self.first]
            entries = codes[self.first][:, None] * d + np.arange(d)
            weights = _row_matrix(terms[self.first], entries, self.coupling.shape[0])
            rows = rows - weights @ self.coupling
        return rows

    def predictor_variance(self, design, codes, terms=None) -> np.ndarray:
        """Var(eta_i) of the linear part for rows with fixed design `design` `(n, p)`, group
        codes `codes` (one array per factor) and term vectors `terms` (one `(n, d_k)` array
        per factor, or None for a random intercept; `terms=None`: every factor's)."""
        terms = _row_terms(codes, terms)
        variance = np.zeros(len(design))
        for start in range(0, len(design), _CHUNK_ROWS):
            stop = min(start + _CHUNK_ROWS, len(design))
            chunk = [c[start:stop] for c in codes]
            chunk_terms = [t[start:stop] for t in terms]
            rows = self._rest_rows(design[start:stop], chunk, chunk_terms)
            variance[start:stop] = _quadratic_rows(rows, self.rest_covariance)
            if self.first is not None:
                t = chunk_terms[self.first]
                blocks = self.first_covariance[chunk[self.first]]
                variance[start:stop] += np.einsum("ni,nij,nj->n", t, blocks, t)
        return variance

    def predictor_mean(self, design, codes, terms=None) -> np.ndarray:
        """E[eta_i] of the linear part."""
        terms = _row_terms(codes, terms)
        mean = design @ self.fixed_mean()
        for k in range(len(self.num_levels)):
            mean = mean + np.sum(terms[k] * self.offset_mean(k)[codes[k]], axis=1)
        return mean

    def _draw(self, num_samples, rng, groups):
        """Joint draws of r `(num_samples, m)` and of the first factor's coefficients for
        the levels `groups` `(num_samples, len(groups), d)` (None without factors)."""
        m = len(self.rest_mean)
        rest = (
            self.rest_mean
            + rng.standard_normal((num_samples, m)) @ _cholesky_psd(self.rest_covariance).T
        )
        if self.first is None:
            return rest, None
        d = self.num_terms[self.first]
        entries = (groups[:, None] * d + np.arange(d)).reshape(-1)
        shift = np.asarray(self.coupling[entries] @ (rest - self.rest_mean).T).T
        shift = shift.reshape(num_samples, len(groups), d)
        noise = rng.standard_normal((num_samples, len(groups), d))
        factors = _cholesky_psd(self.first_covariance[groups])
        first = self.first_mean[groups] - shift + np.einsum("gij,sgj->sgi", factors, noise)
        return rest, first

    def sample(self, num_samples: int, rng) -> tuple:
        """Joint draws `(fixed, offsets)`: beta `(num_samples, p)` and a list with each
        factor's coefficients `(num_samples, num_levels[k], num_terms[k])`."""
        groups = None if self.first is None else np.arange(len(self.first_mean))
        rest, first = self._draw(num_samples, rng, groups)
        offsets = [None] * len(self.num_levels)
        for k, columns in self.rest_layout.items():
            offsets[k] = rest[:, columns].reshape(num_samples, self.num_levels[k], -1)
        if self.first is not None:
            offsets[self.first] = first
        return rest[:, self._fixed], offsets

    def sample_predictor(self, design, codes, num_samples: int, rng, terms=None) -> np.ndarray:
        """Joint draws of eta's linear part for the given rows: `(num_samples, n)`.

        Rows of one group share its coefficients within a draw, and every coefficient is
        drawn from the joint posterior (its correlations included). Only the first
        factor's levels that the rows use are drawn.
        """
        terms = _row_terms(codes, terms)
        groups = row_group = None
        if self.first is not None:
            groups, row_group = np.unique(codes[self.first], return_inverse=True)
        rest, first = self._draw(num_samples, rng, groups)
        eta = rest[:, self._fixed] @ design.T
        for k, columns in self.rest_layout.items():
            coefficients = rest[:, columns].reshape(num_samples, self.num_levels[k], -1)
            eta += np.einsum("snj,nj->sn", coefficients[:, codes[k]], terms[k])
        if first is not None:
            eta += np.einsum("snj,nj->sn", first[:, row_group], terms[self.first])
        return eta


class IndependentGroupsPosterior:
    """A Normal posterior whose groups are independent of each other and of the fixed
    effects: the layers' variational q, kept for models whose linear part is too large for
    the finish's joint posterior. It reads as a `JointPosterior` does.

    Args:
        fixed_mean, fixed_sd: `(p,)` beta's mean and sd (alpha first).
        offset_means: per factor, `(num_levels, d)` its coefficients' means.
        offset_covariances: per factor, `(num_levels, d, d)` each group's covariance.

    Example:
        >>> posterior = IndependentGroupsPosterior(
        ...     np.array([1.0]), np.array([0.2]), [np.array([[0.5], [-0.5]])],
        ...     [np.full((2, 1, 1), 0.1)])
        >>> posterior.predictor_variance(np.ones((1, 1)), [np.array([0])]).round(4).tolist()
        [0.14]
    """

    @classmethod
    def from_layers(cls, layers):
        """The q of a model's layers (`models.mixed_model_layers`'s handle), on the model's
        scale; groups with no training rows at their prior."""
        fixed = [layers.intercept.posterior()]
        if layers.fixed_effects is not None:
            fixed.append(layers.fixed_effects.posterior())
        mean = np.concatenate([np.ravel(q.mean()) for q in fixed])
        sd = np.concatenate([np.ravel(q.stddev()) for q in fixed])
        means, covariances = [], []
        for layer in layers.factors:
            if hasattr(layer, "posterior_moments"):  # RandomEffects: a covariance per group
                loc, covariance = layer.posterior_moments()
            else:
                offset = layer.posterior()["offset"]
                loc = np.asarray(offset.mean(), "float64")
                covariance = np.square(np.asarray(offset.stddev(), "float64"))[:, :, None]
            means.append(loc)
            covariances.append(covariance)
        return cls(mean, sd, means, covariances)

    def __init__(self, fixed_mean, fixed_sd, offset_means, offset_covariances):
        self._fixed_mean = np.asarray(fixed_mean, "float64")
        self._fixed_sd = np.asarray(fixed_sd, "float64")
        self._means = [np.asarray(m, "float64") for m in offset_means]
        self._covariances = [np.asarray(c, "float64") for c in offset_covariances]
        self.num_levels = [len(m) for m in self._means]
        self.num_terms = [m.shape[1] for m in self._means]

    def fixed_mean(self) -> np.ndarray:
        return self._fixed_mean

    def fixed_covariance(self) -> np.ndarray:
        return np.diag(np.square(self._fixed_sd))

    def fixed_sd(self) -> np.ndarray:
        return self._fixed_sd

    def offset_mean(self, k: int) -> np.ndarray:
        return self._means[k]

    def offset_covariance(self, k: int) -> np.ndarray:
        return self._covariances[k]

    def offset_sd(self, k: int) -> np.ndarray:
        return np.sqrt(np.einsum("gjj->gj", self._covariances[k]))

    def predictor_mean(self, design, codes, terms=None) -> np.ndarray:
        terms = _row_terms(codes, terms)
        mean = design @ self._fixed_mean
        for k, (c, t) in enumerate(zip(codes, terms)):
            mean = mean + np.sum(t * self._means[k][c], axis=1)
        return mean

    def predictor_variance(self, design, codes, terms=None) -> np.ndarray:
        terms = _row_terms(codes, terms)
        variance = np.square(design) @ np.square(self._fixed_sd)
        for k, (c, t) in enumerate(zip(codes, terms)):
            variance = variance + np.einsum("ni,nij,nj->n", t, self._covariances[k][c], t)
        return variance

    def sample(self, num_samples: int, rng) -> tuple:
        fixed = self._fixed_mean + self._fixed_sd * rng.standard_normal(
            (num_samples, len(self._fixed_sd))
        )
        offsets = [self._draw_groups(k, np.arange(n), num_samples, rng)
                   for k, n in enumerate(self.num_levels)]  # fmt: skip
        return fixed, offsets

    def sample_predictor(self, design, codes, num_samples: int, rng, terms=None) -> np.ndarray:
        """Draws of eta's linear part `(num_samples, n)`; rows of one group share its draw."""
        terms = _row_terms(codes, terms)
        fixed = self._fixed_mean + self._fixed_sd * rng.standard_normal(
            (num_samples, len(self._fixed_sd))
        )
        eta = fixed @ design.T
        for k, (c, t) in enumerate(zip(codes, terms)):
            groups, row_group = np.unique(c, return_inverse=True)
            draws = self._draw_groups(k, groups, num_samples, rng)
            eta += np.einsum("snj,nj->sn", draws[:, row_group], t)
        return eta

    def _draw_groups(self, k, groups, num_samples, rng):
        """Draws of factor k's coefficients for `groups`: `(num_samples, len(groups), d)`."""
        factors = _cholesky_psd(self._covariances[k][groups])
        noise = rng.standard_normal((num_samples, len(groups), self.num_terms[k]))
        return self._means[k][groups] + np.einsum("gij,sgj->sgi", factors, noise)


def _row_terms(codes, terms):
    """Each factor's `(n, d_k)` term vectors (ones for a random intercept)."""
    terms = terms if terms is not None else [None] * len(codes)
    return [
        np.ones((len(c), 1)) if t is None else np.asarray(t, "float64").reshape(len(c), -1)
        for c, t in zip(codes, terms)
    ]


_CHUNK_ROWS = 8192


def _row_matrix(values, columns, width):
    """A sparse `(n, width)` matrix with row i holding `values[i, j]` at `columns[i, j]`."""
    num_rows, d = values.shape
    indptr = np.arange(0, num_rows * d + 1, d)
    return sparse.csr_matrix(
        (values.reshape(-1), columns.reshape(-1), indptr), shape=(num_rows, width)
    )


def _quadratic_rows(rows, covariance) -> np.ndarray:
    """diag(rows @ covariance @ rows.T) for a sparse `rows`, split by column
    (`group_sums.SplitRows`, one row per group): on IMDb's 33,000 directors (162 dense of
    1,758 columns) 0.04 s a chunk where the sparse-dense product with every column took 0.94.

    Example:
        >>> rows = sparse.csr_matrix(np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]))
        >>> _quadratic_rows(rows, np.array([[2.0, 0, 0], [0, 1, 0.5], [0, 0.5, 1]])).tolist()
        [6.0, 3.0]
    """
    return SplitRows(rows, 1).quadratic(np.asarray(covariance))[:, 0, 0]


def _cholesky_psd(covariance) -> np.ndarray:
    """A factor F with F F' = covariance (batched over leading axes), for a positive
    semi-definite covariance (a factor at the boundary, sigma_k = 0, has exactly zero
    variance)."""
    values, vectors = np.linalg.eigh(covariance)
    return vectors * np.sqrt(np.clip(values, 0.0, None))[..., None, :]


class GroupsGivenFixedPosterior(IndependentGroupsPosterior):
    """A Normal posterior whose groups are independent of each other given the fixed
    effects, each correlated with them: `sparse_finish`'s, for crossed factors too wide for
    a `JointPosterior`. One term per group (a random intercept, or one slope).

        beta ~ Normal(fixed_mean, fixed_covariance)
        b_k[g] | beta ~ Normal(mean_k[g] + R_k[g] (beta - fixed_mean), given_fixed_k[g])

    with R_k = coupling_k fixed_covariance^-1, so Cov(b_k[g], beta) = coupling_k[g].

    Args:
        fixed_mean, fixed_covariance: `(p,)` and `(p, p)`, beta's (alpha first).
        offset_means: per factor, `(num_levels, 1)` its offsets' means.
        given_fixed: per factor, `(num_levels,)` each offset's variance given beta.
        couplings: per factor, `(num_levels, p)` each offset's covariance with beta.

    Example:
        >>> posterior = GroupsGivenFixedPosterior(
        ...     np.array([1.0]), np.array([[0.04]]), [np.array([[0.5], [-0.5]])],
        ...     [np.array([0.1, 0.1])], [np.array([[-0.02], [0.0]])])
        >>> posterior.offset_sd(0).round(4).tolist()  # sqrt(0.1 + 0.02^2 / 0.04)
        [[0.3317], [0.3162]]
        >>> # Var(alpha + b_0) = 0.04 + 0.11 - 2 * 0.02
        >>> posterior.predictor_variance(np.ones((1, 1)), [np.array([0])]).round(4).tolist()
        [0.11]
    """

    def __init__(self, fixed_mean, fixed_covariance, offset_means, given_fixed, couplings):
        self._fixed_covariance = np.asarray(fixed_covariance, "float64")
        inverse = np.linalg.pinv(self._fixed_covariance, hermitian=True)
        self._regressions = [np.asarray(c, "float64") @ inverse for c in couplings]
        self._given_fixed = [np.asarray(v, "float64") for v in given_fixed]
        marginal = [
            (v + np.sum(r * c, axis=1))[:, None, None]
            for v, r, c in zip(self._given_fixed, self._regressions, couplings)
        ]
        fixed_sd = np.sqrt(np.diag(self._fixed_covariance))
        super().__init__(fixed_mean, fixed_sd, offset_means, marginal)

    def fixed_covariance(self) -> np.ndarray:
        return self._fixed_covariance

    def _given_fixed_rows(self, design, codes, terms):
        """Each row's eta as a + b . beta + noise: b `(n, p)` and the noise's variance."""
        terms = _row_terms(codes, terms)
        slope = np.asarray(design, "float64").copy()
        variance = np.zeros(len(slope))
        for k, (c, t) in enumerate(zip(codes, terms)):
            slope += t[:, :1] * self._regressions[k][c]
            variance += np.square(t[:, 0]) * self._given_fixed[k][c]
        return slope, variance

    def predictor_variance(self, design, codes, terms=None) -> np.ndarray:
        slope, variance = self._given_fixed_rows(design, codes, terms)
        return np.einsum("ni,ij,nj->n", slope, self._fixed_covariance, slope) + variance

    def _draw_fixed(self, num_samples, rng):
        factor = _cholesky_psd(self._fixed_covariance)
        noise = rng.standard_normal((num_samples, len(self._fixed_mean)))
        return self._fixed_mean + noise @ factor.T

    def sample(self, num_samples: int, rng) -> tuple:
        fixed = self._draw_fixed(num_samples, rng)
        offsets = []
        for k, mean in enumerate(self._means):
            noise = rng.standard_normal((num_samples, len(mean)))
            given = mean[:, 0] + (fixed - self._fixed_mean) @ self._regressions[k].T
            offsets.append((given + noise * np.sqrt(self._given_fixed[k]))[..., None])
        return fixed, offsets

    def sample_predictor(self, design, codes, num_samples: int, rng, terms=None) -> np.ndarray:
        """Draws of eta's linear part `(num_samples, n)`; rows of one group share its draw."""
        terms = _row_terms(codes, terms)
        fixed = self._draw_fixed(num_samples, rng)
        eta = fixed @ np.asarray(design, "float64").T
        for k, (c, t) in enumerate(zip(codes, terms)):
            groups, row_group = np.unique(c, return_inverse=True)
            noise = rng.standard_normal((num_samples, len(groups)))
            given = (
                self._means[k][groups, 0]
                + (fixed - self._fixed_mean) @ self._regressions[k][groups].T
            )
            draws = given + noise * np.sqrt(self._given_fixed[k][groups])
            eta += draws[:, row_group] * t[:, 0]
        return eta
