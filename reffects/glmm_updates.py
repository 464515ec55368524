"""Coordinate-ascent finish for non-Gaussian models, after stochastic training.

The counterpart of `reffects.finish` for the Bernoulli, Binomial and Poisson
likelihoods. It maximises the very ELBO the model trains (the mean-field one of
`reffects.layers`), block by block, holding everything else fixed. Row i's predictor is

    eta_i = h_i + alpha + x_i . beta + sum_k b_k[g_k(i)],

with h_i any part the updates hold (a subnetwork: one pass of the network, less the current
means of the listed terms). Under q, eta_i ~ Normal(mu_i, v_i) with v_i the sum of the terms'
posterior variances, and each row's log-likelihood is w_i (y_i eta_i - A(eta_i)) + const
(A = softplus for the logit families, where w_i is the weight or the Binomial trials; A = exp
for Poisson). Its expectation and those of its first two derivatives are one-dimensional
Gaussian integrals: Gauss-Hermite quadrature for the logit link, closed form for the log link.

Group g of factor k, q(b) = Normal(m, s), with lambda_k = 1 / sigma_k^2 (E_q[1 / sigma_k^2]
under a hyperprior), maximises the concave

    sum_{i in g} w_i E[l_i(eta_i)] - lambda_k (m^2 + s^2) / 2 + log s,

whose stationary point satisfies (Opper and Archambeau, 2009)

    sum_{i in g} w_i E[l_i'] = lambda_k m,     1 / s^2 = lambda_k - sum_{i in g} w_i E[l_i'']:

a (step-limited) Newton step on m and this fixed point on s, for all groups at once. Then

    sigma_k^2 = mean over trained groups of (m^2 + s^2)        (sigma_k a point estimate)

or, under a hyperprior with q(sigma_k) = LogNormal(mu, t), (mu, t) maximise the concave

    -(G_k - 1) mu - exp(-2 mu + 2 t^2) sum_g (m^2 + s^2) / 2 + log t + E_q[log p(sigma_k)]

(G_k trained groups: `RandomIntercept._offset_kl` summed, less `ScalePrior.kl_from_lognormal`,
constants dropped). alpha and beta (design D = [1, x], prior precision P0) take a Newton step
on their means and the mean-field fixed point 1 / sd_j^2 = P0_jj - sum_i w_i D_ij^2 E[l_i''].
Finally, adding c_k to alpha and -c_k to every trained offset of factor k leaves every eta_i
unchanged, so along those ridges only the KL moves; it is quadratic in c and solved exactly
(the direction stochastic gradients barely move along). Sweeps repeat until nothing moves.

No REML-style correction is made: the finish is the mean-field optimum itself, which for
sigma sits between ML (lme4's `glmer`) and REML, as it does for the Gaussian model.
"""

import numpy as np
from keras import ops
from scipy import optimize
from scipy.special import expit

from reffects.layers import RandomIntercept
from reffects.likelihoods import Bernoulli, Binomial, Poisson
from reffects.posteriors import inverse_softplus, positive
from reffects.training import predict_means

_MAX_SWEEPS = 200
_TOLERANCE = 1e-6
_MAX_NEWTON_STEP = 1.0
_QUADRATURE_POINTS = 24
_NODES, _WEIGHTS = np.polynomial.hermite.hermgauss(_QUADRATURE_POINTS)
_NODES, _WEIGHTS = np.sqrt(2.0) * _NODES, _WEIGHTS / np.sqrt(np.pi)  # for E over N(0, 1)


def _numpy(tensor):
    return ops.convert_to_numpy(tensor).astype("float64")


def expected_derivatives(likelihood, y, mean, variance):
    """E[l'(eta)] and E[l''(eta)] per unit weight, for eta ~ Normal(mean, variance).

    l(eta) = y eta - A(eta) is a row's log-likelihood per unit weight, up to a constant.

    Example:
        >>> first, second = expected_derivatives(Poisson(), np.array([2.0]), np.zeros(1),
        ...                                      np.zeros(1))
        >>> float(first[0]), float(second[0])  # y - exp(eta), -exp(eta)
        (1.0, -1.0)
    """
    if isinstance(likelihood, Poisson):
        rate = np.exp(mean + 0.5 * variance)  # E[exp(eta)]
        return y - rate, -rate
    p = expit(mean[:, None] + np.sqrt(variance)[:, None] * _NODES)
    return y - p @ _WEIGHTS, -(p * (1.0 - p)) @ _WEIGHTS


def _newton_step(gradient, curvature):
    """`gradient / curvature`, at most `_MAX_NEWTON_STEP` in size (curvature > 0)."""
    return np.clip(gradient / curvature, -_MAX_NEWTON_STEP, _MAX_NEWTON_STEP)


class _Factor:
    """The current q of one `RandomIntercept` (units=1) and of its scale."""

    def __init__(self, layer, ids):
        if not isinstance(layer, RandomIntercept) or layer.units != 1:
            raise ValueError(f"'{layer.name}' is not a RandomIntercept with units=1")
        self.layer = layer
        self.ids = np.asarray(ids).reshape(-1)
        self.seen = _numpy(layer.group_counts) > 0
        self.mean = _numpy(layer.offset_loc)[:, 0]
        self.sd = _numpy(positive(layer.offset_untransformed_scale))[:, 0]
        if layer.scale_prior is None:
            self.scale = float(layer.group_scale()[0])
        else:
            self.log_scale_loc = float(_numpy(layer.log_group_scale_loc)[0])
            log_scale_sd = positive(layer.log_group_scale_untransformed_scale)
            self.log_scale_sd = float(_numpy(log_scale_sd)[0])

    @property
    def inverse_variance(self):
        """lambda_k = E_q[1 / sigma_k^2]."""
        if self.layer.scale_prior is None:
            return self.scale**-2
        return np.exp(-2.0 * self.log_scale_loc + 2.0 * self.log_scale_sd**2)

    def update_groups(self, first, second):
        """One Newton step on the means and the fixed point on the sds; returns the change."""
        size = len(self.seen)
        lam = self.inverse_variance
        gradient = np.bincount(self.ids, first, minlength=size) - lam * self.mean
        curvature = lam - np.bincount(self.ids, second, minlength=size)
        step = np.where(self.seen, _newton_step(gradient, curvature), -self.mean)
        self.mean = self.mean + step
        self.sd = curvature**-0.5
        return float(np.max(np.abs(step)))

    def update_scale(self):
        """The optimal sigma_k (or q(sigma_k)) given the groups; returns the change."""
        second_moment = np.sum(self.mean[self.seen] ** 2 + self.sd[self.seen] ** 2)
        num_seen = int(self.seen.sum())
        prior = self.layer.scale_prior
        if prior is None:
            new = float(np.sqrt(second_moment / max(num_seen, 1)))
            change, self.scale = abs(new - self.scale), new
            return change

        def negative_objective(theta):
            mu, t = theta[0], np.exp(theta[1])
            expected_log_prior = float(_numpy(prior.expected_log_prob(np.float64(mu), t)))
            return -(
                -(num_seen - 1) * mu
                - 0.5 * second_moment * np.exp(-2.0 * mu + 2.0 * t**2)
                + theta[1]
                + expected_log_prior
            )

        start = np.array([self.log_scale_loc, np.log(self.log_scale_sd)])
        theta = optimize.minimize(negative_objective, start, method="BFGS", tol=1e-10).x
        change = abs(theta[0] - self.log_scale_loc)
        self.log_scale_loc, self.log_scale_sd = float(theta[0]), float(np.exp(theta[1]))
        return change

    def write(self):
        layer = self.layer
        layer.offset_loc.assign(self.mean[:, None].astype("float32"))
        layer.offset_untransformed_scale.assign(
            inverse_softplus(self.sd)[:, None].astype("float32")
        )
        if layer.scale_prior is None:
            layer.group_scale_untransformed.assign([inverse_softplus(self.scale)])
        else:
            layer.log_group_scale_loc.assign([self.log_scale_loc])
            layer.log_group_scale_untransformed_scale.assign([inverse_softplus(self.log_scale_sd)])


class _Linear:
    """The current q of the global intercept (and linear fixed effects)."""

    def __init__(self, intercept, fixed_effects, features, num_rows):
        columns = [np.ones((num_rows, 1))]
        means = [_numpy(intercept.intercept_loc)]
        sds = [_numpy(positive(intercept.intercept_untransformed_scale))]
        prior_loc = [intercept.prior_loc]
        prior_precision = [intercept.prior_scale**-2]
        if fixed_effects is not None:
            features = np.asarray(features, dtype="float64")
            columns.append(features)
            means.append(_numpy(fixed_effects.kernel_loc)[:, 0])
            sds.append(_numpy(positive(fixed_effects.kernel_untransformed_scale))[:, 0])
            prior_loc += [fixed_effects.prior_loc] * features.shape[1]
            prior_precision += [fixed_effects.prior_scale**-2] * features.shape[1]
        self.intercept, self.fixed_effects = intercept, fixed_effects
        self.design = np.hstack(columns)
        self.mean, self.sd = np.concatenate(means), np.concatenate(sds)
        self.prior_loc, self.prior_precision = np.array(prior_loc), np.array(prior_precision)

    def update(self, first, second):
        """One Newton step on the means, the fixed point on the sds; returns the change."""
        gradient = self.design.T @ first - self.prior_precision * (self.mean - self.prior_loc)
        hessian = self.design.T @ (second[:, None] * self.design)
        precision = np.diag(self.prior_precision) - hessian
        step = np.linalg.solve(precision, gradient)
        step *= min(1.0, _MAX_NEWTON_STEP / max(float(np.max(np.abs(step))), 1e-300))
        self.mean = self.mean + step
        self.sd = np.diag(precision) ** -0.5
        return float(np.max(np.abs(step)))

    def centre(self, factors):
        """The exact optimum along alpha + c_k, b_k - c_k (eta unchanged, KL quadratic)."""
        prior_precision = self.prior_precision[0]
        lam = [f.inverse_variance for f in factors]
        system = np.full((len(factors), len(factors)), prior_precision)
        system[np.diag_indices(len(factors))] += [
            lam_k * f.seen.sum() for lam_k, f in zip(lam, factors)
        ]
        rhs = [
            lam_k * f.mean[f.seen].sum() - (self.mean[0] - self.prior_loc[0]) * prior_precision
            for lam_k, f in zip(lam, factors)
        ]
        shifts = np.linalg.solve(system, rhs)
        self.mean[0] += shifts.sum()
        for factor, shift in zip(factors, shifts):
            factor.mean = np.where(factor.seen, factor.mean - shift, factor.mean)
        return float(np.max(np.abs(shifts)))

    def write(self):
        self.intercept.intercept_loc.assign(self.mean[:1].astype("float32"))
        self.intercept.intercept_untransformed_scale.assign(
            inverse_softplus(self.sd[:1]).astype("float32")
        )
        if self.fixed_effects is not None:
            self.fixed_effects.kernel_loc.assign(self.mean[1:, None].astype("float32"))
            self.fixed_effects.kernel_untransformed_scale.assign(
                inverse_softplus(self.sd[1:])[:, None].astype("float32")
            )


def _predictor(held, factors, linear):
    """Mean and variance of each row's eta under q."""
    mean = held + sum(f.mean[f.ids] for f in factors)
    variance = sum(f.sd[f.ids] ** 2 for f in factors)
    if linear is not None:
        mean = mean + linear.design @ linear.mean
        variance = variance + np.square(linear.design) @ np.square(linear.sd)
    return mean, variance


def refine_glmm(
    model,
    x,
    y,
    group_ids,
    sample_weight=None,
    intercept=None,
    fixed_effects=None,
    features=None,
    held=None,
):
    """Moves the listed terms to the optimum of the mean-field ELBO, by coordinate ascent.

    Args:
        model: an `ELBOModel` with a `Bernoulli`, `Binomial` or `Poisson` likelihood whose
            predictor is additive in the listed layers (anything else, such as a
            subnetwork, is held fixed).
        x: the training inputs, as passed to `fit`.
        y: the training responses, shape `(n,)` (proportions for `Binomial`).
        group_ids: dict mapping each `RandomIntercept` (units=1) to its training ids.
        sample_weight: optional weights `(n,)`, as passed to `fit` (the trials for
            `Binomial`).
        intercept: the `GlobalIntercept` (units=1) to update too, or None to hold it.
        fixed_effects: the `FixedEffects` (units=1) to update too (needs `intercept` and
            `features`).
        features: the `(n, d)` input of `fixed_effects`.
        held: the part of the predictor the updates hold fixed, per row (or 0 where the
            predictor is the sum of the listed terms); None computes it with one pass of
            the network, less the listed terms.

    Returns:
        The number of sweeps made.

    Example:
        >>> import keras
        >>> from reffects import ELBOModel, GlobalIntercept
        >>> ids = keras.Input(shape=(), dtype="int64")
        >>> alpha, layer = GlobalIntercept(), RandomIntercept(3)
        >>> network = keras.Model(ids, keras.layers.Add()([alpha(ids), layer(ids)]))
        >>> model = ELBOModel(network, likelihood="poisson")
        >>> g, y = np.array([0, 0, 1, 2, 2, 2]), np.array([3.0, 5.0, 0.0, 1.0, 2.0, 1.0])
        >>> layer.adapt(g)
        >>> refine_glmm(model, g, y, {layer: g}, intercept=alpha) > 0
        True
        >>> float(layer.offset_loc[0, 0]) > 0 > float(layer.offset_loc[1, 0])
        True
    """
    likelihood = model.likelihood
    if not isinstance(likelihood, (Bernoulli, Binomial, Poisson)):
        raise ValueError(
            "refine_glmm needs a Bernoulli, Binomial or Poisson likelihood (use "
            f"reffects.finish.finish_gaussian for Gaussian); got {type(likelihood).__name__}"
        )
    y = np.asarray(y, dtype="float64").reshape(-1)
    weights = np.ones_like(y) if sample_weight is None else np.asarray(sample_weight, "float64")
    factors = [_Factor(layer, ids) for layer, ids in group_ids.items()]
    linear = None
    if intercept is not None:
        if intercept.units != 1 or (fixed_effects is not None and fixed_effects.units != 1):
            raise ValueError("refine_glmm updates linear terms with units=1 only")
        linear = _Linear(intercept, fixed_effects, features, len(y))

    if held is None:
        held = predict_means(model.network, x) - _predictor(0.0, factors, linear)[0]
    sweeps = 0
    while sweeps < _MAX_SWEEPS:
        sweeps += 1
        change = 0.0
        if linear is not None:
            first, second = expected_derivatives(likelihood, y, *_predictor(held, factors, linear))
            change = linear.update(weights * first, weights * second)
        for factor in factors:
            first, second = expected_derivatives(likelihood, y, *_predictor(held, factors, linear))
            change = max(change, factor.update_groups(weights * first, weights * second))
            change = max(change, factor.update_scale())
        if linear is not None and factors:
            change = max(change, linear.centre(factors))
        if change < _TOLERANCE:
            break

    for factor in factors:
        factor.write()
    if linear is not None:
        linear.write()
    return sweeps
