"""The joint Gaussian posterior of a mixed model's linear part, as the finish computes it.

The linear part of the predictor is

    eta_i = d_i . beta + sum_k b_k[g_k(i)]        (d_i = [1, x_i]: alpha is beta's first entry)

and its posterior (exact for a Gaussian likelihood given the variance parameters; the Laplace
approximation for a GLMM) is one Normal over every coefficient together. It is stored
without a dense covariance over every group: the factor with the most levels ("first") is
kept apart, and the rest r (the other factors' offsets, then beta) is small enough for a
dense covariance:

    r             ~ Normal(rest_mean, rest_covariance)
    b_first | r   ~ Normal(first_mean - coupling (r - rest_mean), first_variance)

with `first_variance` diagonal and `coupling` sparse (a group of the first factor is
coupled only to the fixed effects and to the levels of other factors it shares rows with).
Everything is on the model's (standardised) scale.
"""

import numpy as np
from scipy import sparse


class JointPosterior:
    """A Normal posterior over fixed effects and the offsets of every factor, jointly.

    Args:
        num_levels: levels of each factor, in the model's order.
        first: index of the factor kept apart (None without factors).
        first_mean, first_variance: `(num_levels[first],)` conditional mean (at r's mean)
            and conditional variance of its offsets given r.
        coupling: sparse `(num_levels[first], m)`, the regression of the first factor's
            offsets on r.
        rest_layout: factor index -> slice of r holding its offsets.
        num_fixed: width of beta, the last entries of r.
        rest_mean, rest_covariance: `(m,)` and `(m, m)`.

    Example:
        >>> posterior = JointPosterior(
        ...     [2], 0, np.array([0.5, -0.5]), np.array([0.1, 0.1]),
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
        first,
        first_mean,
        first_variance,
        coupling,
        rest_layout,
        num_fixed,
        rest_mean,
        rest_covariance,
    ):
        self.num_levels = [int(g) for g in num_levels]
        self.first = first
        self.first_mean = first_mean
        self.first_variance = first_variance
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
        """Posterior means of factor k's offsets."""
        if k == self.first:
            return self.first_mean
        return self.rest_mean[self.rest_layout[k]]

    def offset_sd(self, k: int) -> np.ndarray:
        """Marginal posterior sds of factor k's offsets (the fixed effects integrated out)."""
        if k != self.first:
            return np.sqrt(np.diag(self.rest_covariance)[self.rest_layout[k]])
        variance = self.first_variance.copy()
        for start in range(0, len(variance), _CHUNK_ROWS):
            rows = self.coupling[start : start + _CHUNK_ROWS]
            variance[start : start + rows.shape[0]] += _quadratic_rows(rows, self.rest_covariance)
        return np.sqrt(variance)

    # ------------------------------------------------------------------ per row
    def _rest_rows(self, design, codes):
        """Each row's coefficient vector over r, less its first-factor group's coupling."""
        num_rows = len(design)
        m = len(self.rest_mean)
        parts = []
        for k, columns in self.rest_layout.items():
            parts.append(
                sparse.csr_matrix(
                    (np.ones(num_rows), (np.arange(num_rows), columns.start + codes[k])),
                    shape=(num_rows, m),
                )
            )
        fixed = np.zeros((num_rows, m))
        fixed[:, self._fixed] = design
        rows = sparse.csr_matrix(fixed) + sum(parts, sparse.csr_matrix((num_rows, m)))
        if self.first is not None:
            rows = rows - self.coupling[codes[self.first]]
        return rows

    def predictor_variance(self, design, codes) -> np.ndarray:
        """Var(eta_i) of the linear part for rows with fixed design `design` `(n, p)` and
        group codes `codes` (one array per factor)."""
        variance = np.zeros(len(design))
        for start in range(0, len(design), _CHUNK_ROWS):
            stop = min(start + _CHUNK_ROWS, len(design))
            chunk = [c[start:stop] for c in codes]
            rows = self._rest_rows(design[start:stop], chunk)
            variance[start:stop] = _quadratic_rows(rows, self.rest_covariance)
            if self.first is not None:
                variance[start:stop] += self.first_variance[chunk[self.first]]
        return variance

    def predictor_mean(self, design, codes) -> np.ndarray:
        """E[eta_i] of the linear part."""
        mean = design @ self.fixed_mean()
        for k in range(len(self.num_levels)):
            mean = mean + self.offset_mean(k)[codes[k]]
        return mean

    def _draw(self, num_samples, rng, groups):
        """Joint draws of r `(num_samples, m)` and of the first factor's offsets for the
        levels `groups` `(num_samples, len(groups))` (None without factors)."""
        m = len(self.rest_mean)
        rest = (
            self.rest_mean
            + rng.standard_normal((num_samples, m)) @ _cholesky_psd(self.rest_covariance).T
        )
        if self.first is None:
            return rest, None
        shift = np.asarray(self.coupling[groups] @ (rest - self.rest_mean).T).T
        noise = rng.standard_normal((num_samples, len(groups)))
        first = self.first_mean[groups] - shift + np.sqrt(self.first_variance[groups]) * noise
        return rest, first

    def sample(self, num_samples: int, rng) -> tuple:
        """Joint draws `(fixed, offsets)`: beta `(num_samples, p)` and a list with each
        factor's offsets `(num_samples, num_levels[k])`."""
        groups = None if self.first is None else np.arange(len(self.first_mean))
        rest, first = self._draw(num_samples, rng, groups)
        offsets = [None] * len(self.num_levels)
        for k, columns in self.rest_layout.items():
            offsets[k] = rest[:, columns]
        if self.first is not None:
            offsets[self.first] = first
        return rest[:, self._fixed], offsets

    def sample_predictor(self, design, codes, num_samples: int, rng) -> np.ndarray:
        """Joint draws of eta's linear part for the given rows: `(num_samples, n)`.

        Rows of one group share its offset within a draw, and every coefficient is drawn
        from the joint posterior (its correlations included). Only the first factor's
        levels that the rows use are drawn.
        """
        groups = row_group = None
        if self.first is not None:
            groups, row_group = np.unique(codes[self.first], return_inverse=True)
        rest, first = self._draw(num_samples, rng, groups)
        eta = rest[:, self._fixed] @ design.T
        for k, columns in self.rest_layout.items():
            eta += rest[:, columns][:, codes[k]]
        if first is not None:
            eta += first[:, row_group]
        return eta


_CHUNK_ROWS = 8192


def _quadratic_rows(rows, covariance) -> np.ndarray:
    """diag(rows @ covariance @ rows.T) for a sparse `rows`."""
    product = np.asarray(rows @ covariance)
    return np.asarray(rows.multiply(product).sum(axis=1)).reshape(-1)


def _cholesky_psd(covariance) -> np.ndarray:
    """A factor F with F F' = covariance, for a positive semi-definite covariance (a factor
    at the boundary, sigma_k = 0, has exactly zero variance)."""
    values, vectors = np.linalg.eigh(covariance)
    return vectors * np.sqrt(np.clip(values, 0.0, None))
