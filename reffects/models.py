"""The one function that builds a mixed-model Keras network from the layers.

    eta = alpha + sum_k b_k[g_k] + x . beta + f(x)

The estimators reach Keras only through `build_mixed_model`, so the layers stay usable on
their own.
"""

import keras
import numpy as np

from reffects.layers import FixedEffects, GlobalIntercept, RandomIntercept
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
