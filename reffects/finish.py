"""The exact finish: lme4's estimates and the joint posterior of a model's linear part.

After SGD, the estimators hold any subnetwork h fixed; what is left is a linear mixed model

    y_i = h_i + d_i . beta + sum_k b_k[g_k(i)] + e_i,   e_i ~ Normal(0, s^2 / w_i)
    b_k ~ Normal(0, (s theta_k)^2 I),   beta ~ Normal(m0, P0^-1)   (d_i = [1, x_i])

This module fits it as lme4 does (Bates, Maechler, Bolker and Walker 2015, JSS 67(1),
section 3): with u = b / theta (relative covariance factor Lambda = diag(theta)), the
penalised least-squares system

    M = [[Lambda' Z'WZ Lambda + I, Lambda' Z'WD], [D'WZ Lambda, D'WD + s^2 P0]]

gives, at each theta, the conditional mode of (u, beta), the penalised residual sum of
squares r and log det M, hence the profiled REML criterion

    (N - p) log s^2 + log det M + r / s^2,   s^2 = r / (N - p)

(N = sum of weights, p = width of D; ML drops beta's block from log det M and uses N).
theta is chosen by L-BFGS-B on that criterion (theta >= 0: a factor may sit at the
boundary, as in lme4; a random intercept is searched as its intraclass correlation
sigma_k^2 / (sigma_k^2 + s^2)), started at the SGD values. Beta's Normal prior enters M
exactly, so with the estimators' weak prior (sd 10 on the standardised scale) the estimates
are lme4's to about 1e-4; lme4's flat prior is its limit. In an exact fit (s -> 0) the
prior's ridge s^2 P0 is held at a floor, `_SMALLEST_RIDGE`.

M is never factored whole: the factor with the most levels has a diagonal block, which is
eliminated exactly (a cost linear in its levels), and the Schur complement over the other
factors' levels and beta is factored dense. A fit with one grouping factor costs the same
whatever its number of levels. Beyond `MAX_DENSE_LEVELS` in that complement (crossed
factors with tens of thousands of levels each; a GLMM's beyond `GLMM_DENSE_LEVELS`), random
intercepts are fitted by `sparse_finish.SparseMixedSystem`, which factors M whole and
sparse, as lme4 does.

The result is a `JointPosterior`: the exact posterior of (beta, every b_k) given theta and
s, with its correlations. Its marginal means and sds are written back into the layers, so
the Keras model (`predict`, `.keras` files) carries them too.
"""

import warnings

import keras
import numpy as np
from scipy import linalg, optimize, sparse, special
from threadpoolctl import threadpool_limits

from reffects.group_sums import DENSE_SHARE, SplitRows, batched_product
from reffects.joint_posterior import GroupsGivenFixedPosterior, JointPosterior
from reffects.layers import RandomEffects
from reffects.likelihoods import Poisson

MAX_DENSE_LEVELS = 4000
"""The largest Schur complement (levels of every factor but the largest, plus the fixed
effects) factored dense."""
GLMM_DENSE_LEVELS = 1000
"""A GLMM's dense limit, lower than a linear model's: its fit factors M hundreds of times
(PIRLS at each evaluation), not fifty. Past it, factors of one term each are factored
sparse, whose fixed effects' gradient takes two PIRLS runs a coefficient (no selected
inversion). `benchmarks/glmm_dense_limit.py` (Poisson, 6,000 rows, 2 fixed effects):
dense 6.6 s and sparse 7.7 s at 432 columns, 17.5 s and 7.0 s at 1,032, 62 s and 9.9 s at
1,532. With many fixed effects the sparse path costs more: on `benchmarks/finish_speed.py`
case g (464 columns, 64 of them fixed effects) one fit with the limit lowered took 130 s,
against 14 s dense."""

_RIDGE_TOLERANCE = 1e-7
"""Relative change of s^2 at which the prior's ridge s^2 P0 is taken as settled: beta's weak
prior moves the estimates by ~1e-4, so a 1e-7 change in its ridge moves them by ~1e-11."""
_SEARCH_TOLERANCE = 1e-12
"""The relative gain of the criterion below which the search of theta stops."""
_DENSE_CROSS_COLUMNS = 256
_CLASS_GRAM_ENTRIES = 4_000_000  # per-weight sums kept up to 32 MB
_SMALLEST_THETA = 1e-5
"""sigma_k / s at the boundary: a factor with no variance is reported with 1e-5 of the noise
scale (the criterion's value there is within 1e-10 of its value at 0)."""
_LARGEST_THETA = 1e3
"""sigma_k / s at most: beyond it (every row its own group) s is not identified."""
_SMALLEST_RIDGE = 1e-3
"""The ridge's variance at least, relative to the mean square of y. In an exact fit (s -> 0)
the ridge alone sets the directions of beta that the rows leave open, and there M's rounding
(~1e-16 of D'WD, which differs with the order of the rows and with weights against repeats)
moves beta by rounding / ridge: a floor of 1e-8 moved predictions by 2e-4 (15 rows, 30
columns, each row its own group), 1e-3 by ~1e-9. Beta's prior is that of a noise sd of 3%
of y's root mean square at least (s itself is still the profiled estimate); a GLMM's PIRLS,
whose ridge is 1, meets the floor only where its working response's mean square passes 1e3."""


# Its matrices are small to mid-sized and factored hundreds of times: one BLAS thread is
# measured 6-60x faster than two on the shared 2-core machine (a 181 x 181 Cholesky took
# 0.3 ms against 21 ms; 1,144 x 1,144: 40 ms against 200 ms).
_one_blas_thread = threadpool_limits.wrap(limits=1, user_api="blas")


def dense_coefficients(num_levels, num_terms, num_fixed) -> int:
    """How many coefficients the finish factors densely: every grouping factor's but the
    largest's (levels times terms), plus the fixed effects; at most `MAX_DENSE_LEVELS`.

    Example:
        >>> dense_coefficients([20_000, 10_000, 5_000], [1, 1, 1], 3)
        15003
    """
    sizes = [int(g) * int(d) for g, d in zip(num_levels, num_terms)]
    return sum(sizes) - max(sizes, default=0) + int(num_fixed)


def exact_finish_fits(num_levels, num_terms, num_fixed, sparse_ok=True) -> bool:
    """Whether the exact finish fits a model: its dense Schur complement
    (`dense_coefficients`) at most `MAX_DENSE_LEVELS`, or, at any size where `sparse_ok`
    (a Gaussian, binomial, Bernoulli or Poisson model; not K > 2 classes), factors of one
    term each (a random intercept, or one slope without it: `sparse_finish.SparseMixedSystem`).

    Example:
        >>> exact_finish_fits([20_000, 10_000, 5_000], [1, 1, 1], 3)
        True
        >>> exact_finish_fits([20_000, 10_000, 5_000], [1, 2, 1], 3)
        False
    """
    if dense_coefficients(num_levels, num_terms, num_fixed) <= MAX_DENSE_LEVELS:
        return True
    return sparse_ok and all(int(d) == 1 for d in num_terms)


def _term_indicator(codes, num_levels, terms):
    """Z for one factor: `(n, num_levels * d)`, row i holding its terms t_i at its group's
    d columns (term fastest)."""
    num_rows, d = terms.shape
    columns = codes[:, None] * d + np.arange(d)
    indptr = np.arange(0, num_rows * d + 1, d)
    return sparse.csr_matrix(
        (terms.reshape(-1), columns.reshape(-1), indptr), shape=(num_rows, num_levels * d)
    )


class CovarianceFactors:
    """lme4's theta: the free entries of each factor's relative covariance factor.

    Factor k's group coefficients have covariance Sigma_k = s^2 Lambda_k Lambda_k', with
    Lambda_k lower triangular `(d_k, d_k)` (d_k = 1 for a random intercept: theta_k is
    sigma_k / s). theta lists the entries factor by factor, each lower triangle column by
    column, as lme4 does; a factor whose terms are independent (lme4's `||`) has a
    diagonal Lambda_k. Sigma_k is unchanged when a column of Lambda_k changes sign, so the
    criterion is even in a diagonal entry that is alone in its column (a random intercept,
    the last column, independent terms): 0 is always stationary there, and the optimizers
    search those entries squared. The others are searched as they are, the diagonal ones
    bounded below as lme4 bounds them (squaring one whose column holds other entries would
    make the criterion's slope infinite at 0 and stall the search there).

    Example:
        >>> factors = CovarianceFactors([2, 1])
        >>> factors.matrices(np.array([2.0, 0.5, 1.0, 3.0]))[0].tolist()
        [[2.0, 0.0], [0.5, 1.0]]
    """

    def __init__(self, num_terms, correlated=None):
        self.num_terms = [int(d) for d in num_terms]
        correlated = [True] * len(self.num_terms) if correlated is None else list(correlated)
        self.entries, self.slices, diagonal, alone, start = [], [], [], [], 0
        for d, joint in zip(self.num_terms, correlated):
            if joint:
                columns, rows = np.triu_indices(d)  # the lower triangle, column-major
            else:
                rows = columns = np.arange(d)
            self.entries.append((rows, columns))
            self.slices.append(slice(start, start + len(rows)))
            diagonal.append(rows == columns)
            alone.append((rows == columns) & (np.bincount(columns, minlength=d)[columns] == 1))
            start += len(rows)
        empty = np.zeros(0, bool)
        self.diagonal = np.concatenate(diagonal) if diagonal else empty
        self.squared = np.concatenate(alone) if alone else empty  # searched as their squares
        self.size = start

    def matrices(self, theta) -> list:
        """Lambda_k for each factor."""
        result = []
        for d, (rows, columns), part in zip(self.num_terms, self.entries, self.slices):
            matrix = np.zeros((d, d))
            matrix[rows, columns] = theta[part]
            result.append(matrix)
        return result

    def theta(self, matrices) -> np.ndarray:
        """The inverse of `matrices`."""
        theta = np.zeros(self.size)
        for matrix, (rows, columns), part in zip(matrices, self.entries, self.slices):
            theta[part] = np.asarray(matrix)[rows, columns]
        return theta

    def entries_of(self, factors) -> np.ndarray:
        """A boolean mask over theta: the entries of the factors flagged in `factors`."""
        mask = np.zeros(self.size, bool)
        for flag, part in zip(factors, self.slices):
            mask[part] = bool(flag)
        return mask

    def to_search(self, theta, mask):
        values = np.asarray(theta, "float64")[mask].copy()
        diagonal = self.diagonal[mask]
        values[diagonal] = np.maximum(values[diagonal], _SMALLEST_THETA)
        squared = self.squared[mask]
        values[squared] = values[squared] ** 2
        return values

    def from_search(self, values, mask):
        theta = np.array(values, "float64")
        squared = self.squared[mask]
        theta[squared] = np.sqrt(theta[squared])
        return theta

    def bounds(self, mask):
        return [
            (_SMALLEST_THETA**2, _LARGEST_THETA**2)
            if squared
            else (_SMALLEST_THETA, _LARGEST_THETA)
            if diagonal
            else (None, None)
            for diagonal, squared in zip(self.diagonal[mask], self.squared[mask])
        ]


class _FirstFactorSums:
    """The largest factor's elimination when it is a random intercept.

    Its block of Lambda' Z'WZ Lambda + I is diagonal, D_g = t^2 W_g + 1 (t = theta, W_g the
    group's weight). For a power q, `at(t^2, q)` gives sum_g D_g^-q c_g c_g' ("gram"),
    sum_g D_g^-q c_g h_g ("moment") and sum_g D_g^-q h_g^2 ("squares"), c_g the group's row
    of `cross` and h_g its weighted sum of y. Groups of equal weight share D_g, so when there
    are few distinct weights (whole-row counts) the sums are kept per weight and an
    evaluation costs the number of distinct weights, not of groups: a million groups cost
    what a thousand do. Otherwise (or when m is wide) the groups with weight are summed
    directly.
    """

    def __init__(self, weight, moment, cross):
        self.num_groups = len(weight)
        self.group_weight, self.group_moment, self.cross = weight, moment, cross
        active = np.flatnonzero(weight > 0)  # groups without weight: D = 1, c = 0, h = 0
        self.num_active = len(active)
        weights, classes = np.unique(weight[active], return_inverse=True)
        m = cross.shape[1]
        rows = cross[active]
        rows = rows.toarray() if m <= _DENSE_CROSS_COLUMNS else rows
        h = moment[active]
        if len(weights) * m * m <= _CLASS_GRAM_ENTRIES and isinstance(rows, np.ndarray):
            self.weight, self.count = weights, np.bincount(classes)
            self.gram = np.stack(
                [rows[classes == c].T @ rows[classes == c] for c in range(len(weights))]
            )
            self.moment = np.stack(
                [rows[classes == c].T @ h[classes == c] for c in range(len(weights))]
            )
            self.squares = np.bincount(classes, np.square(h))
        else:  # one class per group
            self.weight, self.count, self.rows, self.h = weight[active], None, rows, h
            self.pairs = _GroupPairSums.of(rows) if sparse.issparse(rows) else None

    def at(self, t_squared, power):
        inverse = (t_squared * self.weight + 1.0) ** -power
        if self.count is not None:
            return {
                "gram": np.tensordot(inverse, self.gram, axes=1),
                "moment": inverse @ self.moment,
                "squares": inverse @ self.squares,
            }
        if isinstance(self.rows, np.ndarray):
            gram = (self.rows * inverse[:, None]).T @ self.rows
        elif self.pairs is not None:
            gram = self.pairs.gram(inverse)
        else:
            gram = (self.rows.T @ sparse.diags(inverse) @ self.rows).toarray()
        return {
            "gram": gram,
            "moment": np.asarray(self.rows.T @ (inverse * self.h)).reshape(-1),
            "squares": inverse @ np.square(self.h),
        }

    def corrections(self, factor):
        """What eliminating the factor takes from the rest's system (see `_FirstFactorBlocks`)."""
        t_squared = float(factor[0, 0]) ** 2
        sums = self.at(t_squared, 1)
        return {
            "gram": t_squared * sums["gram"],
            "moment": t_squared * sums["moment"],
            "squares": t_squared * sums["squares"],
            "log_det": self._count() @ np.log(t_squared * self.weight + 1.0),
        }

    def conditional(self, factor):
        """K_g = t^2 / D_g per group, `(G, 1, 1)`."""
        t_squared = float(factor[0, 0]) ** 2
        return (t_squared / (t_squared * self.group_weight + 1.0))[:, None, None]

    def offsets(self, factor, v):
        """u = t (h - C v) / D, `(G, 1)`."""
        t = float(factor[0, 0])
        diagonal = t**2 * self.group_weight + 1.0
        return (t * (self.group_moment - self.cross @ v) / diagonal)[:, None]

    def _count(self):
        return np.ones(len(self.weight)) if self.count is None else self.count

    def inverse_block_sum(self, factor, lam, inverse, columns):
        """sum_g (M^-1)_gg, `(1, 1)`: D_g^-1 + t^2 D_g^-1 c_g S^-1 c_g' D_g^-1 summed, with
        c_g the group's row of C Lambda-tilde (restricted to `columns`) and `inverse` S^-1."""
        t_squared = float(factor[0, 0]) ** 2
        sums = self.at(t_squared, 2)
        inactive = self.num_groups - self.num_active
        diagonal = self._count() @ (t_squared * self.weight + 1.0) ** -1.0 + inactive
        second = _lambda_products(lam)[2](sums["gram"])[columns, columns]
        return np.array([[diagonal + t_squared * inverse.inner(second)]])


class _GroupPairSums:
    """sum_g w_g c_g c_g' for sparse rows c_g and any weights w, as one sparse product and
    one dense one.

    Columns that are nonzero in at least `group_sums.DENSE_SHARE` of the groups (centred fixed
    effects, a common level) are kept as a dense block F, whose part of the sum is
    F' diag(w) F and S' diag(w) F for the other columns S. Each group's nonzero pairs
    within S, c_gi c_gj (i <= j), are gathered once into a matrix P (one row per pair
    (i, j) that any group has, one column per group), so that the upper triangle of S's
    part is P w. On InstEval (2,972 students, 1,144 other columns) a few milliseconds where
    a sparse triple product took 50; on IMDb (33,000 directors against 1,598 genre sets and
    160 centred features, which are dense) 0.07 s where it took 1.6.

    Example:
        >>> rows = sparse.csr_matrix(np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]]))
        >>> _GroupPairSums.of(rows).gram(np.array([1.0, 2.0])).tolist()
        [[1.0, 2.0, 0.0], [2.0, 6.0, 2.0], [0.0, 2.0, 2.0]]
    """

    LARGEST = 20_000_000  # pairs kept (about 320 MB); more: the sparse product instead
    LARGEST_DENSE = 20_000_000  # entries of F (160 MB) at most

    def __init__(self, keys, pairs, width, sparse_columns, sparse_rows, dense_columns, dense):
        self.keys, self.pairs, self.width = keys, pairs, width
        self.sparse_columns, self.sparse_rows = sparse_columns, sparse_rows  # S' (csr)
        self.dense_columns, self.dense = dense_columns, dense  # F

    @classmethod
    def of(cls, rows):
        """The pair sums of csr `rows`, or None when their sparse columns have more than
        `LARGEST` pairs."""
        rows = sparse.csr_matrix(rows, copy=True)
        rows.sum_duplicates()
        num_groups, width = rows.shape
        share = np.bincount(rows.indices, minlength=width) / max(num_groups, 1)
        by_share = np.argsort(-share, kind="stable")
        most = max(cls.LARGEST_DENSE // max(num_groups, 1), 0)
        dense_columns = np.sort(by_share[:most][share[by_share[:most]] >= DENSE_SHARE])
        sparse_columns = np.setdiff1d(np.arange(width), dense_columns)
        dense = rows[:, dense_columns].toarray()
        rows = rows[:, sparse_columns].tocsr()
        rows.sort_indices()
        lengths = np.diff(rows.indptr)
        if int(np.sum(lengths * (lengths + 1) // 2)) > cls.LARGEST:
            return None
        group = np.repeat(np.arange(num_groups), lengths)
        # each entry e pairs with the entries of its group from e on
        following = np.repeat(rows.indptr[1:], lengths) - np.arange(rows.nnz)
        first = np.repeat(np.arange(rows.nnz), following)
        block_starts = np.repeat(np.cumsum(following) - following, following)
        second = first + np.arange(len(first)) - block_starts  # e, e + 1, ..., group's end
        low = sparse_columns[np.minimum(rows.indices[first], rows.indices[second])]
        high = sparse_columns[np.maximum(rows.indices[first], rows.indices[second])]
        keys, pair = np.unique(low.astype("int64") * width + high, return_inverse=True)
        values = rows.data[first] * rows.data[second]
        pairs = sparse.csr_matrix((values, (pair, group[first])), shape=(len(keys), num_groups))
        return cls(keys, pairs, width, sparse_columns, rows.T.tocsr(), dense_columns, dense)

    def gram(self, weights) -> np.ndarray:
        sums = self.pairs @ weights
        gram = np.zeros(self.width * self.width)
        gram[self.keys] = sums
        low, high = np.divmod(self.keys, self.width)
        off = low != high
        gram[high[off] * self.width + low[off]] = sums[off]
        gram = gram.reshape(self.width, self.width)
        if len(self.dense_columns):
            weighted = self.dense * weights[:, None]
            dense = self.dense_columns
            gram[np.ix_(dense, dense)] = self.dense.T @ weighted
            mixed = np.asarray(self.sparse_rows @ weighted)
            gram[np.ix_(self.sparse_columns, dense)] = mixed
            gram[np.ix_(dense, self.sparse_columns)] = mixed.T
        return gram


class _FirstFactorBlocks:
    """The largest factor's elimination when its groups have d > 1 coefficients.

    Its block of Lambda' Z'WZ Lambda + I is block diagonal, G_g = Lambda' A_g Lambda + I
    (A_g = Z_g' W Z_g), with c_g = Z_g' W R (R: the rest's columns) and h_g = Z_g' W y.
    Eliminating it takes sum_g c_g' K_g c_g from the rest's Gram matrix, sum_g c_g' K_g h_g
    from its moment and sum_g h_g' K_g h_g from y'Wy, where K_g = Lambda G_g^-1 Lambda', and
    adds sum_g log det G_g to log det M. The coupling C (rows c_g) is kept split
    (`SplitRows`): the columns most groups touch (the fixed effects) dense, the others
    (other factors' levels) sparse, so that a rest of many levels costs what its pairs
    within groups do. 2,000 subjects with random slopes crossed with 600 items (30,000
    rows): the whole fit 1.5-2.3 s, where holding C dense took 6.6 s and finite differences
    over sparse products 17 s (the same loaded machine).
    """

    def __init__(self, gram, moment, cross):
        self.gram, self.moment, self.cross = gram, moment, cross  # (G, d, d), (G, d), C
        self.num_groups, self.d = moment.shape
        self.split = SplitRows(sparse.csr_matrix(cross), self.d)
        self.pair_gram = self.split.pair_gram()

    def _at(self, factor):
        """G_g^-1 per group `(G, d, d)` and sum_g log det G_g at Lambda = `factor`, kept for
        the next call (a criterion evaluation asks for them three times)."""
        key = factor.tobytes()
        if getattr(self, "_cached", (None,))[0] != key:
            blocks = _congruence(self.gram, factor) + np.eye(self.d)
            self._cached = (key, *_spd_inverses(blocks))
        return self._cached[1:]

    def conditional(self, factor):
        """K_g = Lambda G_g^-1 Lambda' per group, `(G, d, d)`."""
        return _congruence(self._at(factor)[0], factor.T)

    def corrections(self, factor):
        conditional, log_det = self.conditional(factor), self._at(factor)[1]
        squares = float(np.einsum("gi,gij,gj->", self.moment, conditional, self.moment))
        weighted_moment = np.einsum("gij,gj->gi", conditional, self.moment).reshape(-1)
        return {
            "gram": self.split.weighted_gram(conditional, self.pair_gram),
            "moment": np.asarray(self.cross.T @ weighted_moment).reshape(-1),
            "squares": squares,
            "log_det": log_det,
        }

    def inverse_block_sum(self, factor, lam, inverse, columns):
        """sum_g (M^-1)_gg, `(d, d)`: G_g^-1 + P_g S^-1 P_g' summed, with
        P_g = G_g^-1 Lambda' c_g Lambda-tilde (restricted to `columns`) and `inverse` S^-1."""
        blocks_inverse = self._at(factor)[0]
        if isinstance(lam, np.ndarray) and columns == slice(None):  # C's pattern, scaled
            scaled = self.split.scaled(lam)
        else:
            scaled = sparse.csr_matrix(
                self.cross @ (sparse.diags(lam) if isinstance(lam, np.ndarray) else lam)
            )
            scaled = SplitRows(scaled[:, columns], self.d)
        quadratic = scaled.quadratic(inverse.full())  # c_g S^-1 c_g'
        rows = self.num_groups * self.d
        left = (blocks_inverse.reshape(rows, self.d) @ factor.T).reshape(blocks_inverse.shape)
        coupled = batched_product(batched_product(left, quadratic), np.swapaxes(left, 1, 2))
        return blocks_inverse.sum(axis=0) + coupled.sum(axis=0)

    def offsets(self, factor, v):
        """u_g = G_g^-1 Lambda' (h_g - c_g v), `(G, d)`."""
        residual = self.moment - (self.cross @ v).reshape(self.num_groups, self.d)
        return (self._at(factor)[0] @ (residual @ factor)[..., None])[..., 0]


def _spd_inverses(blocks):
    """The inverses of `(G, d, d)` symmetric positive definite blocks and the sum of their log
    determinants, by Cholesky entry by entry with each entry a vector over the G blocks: for
    small d, 6x faster than numpy's batched `inv` and `slogdet` (1,500 blocks of 3 x 3:
    0.09 ms against 0.54).

    Example:
        >>> blocks = np.array([[[4.0, 2.0], [2.0, 3.0]]])
        >>> inverse, log_det = _spd_inverses(blocks)
        >>> bool(np.allclose(inverse[0], np.linalg.inv(blocks[0]))), round(log_det, 6)
        (True, 2.079442)
    """
    d = blocks.shape[-1]
    entry = np.moveaxis(blocks, 0, -1)  # entry[i, j]: (G,)
    lower = [[None] * d for _ in range(d)]  # the Cholesky factor L
    for j in range(d):
        lower[j][j] = np.sqrt(entry[j, j] - sum(lower[j][k] ** 2 for k in range(j)))
        for i in range(j + 1, d):
            dot = sum(lower[i][k] * lower[j][k] for k in range(j))
            lower[i][j] = (entry[i, j] - dot) / lower[j][j]
    log_det = 2.0 * float(sum(np.sum(np.log(lower[j][j])) for j in range(d)))
    solved = [[None] * d for _ in range(d)]  # L^-1, lower triangular
    for j in range(d):
        solved[j][j] = 1.0 / lower[j][j]
        for i in range(j + 1, d):
            dot = sum(lower[i][k] * solved[k][j] for k in range(j, i))
            solved[i][j] = -dot / lower[i][i]
    inverse = np.empty((d, d, blocks.shape[0]))  # L^-T L^-1
    for i in range(d):
        for j in range(i + 1):
            inverse[i, j] = inverse[j, i] = sum(solved[k][i] * solved[k][j] for k in range(i, d))
    return np.ascontiguousarray(np.moveaxis(inverse, -1, 0)), log_det


def _congruence(blocks, factor):
    """F' B_g F for symmetric `(G, d, d)` blocks B_g, as two 2-D products (numpy's batched
    products of 3 x 3 matrices cost 2.5x more)."""
    num_blocks, d, _ = blocks.shape
    right = (blocks.reshape(-1, d) @ factor).reshape(num_blocks, d, -1)  # B_g F
    product = np.swapaxes(right, 1, 2).reshape(-1, d) @ factor  # (F' B_g) F
    return product.reshape(num_blocks, factor.shape[1], factor.shape[1])


def _block_diagonal(blocks):
    """A sparse block-diagonal matrix from `(G, d, d)` blocks."""
    num_blocks, d, _ = blocks.shape
    return sparse.bsr_matrix(
        (blocks, np.arange(num_blocks), np.arange(num_blocks + 1)),
        shape=(num_blocks * d, num_blocks * d),
    ).tocsr()


def _cholesky_inverse(factor):
    """S^-1 from S's lower Cholesky factor (LAPACK's potri: a third of the work of inverting
    the factor and multiplying)."""
    return _SymmetricInverse(factor).full()


class _SymmetricInverse:
    """S^-1 from S's lower Cholesky factor, kept as its lower triangle: what the gradient
    reads (a diagonal, an inner product with a symmetric matrix) needs no full copy."""

    def __init__(self, factor):
        if len(factor) == 0:
            self.lower = np.zeros((0, 0))
            return
        lower, info = linalg.lapack.dpotri(factor, lower=1)
        if info:
            raise linalg.LinAlgError(f"potri failed with info={info}")
        self.lower = np.tril(lower)

    def diagonal(self):
        return np.diag(self.lower)

    def full(self):
        return self.lower + np.tril(self.lower, -1).T

    def block(self, columns):
        """The symmetric block over `columns` (a slice)."""
        part = self.lower[columns, columns]
        return part + np.tril(part, -1).T

    def inner(self, symmetric):
        """sum_ij (S^-1)_ij X_ij for a symmetric X."""
        twice = 2.0 * np.sum(self.lower * symmetric)
        return twice - float(np.diag(self.lower) @ np.diag(symmetric))


def _lambda_products(lam):
    """(x -> Lambda-tilde x, x -> Lambda-tilde' x, G -> Lambda-tilde' G Lambda-tilde) for
    Lambda-tilde a diagonal (a vector) or a sparse block-diagonal matrix."""
    if isinstance(lam, np.ndarray):
        return (
            lambda x: lam * x,
            lambda x: lam * x,
            lambda gram: lam[:, None] * gram * lam[None, :],
        )
    transpose = lam.T.tocsr()
    return (
        lambda x: lam @ x,
        lambda x: transpose @ x,
        lambda gram: np.asarray(transpose @ np.asarray(transpose @ gram).T),
    )


class LinearMixedSystem:
    """Sufficient statistics of a linear mixed model, from one pass over the rows.

    Args:
        response: `(n,)` the part of y the linear terms explain.
        weights: `(n,)` frequency weights.
        design: `(n, p)` fixed-effect design, the intercept column first.
        codes: one `(n,)` integer array per grouping factor.
        num_levels: the levels of each factor.
        prior_mean, prior_precision: `(p,)` beta's Normal prior.
        terms: per factor, its rows' term vectors `(n, d_k)` (`[1, z_i]` for a random
            intercept and slopes), or None for a random intercept alone (the default).
        correlated: per factor, whether its terms are correlated (default True).

    theta is `CovarianceFactors`'s vector (one sigma_k / s per factor for random
    intercepts).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> g = np.repeat(np.arange(10), 5)
        >>> y = 1.0 + rng.normal(0, 1, 10)[g] + rng.normal(0, 0.5, 50)
        >>> system = LinearMixedSystem(y, np.ones(50), np.ones((50, 1)), [g], [10],
        ...                            np.zeros(1), np.zeros(1))
        >>> theta, noise_scale = system.fit(np.array([1.0]), 1.0)  # REML
        >>> round(float(theta[0] * noise_scale), 3), round(noise_scale, 3)  # truth 1.0, 0.5
        (0.962, 0.415)
    """

    def __init__(
        self,
        response,
        weights,
        design,
        codes,
        num_levels,
        prior_mean,
        prior_precision,
        terms=None,
        correlated=None,
        rows=None,
    ):
        self._set_common(
            response,
            weights,
            design,
            num_levels,
            prior_mean,
            prior_precision,
            terms,
            correlated,
            rows,
        )
        sizes = [g * d for g, d in zip(self.num_levels, self.num_terms)]
        self.first = int(np.argmax(sizes)) if sizes else None
        others = [k for k in range(len(sizes)) if k != self.first]
        self.rest_layout, start = {}, 0
        for k in others:
            self.rest_layout[k] = slice(start, start + sizes[k])
            start += sizes[k]
        self.num_rest_levels = start
        m = dense_coefficients(self.num_levels, self.num_terms, self.num_fixed)
        if m > MAX_DENSE_LEVELS:
            described = ", ".join(str(sizes[k]) for k in others)
            raise ValueError(
                f"the exact finish factors the coefficients of every grouping factor but the "
                f"largest ({described}) plus {self.num_fixed} fixed effects densely, at most "
                f"{MAX_DENSE_LEVELS} in all; this model has {m}"
            )
        # r = [the other factors' Z (sparse), the design D (dense, multiplied by BLAS)]
        parts = [_term_indicator(codes[k], self.num_levels[k], self.terms[k]) for k in others]
        weighted_design = weights[:, None] * design
        self.rest_gram = design.T @ weighted_design
        self.rest_moment = weighted_design.T @ response
        if parts:
            others_z = sparse.hstack(parts, format="csr")
            weighted_others = sparse.diags(weights) @ others_z
            between = np.asarray(others_z.T @ weighted_design)
            self.rest_gram = np.block(
                [[(others_z.T @ weighted_others).toarray(), between], [between.T, self.rest_gram]]
            )
            self.rest_moment = np.concatenate(
                [np.asarray(weighted_others.T @ response).reshape(-1), self.rest_moment]
            )
        self._first = None
        if self.first is not None:
            levels, d = self.num_levels[self.first], self.num_terms[self.first]
            indicator = _term_indicator(codes[self.first], levels, self.terms[self.first])
            crosses = [indicator.T @ weighted_others] if parts else []
            crosses.append(sparse.csr_matrix(indicator.T @ weighted_design))
            cross = sparse.hstack(crosses, format="csr")
            moment = np.asarray(indicator.T @ (weights * response)).reshape(-1)
            if d == 1:
                weight = np.asarray(indicator.T @ (weights * self.terms[self.first][:, 0]))
                self._first = _FirstFactorSums(weight.reshape(-1), moment, cross)
            else:
                terms, first_codes = self.terms[self.first], codes[self.first]
                blocks = np.stack(
                    [
                        np.bincount(first_codes, weights * terms[:, i] * terms[:, j], levels)
                        for i in range(d)
                        for j in range(d)
                    ],
                    axis=-1,
                ).reshape(levels, d, d)
                self._first = _FirstFactorBlocks(blocks, moment.reshape(levels, d), cross)

    def _set_common(
        self,
        response,
        weights,
        design,
        num_levels,
        prior_mean,
        prior_precision,
        terms,
        correlated,
        rows=None,
    ):
        """What every system reads: levels, term vectors, widths, totals and beta's prior.
        `rows` is the number of rows the weighted rows stand for (default the weights'
        sum; less when the weights also carry each row's precision, `finish_gaussian`'s
        `noise_ratio`): the likelihood's count, which the profiled s^2 divides by."""
        num_rows = len(response)
        self.num_levels = [int(g) for g in num_levels]
        terms = [None] * len(self.num_levels) if terms is None else list(terms)
        self.terms = [
            np.ones((num_rows, 1)) if t is None else np.asarray(t, "float64").reshape(num_rows, -1)
            for t in terms
        ]
        self.num_terms = [t.shape[1] for t in self.terms]
        self.covariance_factors = CovarianceFactors(self.num_terms, correlated)
        self.num_fixed = design.shape[1]
        # A column of zeros (a constant feature, once centred) says nothing about y: its
        # coefficient keeps its prior, and REML counts only the other columns.
        self.empty_columns = ~np.any(design != 0, axis=0)
        self.total_weight = float(weights.sum() if rows is None else rows)
        self.weighted_squares = float(weights @ np.square(response))
        self.prior_mean = np.asarray(prior_mean, "float64")
        self.prior_precision = np.asarray(prior_precision, "float64")

    def _rest_lambda(self, factors):
        """Lambda-tilde over r: each factor's Lambda_k once per level, 1 for beta; a vector
        when every factor in r is a random intercept."""
        if all(self.num_terms[k] == 1 for k in self.rest_layout):
            scale = np.ones(self.num_rest_levels + self.num_fixed)
            for k, columns in self.rest_layout.items():
                scale[columns] = factors[k][0, 0]
            return scale
        blocks = [
            sparse.kron(sparse.identity(self.num_levels[k]), factors[k]) for k in self.rest_layout
        ]
        return sparse.block_diag([*blocks, sparse.identity(self.num_fixed)], format="csr")

    def _ridge(self, noise_variance):
        return max(noise_variance, _SMALLEST_RIDGE * self.weighted_squares / self.total_weight)

    def solve(self, theta, noise_variance):
        """Penalised least squares at theta: a dict with the Schur complement's Cholesky
        factor, the solution and the pieces of the criterion."""
        factors = self.covariance_factors.matrices(np.asarray(theta, "float64"))
        lam = self._rest_lambda(factors)
        times, transpose_times, scaled = _lambda_products(lam)
        fixed = slice(self.num_rest_levels, None)
        ridge = self._ridge(noise_variance)
        full_rhs = transpose_times(self.rest_moment)  # r's part of M's right-hand side
        full_rhs[fixed] += ridge * self.prior_precision * self.prior_mean
        gram, moment = self.rest_gram, self.rest_moment
        if self.first is not None:
            eliminated = self._first.corrections(factors[self.first])
            gram = gram - eliminated["gram"]
            moment = moment - eliminated["moment"]
        # beta's prior as a ridge; floored for an exact fit (s -> 0), where it alone keeps
        # collinear fixed effects determined
        penalty = np.ones(len(full_rhs))
        penalty[fixed] = ridge * self.prior_precision
        schur = scaled(gram) + np.diag(penalty)
        rhs = transpose_times(moment)
        rhs[fixed] += ridge * self.prior_precision * self.prior_mean
        if not np.all(np.isfinite(schur)):
            return None
        try:
            factor = linalg.cholesky(schur, lower=True, check_finite=False)
        except linalg.LinAlgError:
            return None
        rest = linalg.cho_solve((factor, True), rhs)
        solution_rhs = rest @ full_rhs
        log_det_random = 2.0 * np.sum(np.log(np.diag(factor)[: self.num_rest_levels]))
        log_det_fixed = 2.0 * np.sum(np.log(np.diag(factor)[self.num_rest_levels :]))
        if self.first is not None:
            # the first factor's u . (its right-hand side), with u = G^-1 Lambda' (h - C v)
            solution_rhs += eliminated["squares"] - times(rest) @ eliminated["moment"]
            log_det_random += eliminated["log_det"]
        residual = (
            self.weighted_squares
            + ridge * self.prior_mean @ (self.prior_precision * self.prior_mean)
            - solution_rhs
        )
        return {
            "lam": lam,
            "factors": factors,
            "factor": factor,
            "rest": rest,
            "log_det_random": log_det_random,
            "log_det_fixed": log_det_fixed,
            "residual": max(residual, 0.0),
        }

    def first_solution(self, pls):
        """u of the first factor in a `solve` result, `(G, d)`."""
        v = _lambda_products(pls["lam"])[0](pls["rest"])
        return self._first.offsets(pls["factors"][self.first], v)

    def coefficients(self, pls):
        """The per-factor u, `(G_k, d_k)` each, and beta in a `solve` result."""
        offsets = [None] * len(self.num_levels)
        for k, columns in self.rest_layout.items():
            offsets[k] = pls["rest"][columns].reshape(self.num_levels[k], -1)
        if self.first is not None:
            offsets[self.first] = self.first_solution(pls)
        return offsets, pls["rest"][self.num_rest_levels :]

    def criterion(self, theta, noise_variance, reml=True):
        """The profiled REML (or ML) criterion at theta, its gradient in theta (None for
        `sparse_finish`'s system), and the profiled s^2.

        beta's prior enters M as the ridge `noise_variance` P0 (lme4's criterion on a
        ridge-penalised system); `fit` iterates until `noise_variance` is the profiled s^2,
        where the ridge is the prior's. With Lambda-tilde = diag(Lambda, I) and
        M = Lambda-tilde' G Lambda-tilde + J, for the entry (r, c) of factor k's Lambda_k

            d log det M / d theta = 2 [(q_k I - B_k) Lambda_k^-1]_(c, r),
            d r / d theta         = -2 [Lambda_k^-T U_k]_(r, c)

        where q_k is its number of levels, B_k the sum of its groups' diagonal blocks of
        M^-1 (of the u block's inverse for ML) and U_k = sum_g u_g u_g' (the first from
        tr(M^-1 dM) with Lambda-tilde' G Lambda-tilde = M - J, the second from the
        envelope theorem and the normal equations Lambda' Z'W(y - X beta - Z b) = u); for a
        random intercept they read 2 (q_k - tr_k M^-1) / theta_k and -2 |u_k|^2 / theta_k.
        """
        pls = self.solve(theta, noise_variance)
        if pls is None:
            return np.inf, np.zeros(len(theta)), noise_variance
        if reml:
            dof = self.total_weight - np.count_nonzero(~self.empty_columns)
            # an empty column's block of M is its prior's alone: s^2 P0_jj
            empty = self._ridge(noise_variance) * self.prior_precision[self.empty_columns]
            log_det = pls["log_det_random"] + pls["log_det_fixed"] - np.sum(np.log(empty))
        else:
            dof = self.total_weight
            log_det = pls["log_det_random"]
        dof = max(dof, 1.0)
        variance = max(pls["residual"] / dof, 1e-300)
        value = dof * np.log(variance) + log_det
        sums = self._block_sums(pls, reml)
        if sums is None:  # `sparse_finish`'s system
            return value, None, variance
        gradient = np.zeros(len(theta))
        layout = self.covariance_factors
        for k, (inverse_blocks, squares) in enumerate(zip(*sums)):
            lower = pls["factors"][k]
            rows, columns = layout.entries[k]
            if np.any(np.diag(lower) <= 0):
                continue  # even in each diagonal entry: flat at 0
            inverse_lower = linalg.solve_triangular(lower, np.eye(len(lower)), lower=True)
            levels = self.num_levels[k]
            log_det_part = 2.0 * (levels * np.eye(len(lower)) - inverse_blocks) @ inverse_lower
            residual_part = -2.0 * inverse_lower.T @ squares / variance
            gradient[layout.slices[k]] = log_det_part[columns, rows] + residual_part[rows, columns]
        return value, gradient, variance

    def _ridge_settled(self, variance, new_variance) -> bool:
        """Whether s^2 moved from `variance` to `new_variance` moves beta's prior ridge
        s^2 P0 too little to search theta again: by at most `_RIDGE_TOLERANCE` of itself,
        or by at most 1e-8 of the data's information on beta (diag D'WD), which moves the
        estimates by about as much relative, far below lme4's 1e-3 (on InstEval a search
        again took 16 evaluations for a change of 5e-10 of the information)."""
        change = abs(self._ridge(new_variance) - self._ridge(variance))
        if not self.prior_precision.any() or change <= _RIDGE_TOLERANCE * self._ridge(variance):
            return True
        information = np.maximum(self._fixed_information(), 1e-300)
        return change * np.max(self.prior_precision / information) <= 1e-8

    def _fixed_information(self) -> np.ndarray:
        """diag D'WD."""
        return np.diag(self.rest_gram)[self.num_rest_levels :]

    def _minimize(self, objective, start, bounds, analytic):
        """L-BFGS-B, on `criterion`'s gradient or on finite differences."""
        return optimize.minimize(
            objective,
            start,
            method="L-BFGS-B",
            jac=True if analytic else "3-point",
            bounds=bounds,
            options={"ftol": _SEARCH_TOLERANCE, "gtol": 1e-8, "maxiter": 500},
        )

    def _has_gradient(self) -> bool:
        """Whether `criterion` returns its gradient (here always; `sparse_finish`'s system
        searches without)."""
        return True

    def _block_sums(self, pls, reml):
        """Per factor k, B_k (the sum of its groups' d x d diagonal blocks of M^-1, or of the
        u block's inverse for ML) and U_k = sum_g u_g u_g'."""
        first = self._first
        num_rest = self.num_rest_levels
        factor = pls["factor"] if reml else pls["factor"][:num_rest, :num_rest]
        inverse = _SymmetricInverse(factor)  # the Schur complement's inverse
        inverse_blocks = [None] * len(self.num_levels)
        squares = [None] * len(self.num_levels)
        for k, columns in self.rest_layout.items():
            d, levels = self.num_terms[k], self.num_levels[k]
            if d == 1:
                inverse_blocks[k] = np.array([[inverse.diagonal()[columns].sum()]])
            else:
                block = inverse.block(columns).reshape(levels, d, levels, d)
                inverse_blocks[k] = np.einsum("gigj->ij", block)
            u = pls["rest"][columns].reshape(levels, d)
            squares[k] = u.T @ u
        if self.first is not None:
            lower = pls["factors"][self.first]
            columns = slice(None) if reml else slice(0, num_rest)
            inverse_blocks[self.first] = first.inverse_block_sum(
                lower, pls["lam"], inverse, columns
            )
            u = self.first_solution(pls)
            squares[self.first] = u.T @ u
        return inverse_blocks, squares

    @_one_blas_thread
    def fit(self, theta, noise_scale, free=None, reml=True):
        """REML (or ML) estimates of theta and s, started at `theta` and `noise_scale`.

        Args:
            theta: starting theta (`CovarianceFactors`'s vector; for random intercepts the
                relative scales sigma_k / s).
            noise_scale: starting s.
            free: boolean per factor, the factors whose theta is estimated (the others are
                held).
            reml: REML (True) or ML.

        Returns:
            `(theta, noise_scale)`.
        """
        layout = self.covariance_factors
        theta = np.asarray(theta, "float64").copy()
        free = np.ones(len(self.num_levels), bool) if free is None else np.asarray(free, bool)
        mask = layout.entries_of(free)
        analytic = self._has_gradient()
        variance = float(noise_scale) ** 2
        for iteration in range(20):
            if mask.any():
                theta, value = self._search(theta, mask, variance, reml, analytic)
                # A diagonal entry searched as it is can stall at its bound, a local optimum
                # at Sigma_k's boundary (the criterion's slope there is that of a variance's
                # square root); restart it inside once and keep the better of the two.
                stalled = mask & layout.diagonal & ~layout.squared
                stalled &= theta <= 2.0 * _SMALLEST_THETA
                if iteration == 0 and stalled.any():
                    restart = theta.copy()
                    restart[stalled] = 1.0
                    other, other_value = self._search(restart, mask, variance, reml, analytic)
                    if other_value < value:
                        theta = other
            _, _, new_variance = self.criterion(theta, variance, reml)
            converged = self._ridge_settled(variance, new_variance)
            variance = new_variance
            if converged:
                break
        return theta, float(np.sqrt(variance))

    def _search(self, theta, mask, variance, reml, analytic):
        """The criterion minimised (`_minimize`) over the entries of theta in `mask`, the
        others held, from `theta`; returns the new theta and the criterion there."""
        layout = self.covariance_factors
        # a random intercept's theta through its intraclass correlation v = t / (1 + t) of
        # t = theta^2 (sigma_k^2 / (sigma_k^2 + s^2)), other diagonal entries alone in their
        # column through t
        intercept = np.concatenate(
            [
                np.full(part.stop - part.start, d == 1)
                for d, part in zip(layout.num_terms, layout.slices)
            ]
        )[mask]

        def with_values(values):
            values = np.array(values, "float64")
            values[intercept] /= 1.0 - values[intercept]  # t
            trial = theta.copy()
            trial[mask] = layout.from_search(values, mask)
            return trial

        def objective(values):
            trial = with_values(values)
            value, gradient, _ = self.criterion(trial, variance, reml)
            if not analytic:
                return value
            gradient = gradient[mask].copy()
            squared = layout.squared[mask]
            gradient[squared] /= 2.0 * trial[mask][squared]  # d / dt
            gradient[intercept] *= (1.0 + trial[mask][intercept] ** 2) ** 2  # d / dv
            return value, gradient

        # In t the criterion has a non-zero slope at the boundary (in theta it is even, so
        # theta = 0 is always stationary, a maximum as often as not), and v is t near 0.
        # Toward sigma_k >> s (groups whose rows agree) the criterion flattens in t, its
        # slope falling like t^-2 and less: there L-BFGS-B's first step (the gradient itself)
        # gained less than rounding and the search stopped where it stood (theta 95 against
        # an optimum at 455, 1.7 of criterion above it), while in v the slope stays finite.
        # Without an analytic gradient (`sparse_finish`), finite differences.
        start = layout.to_search(theta, mask)
        start[intercept] /= 1.0 + start[intercept]
        bounds = [
            (low / (1.0 + low), high / (1.0 + high)) if icc else (low, high)
            for (low, high), icc in zip(layout.bounds(mask), intercept)
        ]
        result = self._minimize(objective, start, bounds, analytic)
        values, value = result.x, float(result.fun)
        # L-BFGS-B stops once a step gains less than that tolerance, which where the
        # criterion is flat can be short of the boundary: an entry searched squared whose
        # slope still rises away from its lower bound goes there unless the criterion is
        # higher there by more than the search resolves (each row its own group, fitted
        # exactly: theta stopped anywhere from 1e-5 to 0.03, the criterion equal to 1e-9).
        slope = getattr(result, "jac", None)  # a derivative-free search has none
        rising = np.zeros(len(values), bool) if slope is None else slope > 0
        for i in np.flatnonzero(layout.squared[mask] & rising):
            trial = values.copy()
            trial[i] = bounds[i][0]
            at_bound = self.criterion(with_values(trial), variance, reml)[0]
            if at_bound <= value + _SEARCH_TOLERANCE * max(abs(value), 1.0):
                values, value = trial, at_bound
        return with_values(values), value

    @_one_blas_thread
    def posterior(self, theta, noise_scale) -> JointPosterior:
        """The posterior of (beta, every b_k) given theta and s, on b's scale."""
        variance = float(noise_scale) ** 2
        pls = self.solve(theta, variance)
        if pls is None:
            raise ValueError("the mixed model's system is singular at the estimated scales")
        lam, factor = pls["lam"], pls["factor"]
        inverse = _cholesky_inverse(factor)
        if isinstance(lam, np.ndarray):
            rest_covariance = variance * lam[:, None] * inverse * lam[None, :]
        else:
            rest_covariance = variance * np.asarray(lam @ np.asarray(lam @ inverse).T)
        rest_mean = _lambda_products(lam)[0](pls["rest"])
        first = first_mean = first_covariance = coupling = None
        if self.first is not None:
            first = self.first
            lower = pls["factors"][first]
            conditional = self._first.conditional(lower)
            first_mean = self.first_solution(pls) @ lower.T
            first_covariance = variance * conditional
            coupling = _block_diagonal(conditional) @ self._first.cross
        return JointPosterior(
            self.num_levels,
            self.num_terms,
            first,
            first_mean,
            first_covariance,
            coupling,
            self.rest_layout,
            self.num_fixed,
            rest_mean,
            rest_covariance,
        )


def finish_gaussian(
    model,
    intercept,
    factors,
    fixed_effects=None,
    features=None,
    *,
    y,
    held,
    sample_weight=None,
    reml=True,
    noise_ratio=None,
) -> JointPosterior | GroupsGivenFixedPosterior:
    """Moves a Gaussian model's linear part to lme4's estimates and its exact posterior.

    Args:
        model: an `ELBOModel` with a `Gaussian` likelihood.
        intercept: its `GlobalIntercept` (units=1).
        factors: list of `(RandomIntercept, training ids)` pairs.
        fixed_effects: its `FixedEffects` (units=1), or None; `features` its `(n, d)` input.
        y: `(n,)` training responses on the model's scale.
        held: `(n,)` the part of the predictor held fixed (a subnetwork's output), or 0.
        sample_weight: `(n,)` frequency weights, or None.
        reml: REML (True) or ML estimates of the scales.
        noise_ratio: `(n,)` each row's noise variance as a multiple of s^2, or None (all
            1): y_i ~ Normal(eta_i, noise_ratio_i s^2). The estimators give the rows of
            each pattern of missing inputs a ratio of their own.

    The scales are lme4's; with hyperpriors (layers with a `scale_prior`) or LKJ priors on
    R_k (`RandomEffects` with a `correlation_prior` eta != 1), the scales are at the mode
    of the marginal posterior of the log sds of the factors' terms, R_k and log s (flat
    priors on the others; `_scale_prior_mode`), and each q(sigma_kj) under a hyperprior is
    the Laplace approximation there (LogNormal). Each layer is left with the joint
    posterior's marginal means and sds.

    Returns:
        The `JointPosterior` of `[alpha, *beta]` and every factor's offsets (past the
        dense limit, `sparse_finish`'s `GroupsGivenFixedPosterior`).

    Example:
        >>> import keras
        >>> from reffects import ELBOModel, GlobalIntercept, RandomIntercept
        >>> ids = keras.Input(shape=(), dtype="int64")
        >>> alpha, layer = GlobalIntercept(), RandomIntercept(3)
        >>> model = ELBOModel(keras.Model(ids, keras.layers.Add()([alpha(ids), layer(ids)])))
        >>> g, y = np.array([0, 0, 1, 2, 2, 2]), np.array([1.0, 1.2, -0.5, 0.1, 0.3, 0.2])
        >>> layer.adapt(g)
        >>> posterior = finish_gaussian(model, alpha, [(layer, g)], y=y, held=0.0)
        >>> posterior.fixed_mean().shape
        (1,)
    """
    y, weights, layers, codes, terms, correlated = _rows_and_factors(y, sample_weight, factors)
    design, _, prior_mean, prior_precision = _linear_layers(
        intercept, fixed_effects, features, len(y)
    )
    num_levels = [layer.num_groups for layer in layers]
    num_terms = [1 if t is None else t.shape[1] for t in terms]
    rows = float(weights.sum())
    if noise_ratio is not None:
        weights = weights / np.asarray(noise_ratio, "float64").reshape(-1)
    arguments = (y - held, weights, design, codes, num_levels, prior_mean, prior_precision)
    wide = dense_coefficients(num_levels, num_terms, design.shape[1]) > MAX_DENSE_LEVELS
    if wide and all(d == 1 for d in num_terms):
        from reffects.sparse_finish import SparseMixedSystem  # it builds on this module

        system = SparseMixedSystem(*arguments, terms, rows=rows)
    else:  # too wide with more terms per group: LinearMixedSystem raises, naming the sizes
        system = LinearMixedSystem(*arguments, terms, correlated, rows=rows)
    noise_scale = float(model.likelihood.noise_scale())
    layout = system.covariance_factors
    theta = layout.theta([_covariance_factor(layer, noise_scale) for layer in layers])
    theta, noise_scale = _better_start(
        system, theta, noise_scale, y - held, weights, codes, design, reml
    )
    theta, noise_scale = system.fit(theta, noise_scale, reml=reml)
    priors = _Priors(layers)
    if priors.any:
        theta, noise_scale = _scale_prior_mode(system, theta, noise_scale, priors, reml)
    posterior = system.posterior(theta, noise_scale)
    _write_back(posterior, intercept, fixed_effects, layers, layout.matrices(theta), noise_scale)
    model.likelihood.set_noise_scale(noise_scale)
    _write_scale_posteriors(system, layers, priors, theta, noise_scale, reml)
    return posterior


@_one_blas_thread
def _better_start(system, theta, noise_scale, response, weights, codes, design, reml):
    """The start of the search: the layers' theta (SGD's, or their initial values) or a
    moment estimate (`_crossed_moments`, for the random intercepts; slope factors keep
    theirs), whichever has the lower criterion; s is the profiled one there.

    On finish_speed's four crossed factors the one-way moments it replaced started at
    theta = (1.80, 0.96, 0.57, 0.26) against the optimum's (0.72, 0.35, 0.25, 0.15).
    """
    if not system.num_levels:
        return theta, noise_scale
    intercepts = [k for k, d in enumerate(system.num_terms) if d == 1]
    root = np.sqrt(weights)[:, None]
    beta = np.linalg.lstsq(root * design, root[:, 0] * response, rcond=None)[0]
    residual = response - design @ beta
    sigma_squared, noise = _crossed_moments(residual, weights, [codes[k] for k in intercepts])
    total = weights.sum()
    variance = weights @ np.square(residual - weights @ residual / total) / total
    noise = max(noise, 1e-3 * variance, 1e-300)
    factors = system.covariance_factors.matrices(theta)
    for k, value in zip(intercepts, sigma_squared):
        factors[k] = np.array([[np.clip(np.sqrt(max(value, 0.0) / noise), 1e-2, 1e2)]])
    moments = system.covariance_factors.theta(factors)
    starts = [(theta, float(noise_scale) ** 2), (moments, noise)]
    scored = [system.criterion(t, v, reml) for t, v in starts]
    (best, _), (_, _, profiled) = min(zip(starts, scored), key=lambda pair: pair[1][0])
    return best, float(np.sqrt(profiled))


def _crossed_moments(response, weights, codes):
    """Method-of-moments variances of crossed random intercepts and of the noise, for a
    start: `(sigma_k^2 per factor, s^2)` (Gao and Owen 2017, "Efficient moment calculations
    for variance components in large unbalanced crossed random effects models", EJS 11(1)).

    The weighted pairs of rows that share factor k's level have squared differences summing
    to U_k, whose expectation is 2 s^2 P_k + 2 sum_(m != k) sigma_m^2 (P_k - P_km), with
    P_k the pairs' weight and P_km that of the pairs sharing m's level too; with U_0 over
    every pair, that is one linear equation per factor and one more. One-way ANOVA, factor
    by factor, counts the other factors' variance in each (their levels do not average out
    over a few rows), which this does not.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> a, b = rng.integers(0, 200, 5000), rng.integers(0, 100, 5000)
        >>> y = rng.normal(0, 1.0, 200)[a] + rng.normal(0, 0.5, 100)[b] + rng.normal(0, 1, 5000)
        >>> sigma_squared, noise = _crossed_moments(y, np.ones(5000), [a, b])
        >>> np.round(sigma_squared, 2).tolist(), round(float(noise), 2)  # 1, 0.25, 1
        ([0.99, 0.25], 1.03)
    """

    def pairs(keys):
        """(the weight of the pairs of rows with equal keys, their sum of w w' (y - y')^2)"""
        _, cell = np.unique(keys, return_inverse=True)
        total = np.bincount(cell, weights)
        first = np.bincount(cell, weights * response)
        second = np.bincount(cell, weights * np.square(response))
        weight = (np.sum(np.square(total)) - np.sum(np.square(weights))) / 2.0
        return weight, float(np.sum(total * second - np.square(first)))

    num = len(codes)
    every, every_sum = pairs(np.zeros(len(response), "int64"))
    alone = [pairs(c) for c in codes]
    both = np.zeros((num, num))
    for k in range(num):
        for m in range(k + 1, num):
            keys = codes[k].astype("int64") * (int(codes[m].max()) + 1) + codes[m]
            both[k, m] = both[m, k] = pairs(keys)[0]
    # unknowns (s^2, sigma_1^2, ..., sigma_K^2)
    system = np.zeros((num + 1, num + 1))
    system[0] = [2.0 * every] + [2.0 * (every - alone[m][0]) for m in range(num)]
    for k in range(num):
        system[k + 1, 0] = 2.0 * alone[k][0]
        for m in range(num):
            if m != k:
                system[k + 1, m + 1] = 2.0 * (alone[k][0] - both[k, m])
    values = np.linalg.lstsq(system, [every_sum, *(u for _, u in alone)], rcond=None)[0]
    return values[1:], values[0]


@_one_blas_thread
def _write_scale_posteriors(system, layers, priors, theta, noise_scale, reml):
    """Sets q(sigma_kj) of each hyperprior layer at the mode theta, s (`_log_scale_sds`
    with s held)."""
    layout = system.covariance_factors

    def deviance(trial):
        value = _deviance_at(system, trial, noise_scale, reml)
        return value + priors.penalty(layout, trial, noise_scale)

    for k, (layer, log_prior) in enumerate(zip(layers, priors.log_priors)):
        if log_prior is not None:
            sds = _log_scale_sds(deviance, layout, theta, k)
            _set_scale_posterior(layer, layout.matrices(theta)[k], noise_scale, sds)


def _deviance_at(system, theta, noise_scale, reml):
    """The (RE)ML deviance of a `LinearMixedSystem` at theta and s (not profiled in s):
    dof log s^2 + log det M + r / s^2, less dof, so that it is `criterion`'s value where s
    is the profiled one."""
    variance = float(noise_scale) ** 2
    value, _, profiled = system.criterion(theta, variance, reml)
    if not np.isfinite(value):
        return value
    # `criterion`'s degrees of freedom: value = dof log(profiled) + log det M, r = dof profiled
    fixed = np.count_nonzero(~system.empty_columns) if reml else 0
    dof = max(system.total_weight - fixed, 1.0)
    return value + dof * (np.log(variance / profiled) + profiled / variance - 1.0)


@_one_blas_thread
def _scale_prior_mode(system, theta, noise_scale, priors, reml):
    """theta and s at the mode of the marginal posterior of (log sigma_kj, R_k, log s):
    `_deviance_at` plus `_Priors.penalty`, with flat priors on log s and on the scales and
    R_k without a prior, by L-BFGS-B (finite differences) from the (RE)ML estimates
    `theta`, `noise_scale`."""
    layout = system.covariance_factors
    every = np.ones(layout.size, bool)

    def objective(values):
        trial, scale = layout.from_search(values[:-1], every), np.exp(values[-1])
        value = _deviance_at(system, trial, scale, reml)
        return value + priors.penalty(layout, trial, scale)

    result = optimize.minimize(
        objective,
        np.append(layout.to_search(theta, every), np.log(noise_scale)),
        method="L-BFGS-B",
        jac="3-point",
        # s within e^10 of its (RE)ML value: beyond, the deviance overflows
        bounds=[*layout.bounds(every), (np.log(noise_scale) - 10, np.log(noise_scale) + 10)],
        # ftol: a change of 1e-12 of the deviance (~1e3) moves a log sd by ~1e-5
        options={"ftol": 1e-12, "gtol": 1e-8, "maxiter": 500},
    )
    return layout.from_search(result.x[:-1], every), float(np.exp(result.x[-1]))


def _term_scales(factor) -> np.ndarray:
    """The sds of a factor's terms relative to the scale s: the row norms of Lambda_k
    (Sigma_k = s^2 Lambda_k Lambda_k')."""
    return np.sqrt(np.sum(np.square(factor), axis=1))


def _scale_penalty(layout, theta, log_priors, noise_scale=1.0) -> float:
    """-2 sum_kj [log p(sigma_kj) + log sigma_kj] over the factors k with a hyperprior
    (`log_priors[k]` not None) and their terms j, sigma_kj = s |row j of Lambda_k|: added
    to a deviance, its minimum is the mode of the marginal posterior of the log sds."""
    penalty = 0.0
    if all(log_prior is None for log_prior in log_priors):
        return penalty
    for log_prior, factor in zip(log_priors, layout.matrices(theta)):
        if log_prior is not None:
            sigma = noise_scale * _term_scales(factor)
            penalty -= 2.0 * float(np.sum(log_prior(sigma) + np.log(sigma)))
    return penalty


def _correlation_penalty(layout, theta, etas) -> float:
    """-2 sum_k (eta_k - 1) log det R_k over the factors k with an LKJ(eta_k) prior
    (`etas[k]` not None): -2 log LKJ(R_k | eta_k) less its constant, on the deviance scale.
    R_k = D^-1 Lambda_k Lambda_k' D^-1 (D the row norms of Lambda_k), so with Lambda_k
    lower triangular, log det R_k = 2 sum_j log(Lambda_k,jj / |row j of Lambda_k|).

    Example:
        >>> layout = CovarianceFactors([2])
        >>> theta = layout.theta([np.array([[1.0, 0.0], [0.6, 0.8]])])  # corr 0.6
        >>> round(_correlation_penalty(layout, theta, [3.0]), 4)  # -4 log(1 - 0.36)
        1.7851
    """
    penalty = 0.0
    for eta, factor in zip(etas, layout.matrices(theta)):
        if eta is not None:
            log_det = 2.0 * float(np.sum(np.log(np.abs(np.diag(factor)) / _term_scales(factor))))
            penalty -= 2.0 * (eta - 1.0) * log_det
    return penalty


class _Priors:
    """The priors the finish adds to a deviance, per factor: `log_priors[k]`, log p(sigma)
    of a hyperprior on its sds (`_log_prior`) or None, and `etas[k]`, the eta of an LKJ
    prior on R_k or None (also for eta = 1, the uniform LKJ, so it leaves the fit as is).
    """

    def __init__(self, layers):
        self.log_priors = [_log_prior(layer.scale_prior) for layer in layers]
        self.etas = []
        for layer in layers:
            eta = getattr(layer, "correlation_prior", None)  # RandomIntercept has none
            self.etas.append(None if eta == 1.0 else eta)

    @property
    def any(self) -> bool:
        return any(prior is not None for prior in [*self.log_priors, *self.etas])

    def penalty(self, layout, theta, noise_scale=1.0) -> float:
        """-2 log prior: `_scale_penalty` plus `_correlation_penalty`."""
        scales = _scale_penalty(layout, theta, self.log_priors, noise_scale)
        return scales + _correlation_penalty(layout, theta, self.etas)


def _log_scale_sds(deviance, layout, theta, k, step=1e-3) -> np.ndarray:
    """The sd of each log sigma_kj of factor k under the Laplace approximation at a mode:
    1 / sqrt of the curvature of `deviance(theta) / 2` (minus the log marginal posterior)
    in log sigma_kj, by central differences. Scaling row j of Lambda_k by e^t moves
    sigma_kj alone (R_k and the other sds held)."""
    sds = []
    for j in range(layout.num_terms[k]):

        def half_deviance(shift, j=j):
            factors = layout.matrices(theta)
            factors[k][j] *= np.exp(shift)
            return 0.5 * deviance(layout.theta(factors))

        curvature = half_deviance(step) - 2.0 * half_deviance(0.0) + half_deviance(-step)
        curvature /= step**2
        sds.append(1.0 / np.sqrt(curvature) if curvature > 0 else np.inf)
    return np.array(sds)


def _set_scale_posterior(layer, factor, scale, log_sds):
    """Sets a hyperprior layer's q(sigma_kj) = LogNormal(log sigma_kj, `log_sds[j]`) at the
    mode sigma_kj = s |row j of Lambda_k|, and its R_k when it estimates one."""
    sigma = scale * _term_scales(factor)
    layer.set_group_scale_posterior(np.log(sigma), log_sds)
    if isinstance(layer, RandomEffects) and layer.correlated:
        covariance = factor @ factor.T
        layer.set_correlation(covariance / np.outer(sigma / scale, sigma / scale))


class _GLMFamily:
    """NumPy pieces of a canonical-link GLM family: inverse link, variance, deviance."""

    def __init__(self, likelihood):
        self.log_link = isinstance(likelihood, Poisson)

    def mean(self, eta):
        return np.exp(np.minimum(eta, 700.0)) if self.log_link else special.expit(eta)

    def variance(self, mean):
        return mean if self.log_link else mean * (1.0 - mean)

    def variance_slope(self, mean):
        """dV/dmu."""
        return np.ones_like(mean) if self.log_link else 1.0 - 2.0 * mean

    def deviance(self, y, mean, weights):
        """sum_i w_i d(y_i, mu_i): twice the log-likelihood ratio to the saturated model."""
        if self.log_link:
            unit = special.xlogy(y, y) - special.xlogy(y, mean) - (y - mean)
        else:
            unit = (
                special.xlogy(y, y)
                - special.xlogy(y, mean)
                + special.xlogy(1.0 - y, 1.0 - y)
                - special.xlogy(1.0 - y, 1.0 - mean)
            )
        # a row without weight adds nothing, even where its unit deviance is not finite
        # (y outside (0, 1) on a zero-weight row, or a mean that rounded to 0 or 1)
        counted = weights > 0
        return 2.0 * float(weights[counted] @ unit[counted])


class GeneralizedMixedModel:
    """A GLMM's linear part fitted as glmer does: penalised IRLS and the Laplace deviance.

        eta_i = h_i + d_i . beta + sum_k theta_k u_k[g_k(i)],   u ~ Normal(0, I)

    For given theta (and beta), PIRLS finds the mode of u (and beta) by iterating the
    penalised weighted least-squares system of `LinearMixedSystem` on the working response
    z = eta + (y - mu) / V(mu) with working weights w V(mu) (canonical links), halving steps
    that do not lower the penalised deviance. The Laplace deviance is

        sum_i w_i d(y_i, mu_i) + |u|^2 + log det(Lambda' Z' W Z Lambda + I)   (+ beta's prior)

    at the mode. As glmer's default (nAGQ = 1) does, theta is first fitted with beta in
    PIRLS, then theta and beta together on the Laplace deviance (L-BFGS-B; beta's gradient
    analytic, theta's by central differences). The posterior is the Laplace approximation at
    the mode: Normal, with the inverse of the penalised system as covariance.

    Args:
        likelihood: a `Bernoulli`, `Binomial` or `Poisson` likelihood.
        y: `(n,)` responses (proportions for Binomial).
        weights: `(n,)` weights (Binomial: trials).
        design, codes, num_levels, prior_mean, prior_precision: as `LinearMixedSystem`'s.
        held: `(n,)` the part of eta held fixed, or 0.
        terms, correlated: as `LinearMixedSystem`'s (random slopes).

    theta is `CovarianceFactors`'s vector; the offsets u are one `(num_levels[k], d_k)`
    array per factor, with b_k[g] = Lambda_k u_k[g]. Past `GLMM_DENSE_LEVELS`, factors of
    one term each get sparse working systems (`sparse_finish.SparseMixedSystem`) and a
    `GroupsGivenFixedPosterior`.
    """

    def __init__(
        self,
        likelihood,
        y,
        weights,
        design,
        codes,
        num_levels,
        prior_mean,
        prior_precision,
        held,
        terms=None,
        correlated=None,
    ):
        self.family = _GLMFamily(likelihood)
        self.y, self.weights = y, weights
        self.design, self.codes, self.num_levels = design, codes, [int(g) for g in num_levels]
        self.prior_mean = np.asarray(prior_mean, "float64")
        self.prior_precision = np.asarray(prior_precision, "float64")
        self.held = np.broadcast_to(np.asarray(held, "float64"), y.shape)
        terms = [None] * len(self.num_levels) if terms is None else list(terms)
        self.terms = [
            np.ones((len(y), 1)) if t is None else np.asarray(t, "float64").reshape(len(y), -1)
            for t in terms
        ]
        self.correlated = correlated
        num_terms = [t.shape[1] for t in self.terms]
        self.covariance_factors = CovarianceFactors(num_terms, correlated)
        # past the GLMM's dense limit, factors of one term each: lme4's sparse M
        # (`sparse_finish.SparseMixedSystem`); others past `MAX_DENSE_LEVELS` raise in
        # `LinearMixedSystem`
        limit = min(GLMM_DENSE_LEVELS, MAX_DENSE_LEVELS)
        self.sparse = dense_coefficients(
            self.num_levels, num_terms, design.shape[1]
        ) > limit and all(d == 1 for d in num_terms)
        self._last_sparse = {}  # design width -> the last sparse system, for its ordering

    def _predictor(self, theta, offsets, beta):
        return self.held + self.design @ beta + self._random_part(theta, offsets)

    def _random_part(self, theta, offsets):
        """Z Lambda u."""
        part = np.zeros(len(self.y))
        factors = self.covariance_factors.matrices(theta)
        for k, u in enumerate(offsets):
            coefficients = u @ factors[k].T
            part += np.sum(self.terms[k] * coefficients[self.codes[k]], axis=1)
        return part

    def _penalised_deviance(self, theta, offsets, beta):
        mean = self.family.mean(self._predictor(theta, offsets, beta))
        shift = beta - self.prior_mean
        return (
            self.family.deviance(self.y, mean, self.weights)
            + sum(float(np.sum(np.square(u))) for u in offsets)
            + float(shift @ (self.prior_precision * shift))
        )

    def _working_system(self, theta, offsets, beta, free_beta):
        eta = self._predictor(theta, offsets, beta)
        mean = self.family.mean(eta)
        variance = np.maximum(self.family.variance(mean), 1e-12)
        response = eta - self.held + (self.y - mean) / variance
        if free_beta:
            design, prior_mean, prior_precision = (
                self.design,
                self.prior_mean,
                self.prior_precision,
            )
        else:
            response = response - self.design @ beta
            design, prior_mean, prior_precision = np.zeros((len(eta), 0)), (), ()
        return self._system(response, self.weights * variance, design, prior_mean, prior_precision)

    def _system(self, response, weights, design, prior_mean, prior_precision):
        """A penalised least-squares system on this model's factors: dense, or sparse
        past the dense limit (`self.sparse`)."""
        arguments = (
            response,
            weights,
            design,
            self.codes,
            self.num_levels,
            np.asarray(prior_mean, "float64"),
            np.asarray(prior_precision, "float64"),
            self.terms,
        )
        if self.sparse:
            from reffects.sparse_finish import SparseMixedSystem  # it builds on this module

            width = np.shape(design)[1]
            system = SparseMixedSystem(*arguments, reuse=self._last_sparse.get(width))
            self._last_sparse[width] = system
            return system
        return LinearMixedSystem(*arguments, self.correlated)

    def pirls(self, theta, offsets, beta, free_beta=True):
        """The mode of u (and of beta when `free_beta`) at theta, from a starting point.

        Returns `(offsets, beta, laplace_deviance)`.
        """
        return self._pirls(theta, offsets, beta, free_beta)[:3]

    def _pirls(self, theta, offsets, beta, free_beta):
        """`pirls`, and the working system at the mode (None where the weights overflow)."""
        offsets = [
            np.array(u, "float64").reshape(g, t.shape[1])
            for u, g, t in zip(offsets, self.num_levels, self.terms)
        ]
        beta = np.array(beta, "float64")
        current = self._penalised_deviance(theta, offsets, beta)
        zeros = [np.zeros_like(u) for u in offsets]
        at_zero = self._penalised_deviance(theta, zeros, beta)
        if at_zero < current or not np.isfinite(current):  # a warm start from far off: u = 0
            offsets, current = zeros, at_zero
        for _ in range(_MAX_PIRLS_STEPS):
            with np.errstate(over="ignore", invalid="ignore"):  # found below, as None
                system = self._working_system(theta, offsets, beta, free_beta)
                pls = system.solve(theta, 1.0)
            if pls is None:  # overflowing weights at an extreme trial point
                return offsets, beta, np.inf, None
            new_offsets, new_beta = _coefficients(system, pls, beta, free_beta)
            for _ in range(30):  # step halving
                value = self._penalised_deviance(theta, new_offsets, new_beta)
                if value <= current + 1e-12 * (1.0 + abs(current)):
                    break
                new_offsets = [(a + b) / 2.0 for a, b in zip(offsets, new_offsets)]
                new_beta = (beta + new_beta) / 2.0
            if not np.isfinite(value):
                return offsets, beta, np.inf, None
            change = current - value
            offsets, beta, current = new_offsets, new_beta, value
            if abs(change) <= 1e-12 * (1.0 + abs(current)):
                break
        with np.errstate(over="ignore", invalid="ignore"):
            system = self._working_system(theta, offsets, beta, free_beta)
            pls = system.solve(theta, 1.0)
        if pls is None:
            return offsets, beta, np.inf, None
        return offsets, beta, current + pls["log_det_random"], system

    @_one_blas_thread
    def fit(self, theta, offsets, beta, scale_priors=None, correlation_priors=None):
        """glmer's two stages from a starting point; returns `(theta, offsets, beta)`.

        `scale_priors` lists, per factor, None (Lambda_k a point estimate, as glmer's) or
        a function giving log p(sigma) of each of its terms' sds sigma_kj: that factor's
        sigma_kj are then at the mode of their marginal posterior on the log scale,
        log p(y | sigma) + sum_j [log p(sigma_kj) + log sigma_kj] maximised with the
        Laplace approximation of p(y | sigma) (`_scale_penalty`; R_k at that mode).
        `correlation_priors` lists, per factor, None or the eta of an LKJ prior on R_k,
        whose -2 log density joins the objective (`_correlation_penalty`).
        """
        layout = self.covariance_factors
        theta = np.asarray(theta, "float64").copy()
        theta[layout.diagonal] = np.maximum(theta[layout.diagonal], _SMALLEST_THETA)
        scale_priors = scale_priors or [None] * len(self.num_levels)
        correlation_priors = correlation_priors or [None] * len(self.num_levels)
        state = {"offsets": offsets, "beta": np.asarray(beta, "float64")}
        every = np.ones(layout.size, bool)
        num_scales = layout.size
        bounds = layout.bounds(every)

        def scale_penalty(trial):
            penalty = _scale_penalty(layout, trial, scale_priors)
            return penalty + _correlation_penalty(layout, trial, correlation_priors)

        def stage_one(values):
            trial = layout.from_search(values, every)
            offsets, beta, value = self.pirls(trial, state["offsets"], state["beta"])
            if not np.isfinite(value):
                return _OVERFLOW_DEVIANCE
            state["offsets"], state["beta"] = offsets, beta
            return value + scale_penalty(trial)

        if num_scales:
            # stage one only starts stage two, which refines theta with beta: forward
            # differences (one PIRLS per scale, where central ones take two)
            result = optimize.minimize(
                stage_one,
                layout.to_search(theta, every),
                method="L-BFGS-B",
                bounds=bounds,
                jac="2-point",
            )
            theta = layout.from_search(result.x, every)

        def stage_two_value(values):
            """The objective alone, from the mode at the current point (which it keeps)."""
            trial = layout.from_search(values[:num_scales], every)
            beta = values[num_scales:] / column_scale
            return self._laplace_objective(trial, beta, dict(state)) + scale_penalty(trial)

        def stage_two(values):
            """The Laplace deviance and its gradient: beta's analytic, theta's by central
            differences (one-sided at a bound), each from the mode at `values`."""
            trial = layout.from_search(values[:num_scales], every)
            value, beta_gradient = self._laplace_and_gradient(
                trial, values[num_scales:] / column_scale, state
            )
            value, beta_gradient = value + scale_penalty(trial), beta_gradient / column_scale
            scale_gradient = _central_differences(stage_two_value, values, bounds)
            return value, np.concatenate([scale_gradient, beta_gradient])

        # beta in units of its column's root mean square, so that one step moves every
        # coefficient's share of eta alike
        column_scale = np.sqrt(np.mean(np.square(self.design), axis=0))
        column_scale[column_scale == 0] = 1.0
        start = np.concatenate([layout.to_search(theta, every), state["beta"] * column_scale])
        result = optimize.minimize(
            stage_two,
            start,
            method="L-BFGS-B",
            bounds=bounds + [(None, None)] * len(state["beta"]),
            jac=True,
            options={"ftol": 1e-14, "gtol": 1e-8, "maxiter": 500},
        )
        theta = layout.from_search(result.x[:num_scales], every)
        beta = result.x[num_scales:] / column_scale
        offsets, _, _ = self.pirls(theta, state["offsets"], beta, False)
        return theta, offsets, beta

    def _laplace_objective(self, theta, beta, state):
        """The Laplace deviance at (theta, beta), beta's prior penalty included (`pirls`'s
        value has it); keeps the mode of u in `state` as the next start."""
        offsets, _, value = self.pirls(theta, state["offsets"], beta, False)
        if not np.isfinite(value):
            # a trial point whose weights overflow: a large finite value, so finite
            # differences and line searches step back instead of producing NaN
            return _OVERFLOW_DEVIANCE
        state["offsets"] = offsets
        return value

    def _laplace_and_gradient(self, theta, beta, state):
        """The Laplace deviance at (theta, beta) (as `_laplace_objective`) and its gradient
        in beta.

        u* (the mode) minimises the penalised deviance, so that part moves with beta as at
        fixed u: X' (-2 w (y - mu)) + 2 P0 (beta - m0). log det M, M = Lambda' Z' W Z
        Lambda + I with working weights W_i = w_i V(mu_i), moves through eta* = X beta +
        Z Lambda u*(beta): d log det M / d eta_i = l_i w_i V'(mu_i) V(mu_i) =: q_i, with l_i
        = (Z Lambda M^-1 Lambda' Z')_ii (row i's posterior variance of eta given beta), and
        d eta* / d beta = (I - Z Lambda M^-1 Lambda' Z' W) X (differentiating the mode's
        equation), so that part's gradient is X' (q - W a), a = Z Lambda M^-1 Lambda' Z' q:
        the random part of the penalised least-squares fit of q / W with weights W.
        """
        if self.sparse:
            return self._laplace_and_differences(theta, beta, state)
        offsets, _, value, system = self._pirls(theta, state["offsets"], beta, False)
        if system is None:
            return _OVERFLOW_DEVIANCE, np.zeros(len(beta))
        state["offsets"] = offsets
        eta = self._predictor(theta, offsets, beta)
        mean = self.family.mean(eta)
        variance = np.maximum(self.family.variance(mean), 1e-12)
        working = self.weights * variance
        no_design = np.zeros((len(eta), 0))
        posterior = system.posterior(theta, 1.0)
        leverage = posterior.predictor_variance(no_design, self.codes, self.terms)
        q = leverage * self.weights * self.family.variance_slope(mean) * variance
        ratio = np.divide(q, working, out=np.zeros_like(q), where=working > 0)
        probe = self._system(ratio, working, no_design, (), ())
        fitted = self._random_part(
            theta, _coefficients(probe, probe.solve(theta, 1.0), beta, False)[0]
        )
        score = q - working * fitted - 2.0 * self.weights * (self.y - mean)
        gradient = self.design.T @ score + 2.0 * self.prior_precision * (beta - self.prior_mean)
        return value, gradient

    def _laplace_and_differences(self, theta, beta, state):
        """`_laplace_and_gradient` with the gradient by central differences (two PIRLS runs
        a coefficient): the sparse system's posterior has no exact diag of Z Lambda M^-1
        Lambda' Z' (a selected inversion that CHOLMOD does not offer)."""
        value = self._laplace_objective(theta, beta, state)
        gradient = _central_differences(
            lambda trial: self._laplace_objective(theta, trial, dict(state)),
            beta,
            [(None, None)] * len(beta),
        )
        return value, gradient

    @_one_blas_thread
    def log_scale_sd(self, theta, offsets, beta, k, scale_priors):
        """The sd of each log sigma_kj (one per term of factor k) under the Laplace
        approximation of their marginal posterior at the mode (`fit`'s, with
        `scale_priors`; R_k, the other scales and beta held, so an LKJ prior on R_k adds
        nothing), by `_log_scale_sds`."""
        state = {"offsets": offsets}
        layout = self.covariance_factors

        def deviance(trial):
            value = self._laplace_objective(trial, beta, state)
            return value + _scale_penalty(layout, trial, scale_priors)

        return _log_scale_sds(deviance, layout, theta, k)

    @_one_blas_thread
    def posterior(self, theta, offsets, beta) -> JointPosterior:
        """The Laplace approximation of the joint posterior at the mode (a
        `GroupsGivenFixedPosterior` past the dense limit)."""
        system = self._working_system(theta, offsets, beta, True)
        posterior = system.posterior(theta, 1.0)
        factors = self.covariance_factors.matrices(theta)
        if self.sparse:  # b_k = theta_k u_k: one term a factor
            posterior._fixed_mean = np.array(beta, "float64")
            posterior._means = [u * f[0, 0] for u, f in zip(offsets, factors)]
            return posterior
        posterior.rest_mean[posterior._fixed] = beta
        for k, columns in system.rest_layout.items():
            posterior.rest_mean[columns] = (offsets[k] @ factors[k].T).reshape(-1)
        if system.first is not None:
            posterior.first_mean = offsets[system.first] @ factors[system.first].T
        return posterior


_MAX_PIRLS_STEPS = 100
_CENTRAL_STEP = np.finfo(float).eps ** (1 / 3)  # scipy's for "3-point" differences
_OVERFLOW_DEVIANCE = 1e100


def _central_differences(function, point, bounds):
    """The gradient of `function` at `point` in its first `len(bounds)` coordinates, by
    central differences, one-sided where a step would cross a bound ((lower, upper), None
    for none)."""
    gradient = np.empty(len(bounds))
    for j, (lower, upper) in enumerate(bounds):
        step = _CENTRAL_STEP * max(1.0, abs(point[j]))
        ahead, behind = point.copy(), point.copy()
        ahead[j] += step
        behind[j] -= step
        if upper is not None and ahead[j] > upper:
            ahead = point
        elif lower is not None and behind[j] < lower:
            behind = point
        gradient[j] = (function(ahead) - function(behind)) / (ahead[j] - behind[j])
    return gradient


def _coefficients(system, pls, beta, free_beta):
    """The per-factor u and beta (the solution's when `free_beta`) in a penalised
    least-squares solution."""
    offsets, new_beta = system.coefficients(pls)
    return offsets, np.array(new_beta if free_beta else beta, "float64")


def _rows_and_factors(y, sample_weight, factors):
    """y and the weights as float64 vectors; the factors' layers, their integer ids, their
    term vectors (None for a `RandomIntercept`) and whether their terms are correlated."""
    y = np.asarray(y, "float64").reshape(-1)
    weights = np.ones_like(y) if sample_weight is None else np.asarray(sample_weight, "float64")
    layers = [factor[0] for factor in factors]
    codes = [np.asarray(factor[1], "int64").reshape(-1) for factor in factors]
    terms = [
        _layer_terms(factor[0], factor[2] if len(factor) > 2 else None, len(y))
        for factor in factors
    ]
    correlated = [getattr(layer, "correlated", True) for layer in layers]
    return y, weights, layers, codes, terms, correlated


def _layer_terms(layer, slopes, num_rows):
    """A `RandomEffects` layer's term vectors, [1, z] (or z without its intercept)."""
    if not isinstance(layer, RandomEffects):
        return None
    if slopes is None:
        raise ValueError(
            f"RandomEffects '{layer.name}' needs its slope covariates: pass the factor as "
            "(layer, ids, z)"
        )
    z = np.asarray(slopes, "float64").reshape(num_rows, -1)
    return np.column_stack([np.ones(num_rows), z]) if layer.intercept else z


def _covariance_factor(layer, scale):
    """Lambda_k = chol(Sigma_k) / s from the layer's current Sigma_k (diagonal when its
    terms are independent)."""
    if not isinstance(layer, RandomEffects):
        return np.array([[float(layer.group_scale()[0])]]) / scale
    covariance = np.asarray(keras.ops.convert_to_numpy(layer.covariance()), "float64")
    if not layer.correlated:
        return np.diag(np.sqrt(np.diag(covariance))) / scale
    jitter = 1e-10 * np.trace(covariance) * np.eye(len(covariance))
    return np.linalg.cholesky(covariance + jitter) / scale


def _linear_layers(intercept, fixed_effects, features, num_rows):
    """The design [1, x], current means and Normal priors of (alpha, beta)."""
    design = np.ones((num_rows, 1))
    mean = [float(intercept.intercept_loc.numpy()[0])]
    prior_mean, prior_precision = [intercept.prior_loc], [intercept.prior_scale**-2]
    if fixed_effects is not None:
        width = np.shape(features)[1]
        design = np.column_stack([design, np.asarray(features, "float64")])
        mean += list(fixed_effects.kernel_loc.numpy()[:, 0])
        prior_mean += [fixed_effects.prior_loc] * width
        prior_precision += [fixed_effects.prior_scale**-2] * width
    return design, np.array(mean, "float64"), np.array(prior_mean), np.array(prior_precision)


def _write_back(posterior, intercept, fixed_effects, layers, factors, scale):
    """Leaves each layer with the joint posterior's marginal means and sds (covariances
    per group for `RandomEffects`) and Sigma_k = s^2 Lambda_k Lambda_k'."""
    fixed_mean, fixed_sd = posterior.fixed_mean(), posterior.fixed_sd()
    intercept.set_posterior(fixed_mean[:1], fixed_sd[:1])
    if fixed_effects is not None:
        fixed_effects.set_posterior(fixed_mean[1:], fixed_sd[1:])
    for k, (layer, factor) in enumerate(zip(layers, factors)):
        if isinstance(layer, RandomEffects):
            layer.set_posterior(posterior.offset_mean(k), posterior.offset_covariance(k))
            if layer.scale_prior is None:
                layer.set_covariance(scale**2 * factor @ factor.T)
            continue
        layer.set_posterior(posterior.offset_mean(k), posterior.offset_sd(k))
        if layer.scale_prior is None:
            layer.set_group_scale(scale * factor[0, 0])


def _warn_without_events(likelihood, y, weights):
    """A UserWarning when y holds no events (or, for 0/1 outcomes, only events): the
    estimates are then set by the priors, and every sigma_k sits at the boundary 0."""
    counted = weights > 0
    none = not np.any(y[counted] > 0)
    every = not isinstance(likelihood, Poisson) and np.all(y[counted] >= 1)
    if none or every:
        kind = "no events (every y is 0)" if none else "no non-events (every y is 1)"
        warnings.warn(
            f"The response holds {kind}: the intercept is set by its Normal prior and "
            "each grouping factor's sd sits at its boundary, 0.",
            UserWarning,
            stacklevel=3,
        )


def finish_glmm(
    model,
    intercept,
    factors,
    fixed_effects=None,
    features=None,
    *,
    y,
    held,
    sample_weight=None,
) -> JointPosterior:
    """Moves a GLMM's linear part to glmer's Laplace estimates and posterior.

    Args, as `finish_gaussian`'s; `model` has a `Bernoulli`, `Binomial` (y proportions,
    `sample_weight` the trials) or `Poisson` likelihood.

    The scales sigma_k are glmer's (`GeneralizedMixedModel`); a factor with a hyperprior
    gets the mode of its terms' sds' marginal posterior on the log scale (R_k at that
    mode, under its LKJ prior if it has a `correlation_prior`), and q(sigma_kj) is the
    Laplace approximation there (LogNormal). Returns the
    Laplace `JointPosterior` (given the scales).

    Example:
        >>> import keras
        >>> from reffects import ELBOModel, GlobalIntercept, RandomIntercept
        >>> ids = keras.Input(shape=(), dtype="int64")
        >>> alpha, layer = GlobalIntercept(), RandomIntercept(3)
        >>> network = keras.Model(ids, keras.layers.Add()([alpha(ids), layer(ids)]))
        >>> model = ELBOModel(network, likelihood="poisson")
        >>> g, y = np.array([0, 0, 1, 2, 2, 2]), np.array([3.0, 5.0, 0.0, 1.0, 2.0, 1.0])
        >>> layer.adapt(g)
        >>> posterior = finish_glmm(model, alpha, [(layer, g)], y=y, held=0.0)
        >>> bool(posterior.offset_mean(0)[0] > 0 > posterior.offset_mean(0)[1])
        True
    """
    y, weights, layers, codes, terms, correlated = _rows_and_factors(y, sample_weight, factors)
    _warn_without_events(model.likelihood, y, weights)
    design, beta, prior_mean, prior_precision = _linear_layers(
        intercept, fixed_effects, features, len(y)
    )
    glmm = GeneralizedMixedModel(
        model.likelihood,
        y,
        weights,
        design,
        codes,
        [layer.num_groups for layer in layers],
        prior_mean,
        prior_precision,
        held,
        terms,
        correlated,
    )
    layout = glmm.covariance_factors
    start = [_covariance_factor(layer, 1.0) for layer in layers]
    for factor in start:
        np.fill_diagonal(factor, np.maximum(np.diag(factor), _SMALLEST_THETA))
    offsets = [
        linalg.solve_triangular(factor, np.asarray(layer.offset_loc.numpy(), "float64").T,
                                lower=True).T
        for layer, factor in zip(layers, start)
    ]  # fmt: skip
    priors = _Priors(layers)
    theta, offsets, beta = glmm.fit(
        layout.theta(start),
        offsets,
        beta,
        scale_priors=priors.log_priors,
        correlation_priors=priors.etas,
    )
    posterior = glmm.posterior(theta, offsets, beta)
    factors = layout.matrices(theta)
    _write_back(posterior, intercept, fixed_effects, layers, factors, 1.0)
    for k, (layer, log_prior) in enumerate(zip(layers, priors.log_priors)):
        if log_prior is not None:
            sds = glmm.log_scale_sd(theta, offsets, beta, k, priors.log_priors)
            _set_scale_posterior(layer, factors[k], 1.0, sds)
    return posterior


def _log_prior(scale_prior):
    """log p(sigma) of a `ScalePrior` as a function of an array of sigmas, or None without
    one."""
    if scale_prior is None:
        return None
    return lambda sigma: np.asarray(
        scale_prior.expected_log_prob(np.log(sigma), 0.0), "float64"
    ).reshape(np.shape(sigma))
