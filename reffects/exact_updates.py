"""Exact coordinate-ascent updates for Gaussian models, after stochastic training.

With a Gaussian likelihood, each block of the mean-field posterior has a closed-form optimum
given the others. For group g of factor k, with r_i the residual of row i once factor k's
offset is taken out and w_i its sample weight:

    precision_g = sum_{i in g} w_i / sigma_y^2 + 1 / sigma_k^2
    q(b_k[g])   = Normal(sum_{i in g} w_i r_i / sigma_y^2 / precision_g, precision_g^-1/2)
    sigma_k^2   = mean over trained groups of E[b_k[g]^2]
    sigma_y^2   = sum_i w_i E_q[(y_i - eta_i)^2] / sum_i w_i

and for the linear terms (alpha, beta) with design D = [1, x] and prior precision Lambda:

    P = D' W D / sigma_y^2 + Lambda,   mean = P^-1 (D' W r / sigma_y^2 + Lambda m0),
    sd_j = P_jj^-1/2 (the mean-field sd)

In E[b_k[g]^2] the intercept is integrated out jointly with the offsets, adding
shrinkage_g^2 Var(alpha): that is REML's correction of ML's sigma_k.

SGD reaches the optimum only up to the noise of its last steps, and that noise inflates
sigma_k (it adds to every squared group mean). One pass of `predict` fixes everything the
updates do not touch (a dense subnetwork). One pass over the rows then sums what the
updates need per group and per design column (D' W D, D' W r, each group's sums of w d and
w r), and the updates iterate in NumPy on those sums until they stop moving; a sweep costs
the number of groups, not of rows, unless factors cross.
"""

import numpy as np
from keras import ops
from scipy import sparse

from reffects.layers import FixedEffects, GlobalIntercept, RandomIntercept
from reffects.likelihoods import Gaussian
from reffects.posteriors import inverse_softplus, positive
from reffects.training import predict_means

_MAX_SWEEPS = 200
_TOLERANCE = 1e-6


def _numpy(tensor):
    return ops.convert_to_numpy(tensor).astype("float64")


def _linear_part(intercept, fixed_effects, features, num_rows):
    """Design matrix, current means, prior means and prior precisions of (alpha, beta)."""
    if intercept is None:
        return None
    if not isinstance(intercept, GlobalIntercept) or intercept.units != 1:
        raise ValueError(f"'{intercept.name}' is not a GlobalIntercept with units=1")
    means = [_numpy(intercept.intercept_loc)]
    prior_loc = [intercept.prior_loc]
    prior_precision = [intercept.prior_scale**-2]
    width = 0
    if fixed_effects is not None:
        if not isinstance(fixed_effects, FixedEffects) or fixed_effects.units != 1:
            raise ValueError(f"'{fixed_effects.name}' is not a FixedEffects with units=1")
        width = np.shape(features)[1]
        means.append(_numpy(fixed_effects.kernel_loc)[:, 0])
        prior_loc += [fixed_effects.prior_loc] * width
        prior_precision += [fixed_effects.prior_scale**-2] * width
    design = np.empty((num_rows, 1 + width))
    design[:, 0] = 1.0
    if width:
        design[:, 1:] = features
    return {
        "design": design,
        "mean": np.concatenate(means),
        "prior_loc": np.array(prior_loc),
        "prior_precision": np.array(prior_precision),
    }


def _group_factor(layer, ids, weights):
    if not isinstance(layer, RandomIntercept) or layer.units != 1:
        raise ValueError(f"'{layer.name}' is not a RandomIntercept with units=1")
    ids = np.asarray(ids).reshape(-1)
    # sums[g] = sum_{i in g} w_i v_i for every group g, as one sparse product `sums @ v`.
    sums = sparse.csr_matrix(
        (weights, (ids, np.arange(len(ids)))), shape=(layer.num_groups, len(ids))
    )
    return {
        "layer": layer,
        "ids": ids,
        "sums": sums,
        "seen": _numpy(layer.group_counts) > 0,
        "weight": sums @ np.ones(len(ids)),
        "mean": _numpy(layer.offset_loc)[:, 0],
        "sd": _numpy(positive(layer.offset_untransformed_scale))[:, 0],
        "scale": float(layer.group_scale()[0]),
        "inverse_variance": float(layer.inverse_prior_variance()[0]),
    }


def _update_factor(factor, weighted_sum, noise_variance, intercept_prior=None):
    """Exact q(b_k), with EM on sigma_k when it is a point, given the residual without k.

    `weighted_sum` holds sum_{i in g} w_i r_i per group g, r the residual without factor k.

    With `intercept_prior = (mean, precision)` the residual also leaves out the intercept,
    which is solved jointly with the offsets: with the offsets integrated out, group g's
    mean residual is Normal(alpha, sigma_k^2 + sigma_y^2 / W_g), so alpha is their
    precision-weighted mean, and q(b_k[g]) shrinks the group's residual around it. One
    step then does what alternating alpha and b_k does in many (their sum is a flat
    direction). Returns the largest change of an offset and the intercept (or None).
    """
    seen = factor["seen"]
    weight, sums = factor["weight"][seen], weighted_sum[seen]  # trained groups only
    weighted = weight > 0  # a group whose rows all have weight 0 says nothing about alpha
    if intercept_prior is not None:
        prior_mean, prior_precision = intercept_prior
        group_means = sums[weighted] / weight[weighted]
    alpha = 0.0
    for _ in range(200):
        group_mean_variance = factor["scale"] ** 2 + noise_variance / weight[weighted]
        intercept_precision = np.sum(1.0 / group_mean_variance)
        if intercept_prior is not None:
            intercept_precision += prior_precision
            alpha = (
                np.sum(group_means / group_mean_variance) + prior_mean * prior_precision
            ) / intercept_precision
        inverse_variance = factor["inverse_variance"]
        precision = weight / noise_variance + inverse_variance
        seen_mean = (sums - alpha * weight) / noise_variance / precision
        if factor["layer"].scale_prior is not None:
            break  # sigma_k has its own posterior, fitted by SGD
        # The intercept integrated out jointly with the offsets adds shrinkage^2 Var(alpha)
        # to E[b^2]: REML's correction of ML's sigma_k.
        shrinkage = weight / noise_variance / precision
        second_moment = seen_mean**2 + 1.0 / precision + shrinkage**2 / intercept_precision
        new_scale = float(np.sqrt(np.mean(second_moment)))
        converged = abs(new_scale - factor["scale"]) < _TOLERANCE * factor["scale"]
        factor["scale"], factor["inverse_variance"] = new_scale, new_scale**-2
        if converged:
            break
    mean = np.zeros_like(factor["mean"])
    mean[seen] = seen_mean
    # A group without training rows keeps the prior: mean 0, sd sigma_k.
    sd = (factor["weight"] / noise_variance + inverse_variance) ** -0.5
    change = float(np.max(np.abs(mean - factor["mean"])))
    factor["mean"], factor["sd"] = mean, sd
    return change, (alpha if intercept_prior is not None else None)


def _update_linear(linear, factors, noise_variance):
    """Exact q(alpha, beta) given the offsets; returns the largest change of a mean."""
    precision = linear["gram"] / noise_variance + np.diag(linear["prior_precision"])
    moment = linear["free_moment"] - sum(f["design_sums"].T @ f["mean"] for f in factors)
    rhs = moment / noise_variance + linear["prior_precision"] * linear["prior_loc"]
    mean = np.linalg.solve(precision, rhs)
    change = float(np.max(np.abs(mean - linear["mean"])))
    linear["mean"], linear["sd"] = mean, np.diag(precision) ** -0.5
    linear["variance"] = float(np.square(linear["sd"]) @ linear["weighted_squares"])
    return change


def _expected_squared_error(free_squares, factors, linear, offsets, weights):
    """E_q sum_i w_i (free_i - d_i . theta - sum_k b_k[g_k(i)])^2, from the sums.

    The square is expanded into the sums kept per group and per design column; `offsets`
    (the summed offsets per row) is given where factors cross and their products need rows.
    """
    total = free_squares + sum(f["weight"] @ np.square(f["sd"]) for f in factors)
    for factor in factors:
        total -= 2.0 * factor["free_sum"] @ factor["mean"]
    if offsets is None:
        total += sum(f["weight"] @ np.square(f["mean"]) for f in factors)
    else:
        total += weights @ np.square(offsets)
    if linear is not None:
        theta = linear["mean"]
        total += theta @ linear["gram"] @ theta - 2.0 * theta @ linear["free_moment"]
        total += 2.0 * sum(theta @ (f["design_sums"].T @ f["mean"]) for f in factors)
        total += linear["variance"]
    return float(total)


def refine_gaussian(
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
    """Moves the listed terms and the noise scale to their exact joint optimum.

    Args:
        model: an `ELBOModel` with a `Gaussian` likelihood whose predictor is additive in
            the listed layers (anything else, such as a subnetwork, is held fixed).
        x: the training inputs, as passed to `fit`.
        y: the training responses, shape `(n,)`.
        group_ids: dict mapping each `RandomIntercept` (units=1) to its training ids.
        sample_weight: optional weights `(n,)`, as passed to `fit`.
        intercept: the `GlobalIntercept` to update too, or None to hold it.
        fixed_effects: the `FixedEffects` to update too (needs `intercept` and `features`).
        features: the `(n, d)` input of `fixed_effects`.
        held: the part of the predictor the updates hold fixed, per row (or 0 where the
            predictor is the sum of the listed terms); None computes it with one pass of
            the network, less the listed terms.

    Returns:
        The number of sweeps made.

    Example:
        >>> import keras
        >>> from reffects import ELBOModel
        >>> ids = keras.Input(shape=(), dtype="int64")
        >>> alpha, layer = GlobalIntercept(), RandomIntercept(3)
        >>> model = ELBOModel(keras.Model(ids, keras.layers.Add()([alpha(ids), layer(ids)])))
        >>> g, y = np.array([0, 0, 1, 2, 2, 2]), np.array([1.0, 1.2, -0.5, 0.1, 0.3, 0.2])
        >>> layer.adapt(g)
        >>> refine_gaussian(model, g, y, {layer: g}, intercept=alpha) > 0
        True
    """
    if not isinstance(model.likelihood, Gaussian):
        raise ValueError("exact updates need a Gaussian likelihood")
    y = np.asarray(y, dtype="float64").reshape(-1)
    weights = np.ones_like(y) if sample_weight is None else np.asarray(sample_weight, "float64")
    noise_variance = float(model.likelihood.noise_scale()) ** 2
    factors = [_group_factor(layer, ids, weights) for layer, ids in group_ids.items()]
    linear = _linear_part(intercept, fixed_effects, features, len(y))

    design = None if linear is None else linear.pop("design")
    if held is None:
        held = predict_means(model.network, x) - sum(f["mean"][f["ids"]] for f in factors)
        if linear is not None:
            held -= design @ linear["mean"]
    free = y - held  # the part of y the updated terms explain
    free_squares = float(weights @ np.square(free))
    for factor in factors:
        factor["free_sum"] = factor["sums"] @ free
    if linear is not None:
        weighted_design = weights[:, None] * design
        linear["free_moment"] = weighted_design.T @ free
        linear["gram"] = weighted_design.T @ design
        # sum_i w_i Var(d_i . theta) = sum_j sd_j^2 sum_i w_i d_ij^2 under the mean field.
        linear["weighted_squares"] = np.einsum("ij,ij->j", weighted_design, design)
        for factor in factors:
            factor["design_sums"] = factor["sums"] @ design
        del design, weighted_design
    # From here on each sweep works on these sums, per group and per design column; only
    # crossed factors need the rows again (one factor's offsets summed per group of another).

    sweeps = 0
    while sweeps < _MAX_SWEEPS:
        sweeps += 1
        change = 0.0
        if linear is not None:
            change = _update_linear(linear, factors, noise_variance)
        # The offsets of every factor per row, needed only where factors cross.
        offsets = sum(f["mean"][f["ids"]] for f in factors) if len(factors) > 1 else None
        for factor in factors:
            weighted_sum = factor["free_sum"].copy()
            if offsets is not None:
                others = offsets - factor["mean"][factor["ids"]]
                weighted_sum -= factor["sums"] @ others
            intercept_prior = None
            if linear is not None:
                # With the factor's groups trained, alpha is solved jointly with its offsets.
                joint = factor["seen"].any()
                columns = slice(1, None) if joint else slice(None)
                weighted_sum -= factor["design_sums"][:, columns] @ linear["mean"][columns]
                if joint:
                    intercept_prior = (linear["prior_loc"][0], linear["prior_precision"][0])
            factor_change, alpha = _update_factor(
                factor, weighted_sum, noise_variance, intercept_prior
            )
            if alpha is not None:
                change = max(change, abs(alpha - linear["mean"][0]))
                linear["mean"][0] = alpha
            change = max(change, factor_change)
            if offsets is not None:
                offsets = others + factor["mean"][factor["ids"]]
        squared_error = _expected_squared_error(free_squares, factors, linear, offsets, weights)
        noise_variance = squared_error / weights.sum()
        if change < _TOLERANCE:
            break

    for factor in factors:
        layer = factor["layer"]
        layer.offset_loc.assign(factor["mean"][:, None].astype("float32"))
        layer.offset_untransformed_scale.assign(
            inverse_softplus(factor["sd"])[:, None].astype("float32")
        )
        if layer.scale_prior is None:
            layer.group_scale_untransformed.assign([inverse_softplus(factor["scale"])])
    if linear is not None:
        intercept.intercept_loc.assign(linear["mean"][:1].astype("float32"))
        intercept.intercept_untransformed_scale.assign(
            inverse_softplus(linear["sd"][:1]).astype("float32")
        )
        if fixed_effects is not None:
            fixed_effects.kernel_loc.assign(linear["mean"][1:, None].astype("float32"))
            fixed_effects.kernel_untransformed_scale.assign(
                inverse_softplus(linear["sd"][1:])[:, None].astype("float32")
            )
    model.likelihood.noise_scale_untransformed.assign(inverse_softplus(noise_variance**0.5))
    return sweeps
