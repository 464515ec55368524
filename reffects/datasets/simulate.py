"""Simulators of grouped data with a known truth, shared by tests, examples and benchmarks."""

import numpy as np
import pandas as pd


def _skewed_group_of_rows(rng, num_rows, num_groups, skew):
    """Group index per row; group probabilities are LogNormal(0, skew), so sizes are unequal."""
    weights = rng.lognormal(0.0, skew, num_groups)
    return rng.choice(num_groups, size=num_rows, p=weights / weights.sum())


def simulate_mixed(
    num_rows: int = 2000,
    num_groups=(50,),
    coef=(1.0, -0.5, 0.25, 0.0),
    group_sd=(1.0,),
    noise_sd: float = 1.0,
    intercept: float = 0.0,
    skew: float = 1.0,
    string_labels: bool = True,
    seed: int | None = None,
):
    """Linear mixed-model data: y = intercept + sum_k b_k[g_k] + x . coef + noise.

    Features are standard Normal; group sizes are skewed (see `skew`); labels are strings
    such as "g1_017" when `string_labels`, otherwise integers.

    Returns:
        `(X, y, truth)`: a DataFrame with columns `group_0`, ... then `x0`, ...; y as a
        Series; and a dict with the true `intercept`, `coef`, `group_sd`, `noise_sd` and the
        drawn `offsets` (one Series per factor, indexed by label).

    Example:
        >>> X, y, truth = simulate_mixed(100, num_groups=(5,), seed=0)
        >>> list(X.columns)
        ['group_0', 'x0', 'x1', 'x2', 'x3']
    """
    rng = np.random.default_rng(seed)
    coef = np.asarray(coef, dtype=float)
    features = rng.normal(size=(num_rows, len(coef)))
    y = intercept + features @ coef + rng.normal(0.0, noise_sd, num_rows)
    columns, offsets = {}, {}
    for k, (count, sd) in enumerate(zip(num_groups, group_sd)):
        index = _skewed_group_of_rows(rng, num_rows, count, skew)
        effect = rng.normal(0.0, sd, count)
        y += effect[index]
        labels = (
            np.array([f"g{k}_{i:05d}" for i in range(count)]) if string_labels else np.arange(count)
        )
        columns[f"group_{k}"] = labels[index]
        offsets[f"group_{k}"] = pd.Series(effect, index=labels)
    for j in range(len(coef)):
        columns[f"x{j}"] = features[:, j]
    truth = {
        "intercept": intercept,
        "coef": coef,
        "group_sd": tuple(group_sd),
        "noise_sd": noise_sd,
        "offsets": offsets,
    }
    return pd.DataFrame(columns), pd.Series(y, name="y"), truth


def make_housing(num_rows: int = 30000, num_zipcodes: int = 300, seed: int = 0):
    """Housing-style data shaped like the founding Zillow analysis.

    Log sale price from three standardised predictors (`sqft`, `age`, `distance`), a
    nonlinear signal (a saturating size effect, an age-distance interaction) and zip-code
    offsets of very unequal group sizes (a few large zip codes, many small ones).

        log_price = 12 + 0.4 sqft - 0.15 age - 0.2 distance
                    + 0.3 tanh(2 sqft) - 0.25 age * distance + 0.15 sin(3 distance)
                    + b[zip] + Normal(0, 0.25),     b ~ Normal(0, 0.3)

    Example:
        >>> X, y = make_housing(1000, 20)
        >>> list(X.columns), X["zipcode"].nunique() <= 20
        (['zipcode', 'sqft', 'age', 'distance'], True)
    """
    rng = np.random.default_rng(seed)
    zip_index = _skewed_group_of_rows(rng, num_rows, num_zipcodes, skew=1.5)
    offsets = rng.normal(0.0, 0.3, num_zipcodes)
    sqft, age, distance = rng.normal(size=(3, num_rows))
    log_price = (
        12.0
        + 0.4 * sqft
        - 0.15 * age
        - 0.2 * distance
        + 0.3 * np.tanh(2.0 * sqft)
        - 0.25 * age * distance
        + 0.15 * np.sin(3.0 * distance)
        + offsets[zip_index]
        + rng.normal(0.0, 0.25, num_rows)
    )
    zipcodes = np.array([f"{98000 + i:05d}" for i in range(num_zipcodes)])
    X = pd.DataFrame(
        {"zipcode": zipcodes[zip_index], "sqft": sqft, "age": age, "distance": distance}
    )
    return X, pd.Series(log_price, name="log_price")
