"""The one function that builds a mixed-model Keras network from the layers.

    eta = alpha + sum_k b_k[g_k] + x . beta + f(x)

The estimators reach Keras only through `build_mixed_model`, so the layers stay usable on
their own.
"""

import keras
import numpy as np
from keras import ops

from reffects.layers import FixedEffects, GlobalIntercept, RandomIntercept
from reffects.posteriors import positive
from reffects.training import ELBOModel


def build_mixed_model(
    num_features: int,
    num_groups: list,
    hidden_units: tuple = (),
    likelihood="gaussian",
    intercept_init: float = 0.0,
    prior_scale: float = 10.0,
    scale_prior=None,
    initial_group_scale: float = 1.0,
    num_examples: int | None = None,
    seed: int | None = None,
) -> ELBOModel:
    """An `ELBOModel` with a global intercept, one `RandomIntercept` per grouping factor,
    linear fixed effects and an optional dense subnetwork.

    Inputs, in order: `features` (float, `(batch, num_features)`, only when
    `num_features > 0`), then one integer input `group_k` per grouping factor k, with
    `num_groups[k]` levels, feeding the layer `random_intercept_k`. The subnetwork's last
    layer has no bias, so the global intercept is the only intercept.

    Example:
        >>> model = build_mixed_model(2, [10], hidden_units=(8,))
        >>> [t.name for t in model.network.inputs]
        ['features', 'group_0']
    """
    rng = np.random.default_rng(seed)

    def next_seed():
        return None if seed is None else int(rng.integers(2**31 - 1))

    group_inputs = [
        keras.Input(shape=(), dtype="int64", name=f"group_{k}") for k in range(len(num_groups))
    ]
    inputs = list(group_inputs)
    if num_features:
        features = keras.Input(shape=(num_features,), name="features")
        inputs.insert(0, features)
    terms = [
        GlobalIntercept(
            loc_initializer=keras.initializers.Constant(intercept_init),
            prior_scale=prior_scale,
            seed=next_seed(),
            name="global_intercept",
        )(inputs[0])
    ]
    for k, count in enumerate(num_groups):
        layer = RandomIntercept(
            count,
            scale_prior=scale_prior,
            initial_group_scale=initial_group_scale,
            seed=next_seed(),
            name=f"random_intercept_{k}",
        )
        terms.append(layer(group_inputs[k]))
    if num_features:
        terms.append(
            FixedEffects(prior_scale=prior_scale, seed=next_seed(), name="fixed_effects")(features)
        )
        hidden = features
        for units in hidden_units:
            hidden = keras.layers.Dense(
                units,
                activation="relu",
                kernel_initializer=keras.initializers.HeNormal(seed=next_seed()),
            )(hidden)
        if hidden_units:
            terms.append(
                keras.layers.Dense(
                    1,
                    use_bias=False,
                    kernel_initializer=keras.initializers.GlorotUniform(seed=next_seed()),
                    name="subnetwork_output",
                )(hidden)
            )
    eta = terms[0] if len(terms) == 1 else keras.layers.Add(name="predictor")(terms)
    network = keras.Model(inputs, eta, name="mixed_model")
    return ELBOModel(network, likelihood=likelihood, num_examples=num_examples)


def centre_random_intercepts(model: ELBOModel) -> None:
    """Moves a `build_mixed_model` model to its ELBO optimum along the intercept ridges.

    Adding c to alpha and subtracting it from every offset of factor k leaves eta, hence the
    likelihood, unchanged; only KL(q(alpha) || p) and the offsets' KL move, and both are
    quadratic in c:

        KL(c_1..c_K) = (m_alpha + sum_k c_k - prior_loc)^2 / (2 prior_scale^2)
                       + sum_k lambda_k / 2 * sum_{g seen} (m_kg - c_k)^2 + const,

    with lambda_k = E_q[1 / sigma_k^2]. Stochastic gradients barely move along these
    directions (their only pull is the KL, divided by N), so this solves the K x K linear
    system for the optimal shifts and applies them, exactly.

    Example:
        >>> model = build_mixed_model(0, [3])
        >>> model.network.get_layer("random_intercept_0").adapt(np.array([0, 1, 2]))
        >>> _ = model.network.get_layer("random_intercept_0").offset_loc.assign(np.ones((3, 1)))
        >>> centre_random_intercepts(model)
        >>> round(float(model.network.get_layer("global_intercept").intercept_loc[0]), 3)
        0.997
    """
    intercept = model.network.get_layer("global_intercept")
    factors = [layer for layer in model.network.layers if isinstance(layer, RandomIntercept)]
    if not factors:
        return
    alpha = ops.convert_to_numpy(intercept.intercept_loc).astype("float64")
    prior_precision = 1.0 / intercept.prior_scale**2
    seen = [ops.convert_to_numpy(layer.group_counts) > 0 for layer in factors]
    offsets = [ops.convert_to_numpy(layer.offset_loc).astype("float64") for layer in factors]
    precision = [_expected_inverse_variance(layer) for layer in factors]
    shifts = np.zeros((len(factors), intercept.units))
    for unit in range(intercept.units):
        system = np.full((len(factors), len(factors)), prior_precision)
        system[np.diag_indices(len(factors))] += [
            lam[unit] * mask.sum() for lam, mask in zip(precision, seen)
        ]
        rhs = [
            lam[unit] * b[mask, unit].sum() - (alpha[unit] - intercept.prior_loc) * prior_precision
            for lam, b, mask in zip(precision, offsets, seen)
        ]
        shifts[:, unit] = np.linalg.solve(system, rhs)
    intercept.intercept_loc.assign((alpha + shifts.sum(axis=0)).astype("float32"))
    for layer, b, mask, shift in zip(factors, offsets, seen, shifts):
        layer.offset_loc.assign(np.where(mask[:, None], b - shift, b).astype("float32"))


def _expected_inverse_variance(layer: RandomIntercept) -> np.ndarray:
    """E_q[1 / sigma^2] of a `RandomIntercept`, per unit."""
    if layer.scale_prior is None:
        return 1.0 / np.square(ops.convert_to_numpy(layer.group_scale()).astype("float64"))
    mu = ops.convert_to_numpy(layer.log_group_scale_loc).astype("float64")
    s = ops.convert_to_numpy(positive(layer.log_group_scale_untransformed_scale)).astype("float64")
    return np.exp(-2.0 * mu + 2.0 * np.square(s))
