"""The exact finish for crossed factors too wide to factor densely.

`finish.LinearMixedSystem` eliminates the largest factor and factors the Schur complement
over every other factor's levels dense, up to `finish.MAX_DENSE_LEVELS` of them. Crossed
factors with tens of thousands of levels each pass that, and there `SparseMixedSystem`
factors lme4's whole penalised least-squares matrix

    M = [[Lambda Z'WZ Lambda + I, Lambda Z'WD], [D'WZ Lambda, D'WD + s^2 P0]]

as lme4 does (Bates, Maechler, Bolker and Walker 2015, JSS 67(1), section 3): one sparse
Cholesky factorisation P M P' = L L' per theta, by CHOLMOD (supernodal, through cvxopt),
its fill-reducing ordering P computed once, since M's pattern does not change with theta.
The criterion, s^2 and the search are `LinearMixedSystem`'s, so the estimates are the same
REML (or ML) ones. Two things differ:

- The search is derivative-free (`SparseMixedSystem._minimize`): the analytic gradient
  needs diag(M^-1), a selected inversion that CHOLMOD does not offer.
- The posterior (`GroupsGivenFixedPosterior`) is exact for beta (mean and covariance), for
  every offset's mean and for each offset's covariance with beta. Each offset's variance
  given beta is exact for the factors with the fewest levels (`_EXACT_VARIANCE_COLUMNS`
  in all) and, for the others, estimated by Rao-Blackwellised Monte Carlo (Siden,
  Lindgren, Bolin and Villani 2018, "Efficient covariance approximations for large sparse
  precision matrices", JCGS 27(4)) from `_VARIANCE_DRAWS` fixed-seed draws of
  N(0, M^-1): the exact part 1 / M_ii plus a sampled correction. Offsets of different
  factors are taken as independent given beta.

`finish.GeneralizedMixedModel` builds its PIRLS working systems on it past
`finish.GLMM_DENSE_LEVELS` (`reuse` shares the ordering between them); there the fixed
effects' gradient is taken by central differences, for the same want of diag(M^-1).

One term per group (a random intercept, or a slope without it): a factor with more beyond
the dense limit is fitted by SGD.
"""

import contextlib

import numpy as np
from cvxopt import cholmod, matrix, spmatrix
from scipy import optimize, sparse

from reffects.finish import LinearMixedSystem, _term_indicator
from reffects.joint_posterior import GroupsGivenFixedPosterior

_VARIANCE_DRAWS = 200
"""Draws of N(0, M^-1) behind each offset's variance. The sampled correction's relative
error is sqrt(2 / 200) = 10%, and the correction is the part of an offset's variance that
the other factors' offsets leave (a few tenths of it on a crossed design), so the variance
is within a few percent, its sd within about half that."""
_DRAWS_PER_SOLVE = 25
_EXACT_VARIANCE_COLUMNS = 1000
"""Offsets whose variances are computed exactly (one solve each), the factors with the
fewest levels first: there the sampled correction is largest (a level with many rows is
known well given the others, and its uncertainty is mostly theirs)."""
_FIRST_RADIUS = 0.02
_LAST_RADIUS = 1e-6
"""The search's first and last trust regions, in intraclass correlation v: theta to about
1e-6 relative for v near 1/2, 5e-4 at v = 1e-3 (d theta / theta = d v / (2 v (1 - v))),
within lme4's 1e-3 either way."""


@contextlib.contextmanager
def _supernodal():
    """CHOLMOD's supernodal LL' (the form whose diagonal cvxopt can read), set and restored
    around a call (cvxopt keeps its options in one module-wide dict)."""
    before = dict(cholmod.options)
    cholmod.options["supernodal"] = 2
    try:
        yield
    finally:
        cholmod.options.clear()
        cholmod.options.update(before)


class SparseMixedSystem(LinearMixedSystem):
    """`LinearMixedSystem` for factors of one term each, factoring M sparse.

    Args: as `LinearMixedSystem`'s, without `correlated`; `terms` per factor its `(n, 1)`
    term, or None for a random intercept (the default). `reuse`: an earlier system whose
    symbolic factorisation (the fill-reducing ordering, most of a factorisation's cost) is
    shared when M's pattern is the same, as for GLMM's working systems. Each `solve`
    factors numerically before it reads the factor, so sharing it changes no result.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> a, b = rng.integers(0, 30, 400), rng.integers(0, 20, 400)
        >>> y = rng.normal(0, 1, 30)[a] + rng.normal(0, 0.5, 20)[b] + rng.normal(0, 1, 400)
        >>> system = SparseMixedSystem(y, np.ones(400), np.ones((400, 1)), [a, b], [30, 20],
        ...                            np.zeros(1), np.zeros(1))
        >>> theta, noise_scale = system.fit(np.array([1.0, 1.0]), 1.0)
        >>> dense = LinearMixedSystem(y, np.ones(400), np.ones((400, 1)), [a, b], [30, 20],
        ...                           np.zeros(1), np.zeros(1))
        >>> bool(np.allclose(dense.fit(np.array([1.0, 1.0]), 1.0)[0], theta, rtol=1e-3))
        True
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
        rows=None,
        reuse=None,
    ):
        self._set_common(
            response, weights, design, num_levels, prior_mean, prior_precision, terms, None, rows
        )
        if any(d != 1 for d in self.num_terms):
            raise ValueError(f"one term per factor; received {self.num_terms} terms")
        self.first = self._first = None  # no factor is eliminated apart: M is factored whole
        z = sparse.hstack(
            [_term_indicator(c, g, t) for c, g, t in zip(codes, self.num_levels, self.terms)],
            format="csr",
        )
        self.num_random = z.shape[1]
        self._column_factor = np.repeat(np.arange(len(self.num_levels)), self.num_levels)
        weighted_design = weights[:, None] * design
        weighted_z = sparse.diags(weights) @ z
        whole = sparse.bmat(
            [
                [z.T @ weighted_z, sparse.csr_matrix(z.T @ weighted_design)],
                [None, sparse.csr_matrix(design.T @ weighted_design)],
            ]
        )
        # M's lower triangle with every diagonal entry stored: its pattern is M's for any theta
        width = self.num_random + self.num_fixed
        lower = sparse.tril(whole.T + sparse.identity(width), format="coo")
        self._rows, self._columns = lower.row, lower.col
        self._gram = lower.data - (lower.row == lower.col)
        self._diagonal = np.flatnonzero(lower.row == lower.col)
        self._information = np.einsum("ij,ij->j", design, weighted_design)  # diag D'WD
        self._moment = np.concatenate([weighted_z.T @ response, weighted_design.T @ response])
        self._row_index = matrix(self._rows.astype("int32"))
        self._column_index = matrix(self._columns.astype("int32"))
        same_pattern = (
            reuse is not None
            and np.array_equal(reuse._rows, self._rows)
            and np.array_equal(reuse._columns, self._columns)
        )
        if same_pattern:
            self._factor = reuse._factor
        else:
            with _supernodal():
                start = self._matrix(np.ones(len(self.num_levels)), 1.0)
                self._factor = cholmod.symbolic(start)

    def _has_gradient(self) -> bool:
        return False

    def _fixed_information(self) -> np.ndarray:
        return self._information

    def _minimize(self, objective, start, bounds, analytic):
        """COBYQA, a derivative-free trust-region method like lme4's BOBYQA: on
        finish_speed's four crossed factors it took 90 evaluations of the criterion where
        L-BFGS-B on forward differences took 180. The search's coordinates are
        `LinearMixedSystem._search`'s (a random intercept's intraclass correlation, in
        [0, 1]), from `finish._better_start`'s moments."""
        options = {"initial_tr_radius": _FIRST_RADIUS, "final_tr_radius": _LAST_RADIUS}
        return optimize.minimize(objective, start, method="COBYQA", bounds=bounds, options=options)

    def _block_sums(self, pls, reml):
        return None

    def _lambda(self, theta):
        """Lambda-tilde's diagonal: each factor's theta over its levels, 1 for beta."""
        factors = self.covariance_factors.matrices(np.asarray(theta, "float64"))
        scales = np.array([f[0, 0] for f in factors])
        return np.concatenate([scales[self._column_factor], np.ones(self.num_fixed)])

    def _values(self, theta, noise_variance):
        """M's stored entries (its lower triangle) at theta."""
        lam = self._lambda(theta)
        values = self._gram * lam[self._rows] * lam[self._columns]
        penalty = np.ones(len(lam))
        penalty[self.num_random :] = self._ridge(noise_variance) * self.prior_precision
        values[self._diagonal] += penalty[self._rows[self._diagonal]]
        return values

    def _matrix(self, theta, noise_variance):
        values = matrix(self._values(theta, noise_variance))
        size = self.num_random + self.num_fixed
        return spmatrix(values, self._row_index, self._column_index, (size, size))

    def _solve(self, right):
        """M^-1 right with the current factorisation (right `(m,)` or `(m, r)`)."""
        solution = matrix(np.asfortranarray(right, "float64"))
        cholmod.solve(self._factor, solution)
        return np.array(memoryview(solution)).reshape(np.shape(right))

    def solve(self, theta, noise_variance):
        """Penalised least squares at theta: a dict with the solution (u, beta), M^-1's
        beta columns and the pieces of the criterion; None where M is not positive
        definite."""
        with _supernodal():
            try:
                cholmod.numeric(self._matrix(theta, noise_variance), self._factor)
            except ArithmeticError:
                return None
            diagonal = np.asarray(memoryview(cholmod.diag(self._factor)))
            log_det = 2.0 * float(np.sum(np.log(diagonal)))
        lam = self._lambda(theta)
        fixed = slice(self.num_random, None)
        ridge = self._ridge(noise_variance)
        rhs = lam * self._moment
        rhs[fixed] += ridge * self.prior_precision * self.prior_mean
        units = np.zeros((len(rhs), self.num_fixed))
        units[fixed] = np.eye(self.num_fixed)
        both = self._solve(np.column_stack([rhs, units]))
        solution, fixed_columns = both[:, 0], both[:, 1:]
        # det M = det(the u block) det(S), S = beta's Schur complement = ((M^-1)_beta)^-1
        block = fixed_columns[fixed]
        try:
            block_factor = np.linalg.cholesky(0.5 * (block + block.T))
        except np.linalg.LinAlgError:
            return None
        log_det_fixed = -2.0 * float(np.sum(np.log(np.diag(block_factor))))
        residual = (
            self.weighted_squares
            + ridge * self.prior_mean @ (self.prior_precision * self.prior_mean)
            - rhs @ solution
        )
        return {
            "lam": lam,
            "solution": solution,
            "fixed_columns": fixed_columns,
            "log_det_random": log_det - log_det_fixed,
            "log_det_fixed": log_det_fixed,
            "residual": max(residual, 0.0),
        }

    def _per_factor(self, values):
        """`values` over the random coefficients (factor by factor) split into one part
        per factor."""
        bounds = np.cumsum([0, *self.num_levels])
        return [values[a:b] for a, b in zip(bounds, bounds[1:])]

    def coefficients(self, pls):
        """The per-factor u, `(G_k, 1)` each, and beta in a `solve` result."""
        solution = pls["solution"]
        offsets = [u[:, None] for u in self._per_factor(solution[: self.num_random])]
        return offsets, solution[self.num_random :]

    def posterior(self, theta, noise_scale) -> GroupsGivenFixedPosterior:
        """The posterior of (beta, every b_k) given theta and s, on b's scale: exact but
        for the offsets' variances given beta (`_conditional_variances`)."""
        variance = float(noise_scale) ** 2
        pls = self.solve(theta, variance)
        if pls is None:
            raise ValueError("the mixed model's system is singular at the estimated scales")
        lam, fixed = pls["lam"][: self.num_random], slice(self.num_random, None)
        mean = pls["solution"][: self.num_random] * lam
        fixed_columns = pls["fixed_columns"]
        fixed_covariance = variance * fixed_columns[fixed]
        coupling = variance * lam[:, None] * fixed_columns[: self.num_random]
        values = self._values(theta, variance)
        given_fixed = np.square(lam) * self._conditional_variances(values, fixed_columns)
        return GroupsGivenFixedPosterior(
            pls["solution"][fixed],
            fixed_covariance,
            [m[:, None] for m in self._per_factor(mean)],
            self._per_factor(variance * given_fixed),
            self._per_factor(coupling),
        )

    def _conditional_variances(self, values, fixed_columns):
        """diag((M_uu)^-1), u's variances given beta (on u's scale, per unit s^2), at the
        current factorisation of M (whose stored entries are `values`): exact for the
        factors with the fewest levels, up to `_EXACT_VARIANCE_COLUMNS`; Rao-Blackwellised
        Monte Carlo for the others.

        Exact: the columns of M^-1, less beta's part, (M_uu^-1)_ii = (M^-1)_ii -
        (M^-1)_(i,beta) ((M^-1)_beta)^-1 (M^-1)_(beta,i). Sampled: with x ~ N(0, M^-1)
        (x = P' L'^-1 e, e standard normal), x_u less its regression on x_beta is a draw of
        N(0, M_uu^-1), and (M_uu^-1)_ii = 1 / M_ii + Var(sum_(j != i) M_ij x_j / M_ii),
        of which only the second term is sampled.
        """
        u = self.num_random
        regression = fixed_columns[:u] @ np.linalg.inv(fixed_columns[u:])
        explained = np.einsum("ij,ij->i", regression, fixed_columns[:u])
        exact = self._exact_columns()
        result = np.zeros(u)
        for part in np.array_split(exact, max(1, len(exact) // _DRAWS_PER_SOLVE)):
            units = np.zeros((u + self.num_fixed, len(part)))
            units[part, np.arange(len(part))] = 1.0
            result[part] = self._solve(units)[part, np.arange(len(part))] - explained[part]
        sampled = np.ones(u, bool)
        sampled[exact] = False
        if sampled.any():
            result[sampled] = self._sampled_variances(values, regression)[sampled]
        return result

    def _exact_columns(self) -> np.ndarray:
        """u's columns of the factors with the fewest levels, `_EXACT_VARIANCE_COLUMNS` at
        most (whole factors)."""
        bounds = np.cumsum([0, *self.num_levels])
        chosen, count = [], 0
        for k in np.argsort(self.num_levels, kind="stable"):
            if count + self.num_levels[k] > _EXACT_VARIANCE_COLUMNS:
                break
            chosen.append(np.arange(bounds[k], bounds[k + 1]))
            count += self.num_levels[k]
        return np.concatenate(chosen) if chosen else np.zeros(0, "int64")

    def _sampled_variances(self, values, regression):
        """diag(M_uu^-1) by Rao-Blackwellised Monte Carlo (`_conditional_variances`)."""
        rows, columns = self._rows, self._columns
        u = self.num_random
        inside = (rows < u) & (columns < u) & (rows != columns)
        off = sparse.coo_matrix((values[inside], (rows[inside], columns[inside])), (u, u))
        off = (off + off.T).tocsr()
        diagonal = np.zeros(u)
        on = self._diagonal[rows[self._diagonal] < u]
        diagonal[rows[on]] = values[on]
        rng = np.random.default_rng(0)
        sampled = np.zeros(u)
        for start in range(0, _VARIANCE_DRAWS, _DRAWS_PER_SOLVE):
            count = min(_DRAWS_PER_SOLVE, _VARIANCE_DRAWS - start)
            draws = self._draws(rng.standard_normal((u + self.num_fixed, count)))
            given_fixed = draws[:u] - regression @ draws[u:]
            sampled += np.sum(np.square(off @ given_fixed), axis=1)
        return (1.0 + sampled / _VARIANCE_DRAWS / diagonal) / diagonal

    def _draws(self, noise):
        """P' L'^-1 noise at the current factorisation P M P' = L L': standard normal
        columns become draws of N(0, M^-1)."""
        draws = matrix(np.asfortranarray(noise, "float64"))
        cholmod.solve(self._factor, draws, sys=5)  # L' y = e
        cholmod.solve(self._factor, draws, sys=8)  # P x = y: x = P' y
        return np.array(memoryview(draws)).reshape(np.shape(noise))
