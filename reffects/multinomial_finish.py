"""The exact finish of the multinomial logit mixed model: glmer's Laplace fit for K classes.

With class 0 the reference, for row i and the other classes c = 1, ..., K - 1,

    eta_ic = h_ic + d_i . beta_c + sum_k b_k[g_k(i), c],        d_i = [1, x_i]
    y_i ~ Categorical(softmax(0, eta_i1, ..., eta_i,K-1))
    b_k[g] ~ Normal(0, diag(sigma_k1^2, ..., sigma_k,K-1^2)),   beta_c ~ Normal(m0, P0^-1)

where h_ic is held fixed (a subnetwork's output for class c against class 0, or 0).

glmer has no multinomial family; this is its Laplace fit (`reffects.finish`'s
`GeneralizedMixedModel`) carried over. One penalised IRLS step needs, per row, the
(K-1) x (K-1) weight W_i = diag(p_i) - p_i p_i' (p_i the other classes' probabilities) and
the working response z_i = eta_i - h_i + W_i^-1 (y_i - p_i). Writing W_i = L_i L_i' (Cholesky),

    (z_i - e_i)' W_i (z_i - e_i) = sum_r (L_i'[r, :] z_i - L_i'[r, :] e_i)^2,

e_i = eta_i - h_i the linear part, so the step is an ordinary weighted penalised
least-squares problem on K - 1 pseudo-rows per row: pseudo-row r has response
L_i'[r, :] z_i = (L_i' e_i + L_i^-1 (y_i - p_i))_r,
the row's weight, fixed design kron(L_i'[r, :], d_i) (beta class by class) and, for each
factor, d = K - 1 "terms" L_i'[r, :] on its group's K - 1 offsets, independent
(`correlated=False`): a `LinearMixedSystem` with random slopes. Its log det is that of
the Laplace approximation's Hessian (the canonical link makes observed and expected
information equal), so `GeneralizedMixedModel`'s PIRLS, Laplace deviance and posterior are
used as they are; the predictor, the deviance and the working system change, and so does
the fit: sigma maximises the Laplace approximation with (u, beta) at their joint mode
(glmer's nAGQ = 0; `MultinomialMixedModel.fit` says why not its second stage).

With a subnetwork, h is its output, held while the linear part is fitted; the subnetwork
guard (`training_recipe.choose_subnetwork_weight`) weighs it as it does for two classes.
"""

import numpy as np
from scipy import optimize, special

from reffects.finish import (
    _OVERFLOW_DEVIANCE,
    _SMALLEST_THETA,
    CovarianceFactors,
    GeneralizedMixedModel,
    LinearMixedSystem,
    _one_blas_thread,
)
from reffects.joint_posterior import JointPosterior
from reffects.layers import RandomIntercept
from reffects.likelihoods import Categorical

_WEIGHT_JITTER = 1e-12
"""Added to W_i's diagonal before its Cholesky factor: W_i is singular to rounding where a
probability is ~0 (separable rows), as the binary fit floors p (1 - p) at 1e-12."""


def _held_logits(held, num_rows, num_classes):
    """h as `(n, K - 1)` log odds against class 0, from a scalar, `(n, K - 1)` or `(n, K)`."""
    held = np.asarray(held, "float64")
    if held.shape == (num_rows, num_classes):
        held = held[:, 1:] - held[:, :1]  # the softmax is unchanged by a shift per row
    if held.ndim == 0 or held.shape == (num_rows, num_classes - 1):
        return np.broadcast_to(held, (num_rows, num_classes - 1))
    raise ValueError(
        f"`held` must be a scalar or of shape ({num_rows}, {num_classes - 1}) or "
        f"({num_rows}, {num_classes}) (num_classes={num_classes}). Received shape {held.shape}"
    )


class MultinomialMixedModel(GeneralizedMixedModel):
    """A multinomial logit mixed model's linear part fitted as glmer fits a GLMM.

    Args:
        labels: `(n,)` class of each row, integers in [0, num_classes).
        weights: `(n,)` frequency weights.
        design: `(n, p)` fixed-effect design, the intercept column first.
        codes: one `(n,)` integer array per grouping factor.
        num_levels: the levels of each factor.
        prior_mean, prior_precision: `((K - 1) p,)` (or scalars) beta's Normal prior, class
            by class (class c's `[alpha_c, *beta_c]` at `[(c - 1) p, c p)`).
        num_classes: K, at least 2.
        held: h, the part of eta held fixed: `(n, K - 1)` (against class 0), `(n, K)`
            (one column per class; h_c is column c less column 0), or a scalar (0: none).

    theta holds sigma_kc, factor by factor (`CovarianceFactors` with K - 1 independent
    terms per factor); beta is `((K - 1) p,)` as the prior; the offsets u are one
    `(num_levels[k], K - 1)` array per factor, b_k[g, c] = sigma_kc u_k[g, c].

    Example:
        >>> rng = np.random.default_rng(1)
        >>> g = np.repeat(np.arange(30), 100)
        >>> offsets = rng.normal(0.0, [0.5, 1.0], (30, 2))
        >>> p = special.softmax(np.column_stack([np.zeros(3000), offsets[g]]), axis=1)
        >>> labels = (rng.random(3000)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
        >>> model = MultinomialMixedModel(labels, np.ones(3000), np.ones((3000, 1)), [g],
        ...                               [30], 0.0, 0.01, num_classes=3)
        >>> theta, u, beta = model.fit(np.ones(2), [np.zeros((30, 2))], np.zeros(2))
        >>> theta.round(2).tolist(), offsets.std(axis=0).round(2).tolist()  # sigma, realised
        ([0.42, 0.88], [0.44, 0.84])
    """

    # GeneralizedMixedModel's __init__ is not called: it sets up a one-column family that
    # this model replaces; every attribute its methods read is set here.
    def __init__(
        self,
        labels,
        weights,
        design,
        codes,
        num_levels,
        prior_mean,
        prior_precision,
        num_classes,
        held=0.0,
    ):
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(
                "`num_classes` must be an integer of at least 2. "
                f"Received: num_classes={num_classes!r}"
            )
        self.num_classes = int(num_classes)
        d = self.num_classes - 1
        self.labels = np.asarray(labels).reshape(-1)
        if self.labels.dtype.kind not in "iu" or np.any(
            (self.labels < 0) | (self.labels >= self.num_classes)
        ):
            raise ValueError(
                f"`labels` must be integers in [0, {self.num_classes}) (num_classes="
                f"{self.num_classes}). Received: {np.unique(self.labels)[:10].tolist()}"
            )
        num_rows = len(self.labels)
        self.weights = np.asarray(weights, "float64").reshape(num_rows)
        self.indicators = np.eye(self.num_classes)[self.labels][:, 1:]  # y_i, (n, K - 1)
        self.row_design = np.asarray(design, "float64").reshape(num_rows, -1)
        self.codes = [np.asarray(c, "int64").reshape(num_rows) for c in codes]
        self.num_levels = [int(g) for g in num_levels]
        width = d * self.row_design.shape[1]
        self.prior_mean = np.broadcast_to(np.asarray(prior_mean, "float64"), (width,))
        self.prior_precision = np.broadcast_to(np.asarray(prior_precision, "float64"), (width,))
        # `pirls` reads each factor's number of terms off `terms`
        self.terms = [np.broadcast_to(1.0, (num_rows, d)) for _ in self.codes]
        self.correlated = [False] * len(self.codes)
        self.covariance_factors = CovarianceFactors([d] * len(self.codes), self.correlated)
        self.sparse = False  # K - 1 terms a factor: the dense finish only
        self.held = _held_logits(held, num_rows, self.num_classes)

    def _predictor(self, theta, offsets, beta):
        """eta, `(n, K - 1)`."""
        eta = self.held + self.row_design @ np.reshape(beta, (self.num_classes - 1, -1)).T
        for codes, u, factor in zip(self.codes, offsets, self.covariance_factors.matrices(theta)):
            eta = eta + (u @ factor.T)[codes]
        return eta

    def _penalised_deviance(self, theta, offsets, beta):
        eta = self._predictor(theta, offsets, beta)
        largest = np.maximum(eta.max(axis=1), 0.0)  # log sum exp of (0, eta), stably
        normaliser = largest + np.log(np.exp(-largest) + np.exp(eta - largest[:, None]).sum(axis=1))
        logits = np.column_stack([np.zeros(len(eta)), eta])
        chosen = logits[np.arange(len(eta)), self.labels] - normaliser
        counted = self.weights > 0  # a row without weight adds nothing
        shift = beta - self.prior_mean
        return (
            -2.0 * float(self.weights[counted] @ chosen[counted])
            + sum(float(np.sum(np.square(u))) for u in offsets)
            + float(shift @ (self.prior_precision * shift))
        )

    def _working_system(self, theta, offsets, beta, free_beta):
        """The PIRLS step's `LinearMixedSystem` on the K - 1 pseudo-rows of each row."""
        eta = self._predictor(theta, offsets, beta)
        d = self.num_classes - 1
        p = special.softmax(np.column_stack([np.zeros(len(eta)), eta]), axis=1)[:, 1:]
        weight = -p[:, :, None] * p[:, None, :]
        diagonal = np.arange(d)
        weight[:, diagonal, diagonal] += p + _WEIGHT_JITTER
        lower = np.linalg.cholesky(weight)  # L_i, (n, K - 1, K - 1)
        residual = np.linalg.solve(lower, (self.indicators - p)[..., None])[..., 0]
        response = np.einsum("icr,ic->ir", lower, eta - self.held) + residual  # L_i' z_i
        terms = np.swapaxes(lower, 1, 2).reshape(-1, d)  # pseudo-row (i, r): L_i'[r, :]
        design = np.einsum("rc,rj->rcj", terms, np.repeat(self.row_design, d, axis=0))
        design = design.reshape(len(terms), -1)
        response = response.reshape(-1)
        prior_mean, prior_precision = self.prior_mean, self.prior_precision
        if not free_beta:
            response = response - design @ beta
            design, prior_mean, prior_precision = design[:, :0], prior_mean[:0], prior_precision[:0]
        return LinearMixedSystem(
            response,
            np.repeat(self.weights, d),
            design,
            [np.repeat(codes, d) for codes in self.codes],
            self.num_levels,
            prior_mean,
            prior_precision,
            [terms] * len(self.codes),
            self.correlated,
        )

    def laplace_deviance(self, theta, beta, offsets=None) -> float:
        """-2 log of the Laplace approximation to p(y | sigma = theta, beta), plus beta's
        prior penalty (beta - m0)' P0 (beta - m0), from the mode of u found by PIRLS
        (started at `offsets`, or 0)."""
        if offsets is None:
            offsets = [np.zeros((g, self.num_classes - 1)) for g in self.num_levels]
        _, _, value = self.pirls(np.asarray(theta, "float64"), offsets, beta, False)
        return value

    @_one_blas_thread
    def fit(self, theta, offsets, beta):
        """sigma maximising the Laplace approximation with (u, beta) at their joint mode
        (glmer's nAGQ = 0), from a starting point; returns `(theta, offsets, beta)`.

        L-BFGS-B on the Laplace deviance over theta (PIRLS finds u and beta at each trial),
        then Newton steps on a central-difference Hessian, which take theta from the
        search's ~1e-6 to ~1e-9 of the optimum, so that fits from different starts (after
        SGD, or on reordered or repeated rows) agree. glmer's default second stage (beta
        refitted on the Laplace deviance, as `GeneralizedMixedModel.fit` does with its
        analytic gradient in beta) was tried here with finite differences over all
        (K - 1) p coefficients, each difference a PIRLS run. On the first draw of
        `benchmarks/multiclass.py` (6,000 rows, 8 fixed effects) that took 6 times as long
        (80 s against 13 s on a loaded 2-core machine) for held-out log loss 0.9077 against
        0.9076 (100 groups) and 0.9247 against 0.9240 (1,000 groups of 6 rows), sigma within
        2.5%; at 6 rows per group it moved the fixed effects by up to 0.09 (the joint mode
        pulls population-level effects towards 0). With sixty coefficients, as in
        scikit-learn's checks, it takes minutes.
        """
        layout = self.covariance_factors
        every = np.ones(layout.size, bool)
        state = {"offsets": offsets, "beta": np.asarray(beta, "float64")}

        def objective(values):
            trial = layout.from_search(values, every)
            offsets, beta, value = self.pirls(trial, state["offsets"], state["beta"])
            if not np.isfinite(value):
                return _OVERFLOW_DEVIANCE
            state["offsets"], state["beta"] = offsets, beta
            return value

        bounds = np.array(layout.bounds(every), "float64").reshape(-1, 2)
        values = layout.to_search(np.maximum(theta, _SMALLEST_THETA), every)
        if layout.size:  # without grouping factors, PIRLS alone is the fit
            values = optimize.minimize(
                objective,
                values,
                method="L-BFGS-B",
                bounds=bounds,
                jac="2-point",
                options={"ftol": 1e-12, "gtol": 1e-8, "maxiter": 500},
            ).x
        values = _newton_polish(objective, values, bounds)
        theta = layout.from_search(values, every)
        offsets, beta, _ = self.pirls(theta, state["offsets"], state["beta"])
        return theta, offsets, beta


_POLISH_STEP = 1e-4
"""Relative step of the polish's central differences: its truncation error (~1e-8 of the
gradient) and rounding error (the deviance is converged to ~1e-12, over a step of ~1e-5)
are both well below the search's own error."""


def _newton_polish(objective, values, bounds, steps=3):
    """Up to `steps` Newton steps on `objective` over the entries of `values` off their
    bounds, the gradient and Hessian by central differences; a step that does not lower
    the objective is not taken."""
    free = (values > bounds[:, 0] * (1 + 1e-6)) & (values < bounds[:, 1] * (1 - 1e-6))
    index = np.flatnonzero(free)
    current = objective(values)
    for _ in range(steps if len(index) else 0):
        step = _POLISH_STEP * np.maximum(np.abs(values[index]), 1e-3)

        def at(shift, origin=values):
            trial = origin.copy()
            trial[index] += shift
            return objective(trial)

        unit = np.eye(len(index)) * step
        plus = np.array([at(u) for u in unit])
        minus = np.array([at(-u) for u in unit])
        gradient = (plus - minus) / (2 * step)
        hessian = np.diag((plus - 2 * current + minus) / step**2)
        for i in range(len(index)):
            for j in range(i):
                cross = (
                    at(unit[i] + unit[j])
                    - at(unit[i] - unit[j])
                    - at(unit[j] - unit[i])
                    + at(-unit[i] - unit[j])
                ) / (4 * step[i] * step[j])
                hessian[i, j] = hessian[j, i] = cross
        try:
            move = -np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            break
        if not np.all(np.linalg.eigvalsh(hessian) > 0):
            break  # not a minimum's neighbourhood: keep the search's answer
        trial = values.copy()
        trial[index] = np.clip(values[index] + move, bounds[index, 0], bounds[index, 1])
        value = objective(trial)
        if not value <= current:
            break
        values, current = trial, value
        if np.all(np.abs(move) <= 1e-10 * np.maximum(np.abs(values[index]), 1e-3)):
            break
    objective(values)  # leaves the mode at `values` as the next start
    return values


def finish_multinomial(
    model,
    intercept,
    factors,
    fixed_effects=None,
    features=None,
    *,
    y,
    held=0.0,
    sample_weight=None,
) -> JointPosterior:
    """Moves a multinomial mixed model's linear part to the Laplace estimates and posterior.

    Args:
        model: an `ELBOModel` with a `Categorical` likelihood.
        intercept: its `GlobalIntercept` (units K - 1).
        factors: list of `(RandomIntercept, training ids)` pairs, units K - 1, each without
            a `scale_prior` (a third entry, `finish_glmm`'s slope inputs, is ignored: None).
        fixed_effects: its `FixedEffects` (units K - 1), or None; `features` its `(n, p - 1)`
            input.
        y: `(n, K)` one-hot classes.
        held: the part of eta held fixed (a subnetwork's output), `(n, K - 1)` or `(n, K)`
            as `MultinomialMixedModel` takes it, or 0.
        sample_weight: `(n,)` frequency weights, or None.

    The fit starts from the layers' current values (SGD's, or the starting model's). Each
    layer is left with the Laplace posterior's marginal means and sds and sigma_kc.

    Returns:
        The Laplace `JointPosterior` (given the scales) of beta, class by class
        (`[alpha_c, *beta_c]`), and every factor's `(num_levels, K - 1)` offsets.

    Example:
        >>> import keras
        >>> from reffects import ELBOModel, GlobalIntercept, RandomIntercept
        >>> ids = keras.Input(shape=(), dtype="int64")
        >>> alpha, layer = GlobalIntercept(units=2), RandomIntercept(3, units=2)
        >>> network = keras.Model(ids, keras.layers.Add()([alpha(ids), layer(ids)]))
        >>> model = ELBOModel(network, likelihood=Categorical(num_classes=3))
        >>> g = np.repeat(np.arange(3), 4)
        >>> y = np.eye(3)[[0, 0, 1, 2, 1, 1, 1, 2, 2, 2, 2, 0]]
        >>> layer.adapt(g)
        >>> posterior = finish_multinomial(model, alpha, [(layer, g)], y=y)
        >>> posterior.offset_mean(0).shape, layer.group_scale().shape
        ((3, 2), TensorShape([2]))
    """
    likelihood = model.likelihood
    if not isinstance(likelihood, Categorical):
        raise ValueError(
            "finish_multinomial needs a model with a Categorical likelihood. "
            f"Received: {type(likelihood).__name__}"
        )
    num_classes = likelihood.num_classes
    d = num_classes - 1
    y = np.asarray(y, "float64")
    likelihood.check_targets(y)
    num_rows = len(y)
    weights = np.ones(num_rows) if sample_weight is None else np.asarray(sample_weight, "float64")
    layers = [factor[0] for factor in factors]
    for layer in layers:
        if not isinstance(layer, RandomIntercept) or layer.units != d:
            raise ValueError(
                f"finish_multinomial takes RandomIntercept layers with units={d} (one offset "
                f"per class but the reference). Received: {layer.name!r}"
            )
        if layer.scale_prior is not None:
            raise ValueError(
                f"finish_multinomial estimates sigma as a point; RandomIntercept "
                f"{layer.name!r} has a scale_prior (fit it by SGD instead)"
            )
    design = np.ones((num_rows, 1))
    coefficients = [np.asarray(intercept.intercept_loc.numpy(), "float64")[:, None]]
    prior_mean, prior_precision = [intercept.prior_loc], [intercept.prior_scale**-2]
    if fixed_effects is not None:
        width = np.shape(features)[1]
        design = np.column_stack([design, np.asarray(features, "float64")])
        coefficients.append(np.asarray(fixed_effects.kernel_loc.numpy(), "float64").T)
        prior_mean += [fixed_effects.prior_loc] * width
        prior_precision += [fixed_effects.prior_scale**-2] * width
    beta = np.hstack(coefficients).reshape(-1)  # class by class
    glmm = MultinomialMixedModel(
        y.argmax(axis=1),
        weights,
        design,
        [np.asarray(factor[1], "int64").reshape(-1) for factor in factors],
        [layer.num_groups for layer in layers],
        np.tile(prior_mean, d),
        np.tile(prior_precision, d),
        num_classes,
        held,
    )
    sigma = [np.asarray(layer.group_scale(), "float64") for layer in layers]
    offsets = [
        np.asarray(layer.offset_loc.numpy(), "float64") / scale
        for layer, scale in zip(layers, sigma)
    ]
    theta, offsets, beta = glmm.fit(np.concatenate([np.zeros(0), *sigma]), offsets, beta)
    posterior = glmm.posterior(theta, offsets, beta)
    mean = posterior.fixed_mean().reshape(d, -1)
    sd = posterior.fixed_sd().reshape(d, -1)
    intercept.set_posterior(mean[:, 0], sd[:, 0])
    if fixed_effects is not None:
        fixed_effects.set_posterior(mean[:, 1:].T, sd[:, 1:].T)
    for k, (layer, factor) in enumerate(zip(layers, glmm.covariance_factors.matrices(theta))):
        layer.set_posterior(posterior.offset_mean(k), posterior.offset_sd(k))
        layer.set_group_scale(np.diag(factor))
    return posterior
