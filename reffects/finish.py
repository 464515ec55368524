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
boundary, as in lme4), started at the SGD values. Beta's Normal prior enters M exactly,
so with the estimators' weak prior (sd 10 on the standardised scale) the estimates are
lme4's to about 1e-4; lme4's flat prior is its limit.

M is never factored whole: the factor with the most levels has a diagonal block, which is
eliminated exactly (a cost linear in its levels), and the Schur complement over the other
factors' levels and beta is factored dense. A fit with one grouping factor costs the same
whatever its number of levels.

The result is a `JointPosterior`: the exact posterior of (beta, every b_k) given theta and
s, with its correlations. Its marginal means and sds are written back into the layers, so
the Keras model (`predict`, `.keras` files) carries them too.
"""

import warnings

import numpy as np
from scipy import linalg, optimize, sparse, special
from threadpoolctl import threadpool_limits

from reffects.joint_posterior import JointPosterior
from reffects.likelihoods import Poisson

MAX_DENSE_LEVELS = 4000
"""The largest Schur complement (levels of every factor but the largest, plus the fixed
effects) factored dense."""

_TOLERANCE = 1e-10
_DENSE_CROSS_COLUMNS = 256
_CLASS_GRAM_ENTRIES = 4_000_000  # per-weight sums kept up to 32 MB
_SMALLEST_THETA = 1e-5
"""sigma_k / s at the boundary: a factor with no variance is reported with 1e-5 of the noise
scale (the criterion's value there is within 1e-10 of its value at 0)."""
_LARGEST_THETA = 1e3
_SMALLEST_RIDGE = 1e-8
"""The ridge's variance at least, relative to the mean square of y (an exact fit)."""
"""sigma_k / s at most: beyond it (every row its own group) s is not identified."""


# Its matrices are small to mid-sized and factored hundreds of times: one BLAS thread is
# measured 6-60x faster than two on the shared 2-core machine (a 181 x 181 Cholesky took
# 0.3 ms against 21 ms; 1,144 x 1,144: 40 ms against 200 ms).
_one_blas_thread = threadpool_limits.wrap(limits=1, user_api="blas")


def _indicator(codes, num_levels, values):
    rows = np.arange(len(codes))
    return sparse.csr_matrix((values, (rows, codes)), shape=(len(codes), num_levels))


class _FirstFactorSums:
    """Sums over the largest factor's groups that its diagonal block D = t^2 W + 1 weights.

    For a power q, `at(t^2, q)` gives sum_g D_g^-q c_g c_g' ("gram"), sum_g D_g^-q c_g h_g
    ("moment") and sum_g D_g^-q h_g^2 ("squares"), c_g the group's row of `cross`, h_g its
    weighted sum of y and W_g its weight. Groups of equal weight share D_g, so when there are
    few distinct weights (whole-row counts) the sums are kept per weight and an evaluation
    costs the number of distinct weights, not of groups: a million groups cost what a
    thousand do. Otherwise (or when m is wide) the groups with weight are summed directly.
    """

    def __init__(self, weight, moment, cross):
        self.num_groups = len(weight)
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
        else:
            gram = (self.rows.T @ sparse.diags(inverse) @ self.rows).toarray()
        return {
            "gram": gram,
            "moment": np.asarray(self.rows.T @ (inverse * self.h)).reshape(-1),
            "squares": inverse @ np.square(self.h),
        }

    def _count(self):
        return np.ones(len(self.weight)) if self.count is None else self.count

    def log_diagonal(self, t_squared):
        """sum_g log D_g (groups without weight add log 1 = 0)."""
        return self._count() @ np.log(t_squared * self.weight + 1.0)

    def inverse_diagonal(self, t_squared):
        """sum_g 1 / D_g over every group."""
        inactive = self.num_groups - self.num_active
        return self._count() @ (t_squared * self.weight + 1.0) ** -1.0 + inactive


class LinearMixedSystem:
    """Sufficient statistics of a linear mixed model, from one pass over the rows.

    Args:
        response: `(n,)` the part of y the linear terms explain.
        weights: `(n,)` frequency weights.
        design: `(n, p)` fixed-effect design, the intercept column first.
        codes: one `(n,)` integer array per grouping factor.
        num_levels: the levels of each factor.
        prior_mean, prior_precision: `(p,)` beta's Normal prior.

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

    def __init__(self, response, weights, design, codes, num_levels, prior_mean, prior_precision):
        self.num_levels = [int(g) for g in num_levels]
        self.num_fixed = design.shape[1]
        # A column of zeros (a constant feature, once centred) says nothing about y: its
        # coefficient keeps its prior, and REML counts only the other columns.
        self.empty_columns = ~np.any(design != 0, axis=0)
        self.prior_mean = np.asarray(prior_mean, "float64")
        self.prior_precision = np.asarray(prior_precision, "float64")
        self.total_weight = float(weights.sum())
        self.weighted_squares = float(weights @ np.square(response))
        self.first = int(np.argmax(self.num_levels)) if self.num_levels else None
        others = [k for k in range(len(self.num_levels)) if k != self.first]
        self.rest_layout, start = {}, 0
        for k in others:
            self.rest_layout[k] = slice(start, start + self.num_levels[k])
            start += self.num_levels[k]
        self.num_rest_levels = start
        m = start + self.num_fixed
        if m > MAX_DENSE_LEVELS:
            sizes = ", ".join(str(self.num_levels[k]) for k in others)
            raise ValueError(
                f"the exact finish factors the levels of every grouping factor but the "
                f"largest ({sizes}) plus {self.num_fixed} fixed effects densely, at most "
                f"{MAX_DENSE_LEVELS} in all; this model has {m}"
            )
        parts = [_indicator(codes[k], self.num_levels[k], np.ones(len(response))) for k in others]
        rest = sparse.hstack([*parts, sparse.csr_matrix(design)], format="csr")
        weighted_rest = sparse.diags(weights) @ rest
        self.rest_gram = (rest.T @ weighted_rest).toarray()
        self.rest_moment = np.asarray(weighted_rest.T @ response).reshape(-1)
        if self.first is not None:
            first_codes, levels = codes[self.first], self.num_levels[self.first]
            self.first_weight = np.bincount(first_codes, weights, levels)
            self.first_moment = np.bincount(first_codes, weights * response, levels)
            indicator = _indicator(first_codes, levels, np.ones(len(response)))
            self.cross = sparse.csr_matrix(indicator.T @ weighted_rest)
            self._first_sums = _FirstFactorSums(self.first_weight, self.first_moment, self.cross)

    def _theta_per_rest_entry(self, theta):
        """Lambda's diagonal over r: theta_k for factor k's levels, 1 for beta."""
        scale = np.ones(self.num_rest_levels + self.num_fixed)
        for k, columns in self.rest_layout.items():
            scale[columns] = theta[k]
        return scale

    def _ridge(self, noise_variance):
        return max(noise_variance, _SMALLEST_RIDGE * self.weighted_squares / self.total_weight)

    def solve(self, theta, noise_variance):
        """Penalised least squares at theta: a dict with the Schur complement's Cholesky
        factor, the solution and the pieces of the criterion."""
        scale = self._theta_per_rest_entry(theta)
        fixed = slice(self.num_rest_levels, None)
        full_rhs = scale * self.rest_moment  # r's part of M's right-hand side
        full_rhs[fixed] += self._ridge(noise_variance) * self.prior_precision * self.prior_mean
        gram, moment = self.rest_gram, self.rest_moment
        if self.first is not None:
            t1 = theta[self.first]
            sums = self._first_sums.at(t1**2, 1)
            gram = gram - t1**2 * sums["gram"]
            moment = moment - t1**2 * sums["moment"]
        # beta's prior as a ridge; floored for an exact fit (s -> 0), where it alone keeps
        # collinear fixed effects determined
        ridge = self._ridge(noise_variance)
        penalty = np.ones(len(scale))
        penalty[fixed] = ridge * self.prior_precision
        schur = scale[:, None] * gram * scale[None, :] + np.diag(penalty)
        rhs = scale * moment
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
            # t1 * (first @ first_moment), with first = t1 (h1 - cross v) / D1, v = scale r
            solution_rhs += t1**2 * (sums["squares"] - (scale * rest) @ sums["moment"])
            log_det_random += self._first_sums.log_diagonal(t1**2)
        residual = (
            self.weighted_squares
            + ridge * self.prior_mean @ (self.prior_precision * self.prior_mean)
            - solution_rhs
        )
        return {
            "scale": scale,
            "factor": factor,
            "rest": rest,
            "theta": theta,
            "log_det_random": log_det_random,
            "log_det_fixed": log_det_fixed,
            "residual": max(residual, 0.0),
        }

    def first_solution(self, pls):
        """u of the first factor in a `solve` result: t1 (h1 - cross v) / D1, v = scale r."""
        t1 = pls["theta"][self.first]
        diagonal = t1**2 * self.first_weight + 1.0
        return t1 * (self.first_moment - self.cross @ (pls["scale"] * pls["rest"])) / diagonal

    def criterion(self, theta, noise_variance, reml=True):
        """The profiled REML (or ML) criterion at theta, its gradient, and the profiled s^2.

        beta's prior enters M as the ridge `noise_variance` P0 (lme4's criterion on a
        ridge-penalised system); `fit` iterates until `noise_variance` is the profiled s^2,
        where the ridge is the prior's. With
        Lambda-tilde = diag(Lambda, I), M = Lambda-tilde' G Lambda-tilde + J, so

            d log det M / d theta_k = (2 / theta_k) (q_k - tr_k(M^-1)),
            d r / d theta_k         = -2 |u_k|^2 / theta_k

        (q_k levels, tr_k the trace over factor k's block; ML reads both off the u block
        alone), which gives the gradient at the profiled s^2.
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
        inverse_trace, squares = self._block_traces(theta, pls, reml)
        levels = np.asarray(self.num_levels, "float64")
        with np.errstate(divide="ignore", invalid="ignore"):
            gradient = 2.0 * (levels - inverse_trace - squares / variance) / theta
        gradient = np.where(theta > 0, gradient, 0.0)  # even in theta_k: flat at 0
        return value, gradient, variance

    def _block_traces(self, theta, pls, reml):
        """Per factor k: tr_k of the inverse (of M for REML, of its u block for ML) and
        |u_k|^2."""
        num_rest = self.num_rest_levels
        factor = pls["factor"] if reml else pls["factor"][:num_rest, :num_rest]
        inverse_factor = linalg.solve_triangular(factor, np.eye(len(factor)), lower=True)
        inverse = inverse_factor.T @ inverse_factor  # the Schur complement's inverse
        diagonal = np.diag(inverse)
        traces = np.zeros(len(self.num_levels))
        squares = np.zeros(len(self.num_levels))
        for k, columns in self.rest_layout.items():
            traces[k] = diagonal[columns].sum()
            squares[k] = np.sum(np.square(pls["rest"][columns]))
        if self.first is not None:
            t1 = theta[self.first]
            sums = self._first_sums.at(t1**2, 2)
            # (M^-1) over the first factor: D1^-1 + t1^2 D1^-1 C S^-1 C' D1^-1, where
            # C = cross diag(scale) (restricted to the u columns for ML).
            columns = slice(None) if reml else slice(0, num_rest)
            scale = pls["scale"][columns]
            second = scale[:, None] * sums["gram"][columns, columns] * scale
            traces[self.first] = self._first_sums.inverse_diagonal(t1**2) + t1**2 * np.sum(
                inverse * second
            )
            # |u_first|^2 = t1^2 sum_g (h1_g - c_g v)^2 / D1_g^2
            v = pls["scale"] * pls["rest"]
            squares[self.first] = t1**2 * (
                sums["squares"] - 2.0 * v @ sums["moment"] + v @ sums["gram"] @ v
            )
        return traces, squares

    @_one_blas_thread
    def fit(self, theta, noise_scale, free=None, reml=True):
        """REML (or ML) estimates of theta and s, started at `theta` and `noise_scale`.

        Args:
            theta: `(K,)` starting relative scales sigma_k / s.
            noise_scale: starting s.
            free: boolean `(K,)`, the thetas to estimate (the others are held).
            reml: REML (True) or ML.

        Returns:
            `(theta, noise_scale)`.
        """
        theta = np.asarray(theta, "float64").copy()
        free = np.ones(len(theta), bool) if free is None else np.asarray(free, bool)
        variance = float(noise_scale) ** 2
        for _ in range(20):
            if free.any():

                def objective(squares, variance=variance):
                    trial = theta.copy()
                    trial[free] = np.sqrt(squares)
                    value, gradient, _ = self.criterion(trial, variance, reml)
                    return value, gradient[free] / (2.0 * trial[free])

                # In theta^2 the criterion has a non-zero slope at the boundary (in theta it
                # is even, so theta = 0 is always stationary, a maximum as often as not).
                result = optimize.minimize(
                    objective,
                    np.maximum(theta[free], _SMALLEST_THETA) ** 2,
                    method="L-BFGS-B",
                    jac=True,
                    bounds=[(_SMALLEST_THETA**2, _LARGEST_THETA**2)] * int(free.sum()),
                    options={"ftol": 1e-13, "gtol": 1e-9, "maxiter": 500},
                )
                theta[free] = np.sqrt(result.x)
            _, _, new_variance = self.criterion(theta, variance, reml)
            # The ridge moves with s^2 only where beta has a prior.
            converged = (
                not self.prior_precision.any()
                or abs(new_variance - variance) <= _TOLERANCE * variance
            )
            variance = new_variance
            if converged:
                break
        return theta, float(np.sqrt(variance))

    @_one_blas_thread
    def posterior(self, theta, noise_scale) -> JointPosterior:
        """The posterior of (beta, every b_k) given theta and s, on b's scale."""
        variance = float(noise_scale) ** 2
        pls = self.solve(theta, variance)
        if pls is None:
            raise ValueError("the mixed model's system is singular at the estimated scales")
        scale, factor = pls["scale"], pls["factor"]
        inverse_factor = linalg.solve_triangular(factor, np.eye(len(scale)), lower=True)
        rest_covariance = variance * scale[:, None] * (inverse_factor.T @ inverse_factor)
        rest_covariance *= scale[None, :]
        rest_mean = scale * pls["rest"]
        first = first_mean = first_variance = coupling = None
        if self.first is not None:
            t1 = theta[self.first]
            first = self.first
            diagonal = t1**2 * self.first_weight + 1.0
            first_mean = t1 * self.first_solution(pls)
            first_variance = variance * t1**2 / diagonal
            coupling = sparse.diags(t1**2 / diagonal) @ self.cross
        return JointPosterior(
            self.num_levels,
            first,
            first_mean,
            first_variance,
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
) -> JointPosterior:
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

    The scales sigma_k of factors with a hyperprior stay where SGD put them (relative to
    the noise scale); the others and the noise scale are estimated. Each layer is left with
    the joint posterior's marginal means and sds.

    Returns:
        The `JointPosterior` of `[alpha, *beta]` and every factor's offsets.

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
    y, weights, layers, codes = _rows_and_factors(y, sample_weight, factors)
    design, _, prior_mean, prior_precision = _linear_layers(
        intercept, fixed_effects, features, len(y)
    )
    system = LinearMixedSystem(
        y - held,
        weights,
        design,
        codes,
        [layer.num_groups for layer in layers],
        prior_mean,
        prior_precision,
    )
    noise_scale = float(model.likelihood.noise_scale())
    theta = np.array([float(layer.group_scale()[0]) for layer in layers]) / noise_scale
    free = np.array([layer.scale_prior is None for layer in layers], bool)
    theta, noise_scale = system.fit(theta, noise_scale, free=free, reml=reml)
    posterior = system.posterior(theta, noise_scale)

    _write_back(posterior, intercept, fixed_effects, layers, theta * noise_scale)
    model.likelihood.set_noise_scale(noise_scale)
    return posterior


class _GLMFamily:
    """NumPy pieces of a canonical-link GLM family: inverse link, variance, deviance."""

    def __init__(self, likelihood):
        self.log_link = isinstance(likelihood, Poisson)

    def mean(self, eta):
        return np.exp(np.minimum(eta, 700.0)) if self.log_link else special.expit(eta)

    def variance(self, mean):
        return mean if self.log_link else mean * (1.0 - mean)

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
        return 2.0 * float(weights @ unit)


class GeneralizedMixedModel:
    """A GLMM's linear part fitted as glmer does: penalised IRLS and the Laplace deviance.

        eta_i = h_i + d_i . beta + sum_k theta_k u_k[g_k(i)],   u ~ Normal(0, I)

    For given theta (and beta), PIRLS finds the mode of u (and beta) by iterating the
    penalised weighted least-squares system of `LinearMixedSystem` on the working response
    z = eta + (y - mu) / V(mu) with working weights w V(mu) (canonical links), halving steps
    that do not lower the penalised deviance. The Laplace deviance is

        sum_i w_i d(y_i, mu_i) + |u|^2 + log det(Lambda' Z' W Z Lambda + I)   (+ beta's prior)

    at the mode. As glmer's default (nAGQ = 1) does, theta is first fitted with beta in
    PIRLS, then theta and beta together on the Laplace deviance (L-BFGS-B, finite-difference
    gradients). The posterior is the Laplace approximation at the mode: Normal, with the
    inverse of the penalised system as covariance.

    Args:
        likelihood: a `Bernoulli`, `Binomial` or `Poisson` likelihood.
        y: `(n,)` responses (proportions for Binomial).
        weights: `(n,)` weights (Binomial: trials).
        design, codes, num_levels, prior_mean, prior_precision: as `LinearMixedSystem`'s.
        held: `(n,)` the part of eta held fixed, or 0.
    """

    def __init__(
        self, likelihood, y, weights, design, codes, num_levels, prior_mean, prior_precision, held
    ):
        self.family = _GLMFamily(likelihood)
        self.y, self.weights = y, weights
        self.design, self.codes, self.num_levels = design, codes, [int(g) for g in num_levels]
        self.prior_mean = np.asarray(prior_mean, "float64")
        self.prior_precision = np.asarray(prior_precision, "float64")
        self.held = np.broadcast_to(np.asarray(held, "float64"), y.shape)

    def _predictor(self, theta, offsets, beta):
        eta = self.held + self.design @ beta
        for k, u in enumerate(offsets):
            eta = eta + theta[k] * u[self.codes[k]]
        return eta

    def _penalised_deviance(self, theta, offsets, beta):
        mean = self.family.mean(self._predictor(theta, offsets, beta))
        shift = beta - self.prior_mean
        return (
            self.family.deviance(self.y, mean, self.weights)
            + sum(float(u @ u) for u in offsets)
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
        return LinearMixedSystem(
            response,
            self.weights * variance,
            design,
            self.codes,
            self.num_levels,
            np.asarray(prior_mean, "float64"),
            np.asarray(prior_precision, "float64"),
        )

    def pirls(self, theta, offsets, beta, free_beta=True):
        """The mode of u (and of beta when `free_beta`) at theta, from a starting point.

        Returns `(offsets, beta, laplace_deviance)`.
        """
        offsets = [np.array(u, "float64") for u in offsets]
        beta = np.array(beta, "float64")
        current = self._penalised_deviance(theta, offsets, beta)
        for _ in range(_MAX_PIRLS_STEPS):
            system = self._working_system(theta, offsets, beta, free_beta)
            pls = system.solve(theta, 1.0)
            if pls is None:  # overflowing weights at an extreme trial point
                return offsets, beta, np.inf
            new_offsets, new_beta = _coefficients(system, pls, beta, free_beta)
            for _ in range(30):  # step halving
                value = self._penalised_deviance(theta, new_offsets, new_beta)
                if value <= current + 1e-12 * (1.0 + abs(current)):
                    break
                new_offsets = [(a + b) / 2.0 for a, b in zip(offsets, new_offsets)]
                new_beta = (beta + new_beta) / 2.0
            change = current - value
            offsets, beta, current = new_offsets, new_beta, value
            if abs(change) <= 1e-12 * (1.0 + abs(current)):
                break
        pls = self._working_system(theta, offsets, beta, free_beta).solve(theta, 1.0)
        if pls is None:
            return offsets, beta, np.inf
        return offsets, beta, current + pls["log_det_random"]

    @_one_blas_thread
    def fit(self, theta, offsets, beta, scale_priors=None):
        """glmer's two stages from a starting point; returns `(theta, offsets, beta)`.

        `scale_priors` lists, per factor, None (sigma_k = theta_k a point estimate, as
        glmer's) or a function giving log p(sigma_k): that factor's sigma_k is then the mode
        of its marginal posterior on the log scale, log p(y | sigma) + log p(sigma) +
        log sigma maximised with the Laplace approximation of p(y | sigma).
        """
        theta = np.maximum(np.asarray(theta, "float64"), _SMALLEST_THETA)
        scale_priors = scale_priors or [None] * len(theta)
        state = {"offsets": offsets, "beta": np.asarray(beta, "float64")}
        num_scales = len(theta)
        bounds = [(_SMALLEST_THETA**2, _LARGEST_THETA**2)] * num_scales

        def scale_penalty(trial):
            return sum(
                -2.0 * (log_prior(t) + np.log(t))
                for log_prior, t in zip(scale_priors, trial)
                if log_prior is not None
            )

        def stage_one(squares):
            trial = np.sqrt(squares)
            offsets, beta, value = self.pirls(trial, state["offsets"], state["beta"])
            if not np.isfinite(value):
                return _OVERFLOW_DEVIANCE
            state["offsets"], state["beta"] = offsets, beta
            return value + scale_penalty(trial)

        if num_scales:
            result = optimize.minimize(
                stage_one, theta**2, method="L-BFGS-B", bounds=bounds, jac="3-point"
            )
            theta = np.sqrt(result.x)

        def stage_two(values):
            trial = np.sqrt(values[:num_scales])
            return self._laplace_objective(trial, values[num_scales:] / column_scale, state) + (
                scale_penalty(trial)
            )

        # beta in units of its column's root mean square, so that one step moves every
        # coefficient's share of eta alike
        column_scale = np.sqrt(np.mean(np.square(self.design), axis=0))
        column_scale[column_scale == 0] = 1.0
        start = np.concatenate([theta**2, state["beta"] * column_scale])
        result = optimize.minimize(
            stage_two,
            start,
            method="L-BFGS-B",
            bounds=bounds + [(None, None)] * len(state["beta"]),
            jac="3-point",
            options={"ftol": 1e-14, "gtol": 1e-8, "maxiter": 500},
        )
        theta = np.sqrt(result.x[:num_scales])
        beta = result.x[num_scales:] / column_scale
        offsets, _, _ = self.pirls(theta, state["offsets"], beta, False)
        return theta, offsets, beta

    def _laplace_objective(self, theta, beta, state):
        """The Laplace deviance at (theta, beta) plus beta's prior penalty; keeps the mode of
        u in `state` as the next start."""
        offsets, _, value = self.pirls(theta, state["offsets"], beta, False)
        if not np.isfinite(value):
            # a trial point whose weights overflow: a large finite value, so finite
            # differences and line searches step back instead of producing NaN
            return _OVERFLOW_DEVIANCE
        state["offsets"] = offsets
        shift = beta - self.prior_mean
        return value + float(shift @ (self.prior_precision * shift))

    @_one_blas_thread
    def log_scale_sd(self, theta, offsets, beta, k, log_prior):
        """The sd of log sigma_k under the Laplace approximation of its marginal posterior
        at the mode (the others and beta held): 1 / sqrt of the curvature of
        -log p(y | sigma) - log p(sigma) - log sigma in log sigma, by central differences."""
        state = {"offsets": offsets}
        step = 1e-3

        def objective(log_sigma):
            trial = theta.copy()
            trial[k] = np.exp(log_sigma)
            value = self._laplace_objective(trial, beta, state)
            return 0.5 * value - log_prior(trial[k]) - log_sigma

        centre = np.log(theta[k])
        curvature = objective(centre + step) - 2 * objective(centre) + objective(centre - step)
        curvature /= step**2
        return 1.0 / np.sqrt(curvature) if curvature > 0 else np.inf

    @_one_blas_thread
    def posterior(self, theta, offsets, beta) -> JointPosterior:
        """The Laplace approximation of the joint posterior at the mode."""
        system = self._working_system(theta, offsets, beta, True)
        posterior = system.posterior(theta, 1.0)
        posterior.rest_mean[posterior._fixed] = beta
        for k, columns in system.rest_layout.items():
            posterior.rest_mean[columns] = theta[k] * offsets[k]
        if system.first is not None:
            posterior.first_mean = theta[system.first] * offsets[system.first]
        return posterior


_MAX_PIRLS_STEPS = 100
_OVERFLOW_DEVIANCE = 1e100


def _coefficients(system, pls, beta, free_beta):
    """The per-factor u and beta in a penalised least-squares solution."""
    offsets = [None] * len(system.num_levels)
    for k, columns in system.rest_layout.items():
        offsets[k] = pls["rest"][columns]
    if system.first is not None:
        offsets[system.first] = system.first_solution(pls)
    new_beta = pls["rest"][system.num_rest_levels :] if free_beta else beta
    return offsets, np.array(new_beta, "float64")


def _rows_and_factors(y, sample_weight, factors):
    """y and the weights as float64 vectors; the factors' layers and their integer ids."""
    y = np.asarray(y, "float64").reshape(-1)
    weights = np.ones_like(y) if sample_weight is None else np.asarray(sample_weight, "float64")
    layers = [layer for layer, _ in factors]
    codes = [np.asarray(ids, "int64").reshape(-1) for _, ids in factors]
    return y, weights, layers, codes


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


def _write_back(posterior, intercept, fixed_effects, layers, scales):
    """Leaves each layer with the joint posterior's marginal means and sds."""
    fixed_mean, fixed_sd = posterior.fixed_mean(), posterior.fixed_sd()
    intercept.set_posterior(fixed_mean[:1], fixed_sd[:1])
    if fixed_effects is not None:
        fixed_effects.set_posterior(fixed_mean[1:], fixed_sd[1:])
    for k, layer in enumerate(layers):
        layer.set_posterior(posterior.offset_mean(k), posterior.offset_sd(k))
        if layer.scale_prior is None:
            layer.set_group_scale(scales[k])


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
    gets the mode of sigma_k's marginal posterior on the log scale, and q(sigma_k) is the
    Laplace approximation there (LogNormal). Returns the Laplace `JointPosterior` (given
    the scales).

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
    y, weights, layers, codes = _rows_and_factors(y, sample_weight, factors)
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
    )
    theta = np.array([max(float(layer.group_scale()[0]), _SMALLEST_THETA) for layer in layers])
    offsets = [
        layer.offset_loc.numpy()[:, 0].astype("float64") / t for layer, t in zip(layers, theta)
    ]
    log_priors = [_log_prior(layer.scale_prior) for layer in layers]
    theta, offsets, beta = glmm.fit(theta, offsets, beta, scale_priors=log_priors)
    posterior = glmm.posterior(theta, offsets, beta)
    _write_back(posterior, intercept, fixed_effects, layers, theta)
    for k, (layer, log_prior) in enumerate(zip(layers, log_priors)):
        if log_prior is not None:
            sd = glmm.log_scale_sd(theta, offsets, beta, k, log_prior)
            layer.set_group_scale_posterior(np.log(theta[k]), sd)
    return posterior


def _log_prior(scale_prior):
    """log p(sigma) of a `ScalePrior` as a function of sigma, or None without one."""
    if scale_prior is None:
        return None
    return lambda sigma: float(scale_prior.expected_log_prob(np.log(sigma), 0.0))
