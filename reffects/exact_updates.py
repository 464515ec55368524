"""Exact coordinate-ascent updates of Gaussian random intercepts, after stochastic training.

With a Gaussian likelihood and everything else held at its current posterior, the optimal
mean-field q(b_k[g]) and the optimal point estimates of sigma_k and the noise scale have
closed forms. For group g of factor k, with r_i the residual of row i once factor k's offset
is taken out and w_i its sample weight:

    precision_g = sum_{i in g} w_i / sigma_y^2 + 1 / sigma_k^2
    q(b_k[g])   = Normal(sum_{i in g} w_i r_i / sigma_y^2 / precision_g, precision_g^-1/2)
    sigma_k^2   = mean over trained groups of (mean_g^2 + sd_g^2)
    sigma_y^2   = sum_i w_i E_q[(y_i - eta_i)^2] / sum_i w_i

SGD reaches this optimum only up to the noise of its last steps, and that noise inflates
sigma_k (it adds to every mean_g^2). One pass of `predict` gives the per-group sums, after
which the updates iterate in NumPy until they stop moving.
"""

import numpy as np
from keras import ops

from reffects.layers import RandomIntercept
from reffects.likelihoods import Gaussian
from reffects.posteriors import inverse_softplus

_MAX_SWEEPS = 50
_TOLERANCE = 1e-7


def refine_gaussian_random_effects(
    model, x, y, group_ids, sample_weight=None, fixed_part_variance=None
):
    """Moves each `RandomIntercept` (units=1) and the noise scale to their exact optimum.

    Args:
        model: an `ELBOModel` with a `Gaussian` likelihood whose predictor is additive in
            the listed `RandomIntercept` layers.
        x: the training inputs, as passed to `fit`.
        y: the training responses, shape `(n,)`.
        group_ids: dict mapping each `RandomIntercept` layer to its training ids `(n,)`.
        sample_weight: optional weights `(n,)`, as passed to `fit`.
        fixed_part_variance: optional `(n,)` posterior variance of the rest of the predictor
            (intercept and fixed effects). It enters the noise-scale update, where it plays
            the part of REML's degrees-of-freedom correction (about p sigma_y^2 / N).

    Returns:
        The number of sweeps made.

    Example:
        >>> import keras
        >>> from reffects import ELBOModel, GlobalIntercept
        >>> ids = keras.Input(shape=(), dtype="int64")
        >>> layer = RandomIntercept(3)
        >>> eta = keras.layers.Add()([GlobalIntercept()(ids), layer(ids)])
        >>> model = ELBOModel(keras.Model(ids, eta))
        >>> g, y = np.array([0, 0, 1, 2, 2, 2]), np.array([1.0, 1.2, -0.5, 0.1, 0.3, 0.2])
        >>> layer.adapt(g)
        >>> refine_gaussian_random_effects(model, g, y, {layer: g}) > 0
        True
    """
    if not isinstance(model.likelihood, Gaussian):
        raise ValueError("exact updates need a Gaussian likelihood")
    y = np.asarray(y, dtype="float64").reshape(-1)
    weights = np.ones_like(y) if sample_weight is None else np.asarray(sample_weight, "float64")
    eta = np.asarray(model.predict(x, batch_size=8192, verbose=0), dtype="float64").reshape(-1)
    noise_variance = float(model.likelihood.noise_scale()) ** 2
    other_variance = 0.0 if fixed_part_variance is None else np.asarray(fixed_part_variance)

    factors = []
    for layer, ids in group_ids.items():
        if not isinstance(layer, RandomIntercept) or layer.units != 1:
            raise ValueError(f"'{layer.name}' is not a RandomIntercept with units=1")
        ids = np.asarray(ids).reshape(-1)
        seen = ops.convert_to_numpy(layer.group_counts) > 0
        factors.append(
            {
                "layer": layer,
                "ids": ids,
                "seen": seen,
                "weight": np.bincount(ids, weights, minlength=layer.num_groups),
                "mean": ops.convert_to_numpy(layer.offset_loc)[:, 0].astype("float64"),
                "scale": float(layer.group_scale()[0]),
                "inverse_variance": float(layer.inverse_prior_variance()[0]),
            }
        )

    sweeps = 0
    while sweeps < _MAX_SWEEPS:
        sweeps += 1
        change = 0.0
        for factor in factors:
            ids, seen = factor["ids"], factor["seen"]
            residual = y - eta + factor["mean"][ids]
            weighted_sum = np.bincount(ids, weights * residual, minlength=len(seen))
            for _ in range(200):  # sigma_k <-> q(b_k) given the residuals: a fast EM
                precision = factor["weight"] / noise_variance + factor["inverse_variance"]
                mean = np.where(seen, weighted_sum / noise_variance / precision, 0.0)
                sd = precision**-0.5
                if factor["layer"].scale_prior is not None:
                    break  # sigma_k has its own posterior, fitted by SGD
                # With the intercept integrated out jointly with the offsets, each offset's
                # variance gains shrinkage^2 Var(alpha): REML's correction of ML's sigma_k.
                weight = factor["weight"][seen]
                intercept_variance = 1.0 / np.sum(
                    1.0 / (factor["scale"] ** 2 + noise_variance / weight)
                )
                shrinkage = weight / noise_variance / precision[seen]
                second_moment = mean[seen] ** 2 + sd[seen] ** 2 + shrinkage**2 * intercept_variance
                new_scale = float(np.sqrt(np.mean(second_moment)))
                converged = abs(new_scale - factor["scale"]) < _TOLERANCE * factor["scale"]
                factor["scale"], factor["inverse_variance"] = new_scale, new_scale**-2
                if converged:
                    break
            eta += (mean - factor["mean"])[ids]
            change = max(change, float(np.max(np.abs(mean - factor["mean"]))))
            factor["mean"], factor["sd"] = mean, sd
        group_variance = sum(f["sd"][f["ids"]] ** 2 for f in factors)
        squared_error = (y - eta) ** 2 + group_variance + other_variance
        noise_variance = float(np.sum(weights * squared_error) / np.sum(weights))
        if change < _TOLERANCE:
            break

    for factor in factors:
        layer = factor["layer"]
        layer.offset_loc.assign(factor["mean"][:, None].astype("float32"))
        raw = inverse_softplus(factor["sd"])
        layer.offset_untransformed_scale.assign(raw[:, None].astype("float32"))
        if layer.scale_prior is None:
            layer.group_scale_untransformed.assign([inverse_softplus(factor["scale"])])
    model.likelihood.noise_scale_untransformed.assign(inverse_softplus(noise_variance**0.5))
    return sweeps
