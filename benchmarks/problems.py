"""The problem generator and the two Keras models every speed benchmark compares."""

import time

import keras
import numpy as np
import pandas as pd

from reffects import ELBOModel, FixedEffects, GlobalIntercept, RandomIntercept


def grouped_regression(num_rows, num_groups, num_features=10, seed=0):
    """Features, integer group ids (skewed sizes) and y from a linear mixed model."""
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 1.0, num_groups)
    groups = rng.choice(num_groups, size=num_rows, p=weights / weights.sum())
    features = rng.normal(size=(num_rows, num_features)).astype("float32")
    offsets = rng.normal(0.0, 0.7, num_groups)
    coef = rng.normal(0.0, 0.5, num_features)
    y = 1.0 + offsets[groups] + features @ coef + rng.normal(0.0, 1.0, num_rows)
    return features, groups.astype("int64"), y.astype("float32")


def grouped_regression_chunks(num_rows, num_groups, num_features=10, chunk_rows=250_000, seed=0):
    """`grouped_regression`'s model, `chunk_rows` rows at a time, for data larger than memory.

    One draw of the group sizes, offsets and coefficients serves every chunk, so the chunks
    together are one data set of `num_rows` rows. Yields (features, group ids, y).
    """
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 1.0, num_groups)
    offsets = rng.normal(0.0, 0.7, num_groups)
    coef = rng.normal(0.0, 0.5, num_features)
    for start in range(0, num_rows, chunk_rows):
        size = min(chunk_rows, num_rows - start)
        groups = rng.choice(num_groups, size=size, p=weights / weights.sum())
        features = rng.normal(size=(size, num_features)).astype("float32")
        y = 1.0 + offsets[groups] + features @ coef + rng.normal(0.0, 1.0, size)
        yield features, groups.astype("int64"), y.astype("float32")


def _inputs(num_features):
    return (
        keras.Input(shape=(num_features,), name="x"),
        keras.Input(shape=(), dtype="int64", name="g"),
    )


def plain_keras_model(num_features, num_groups):
    """What a Keras user writes today: an Embedding for the groups plus a Dense layer."""
    x, g = _inputs(num_features)
    offset = keras.layers.Flatten()(keras.layers.Embedding(num_groups, 1)(g))
    model = keras.Model([x, g], keras.layers.Add()([keras.layers.Dense(1)(x), offset]))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def reffects_model(num_features, num_groups, num_examples=None, optimizer=None):
    """The same structure with variational layers, trained on the ELBO (N stated for streams).

    `optimizer` defaults to Keras's Adam(0.01), as the plain Keras model uses.
    """
    x, g = _inputs(num_features)
    eta = keras.layers.Add()(
        [GlobalIntercept()(x), RandomIntercept(num_groups)(g), FixedEffects()(x)]
    )
    model = ELBOModel(keras.Model([x, g], eta), likelihood="gaussian", num_examples=num_examples)
    model.compile(optimizer=optimizer or keras.optimizers.Adam(0.01))
    return model


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch."""

    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def alternating_epoch_seconds(runs, batch_size, rounds):
    """Epoch times of several models fitted one epoch each in turn, `rounds` times over.

    `runs` maps a name to `(model, inputs, y)`. Each model first fits one untimed epoch
    (tracing). Interleaving single epochs makes a burst of load on a shared machine hit every
    model alike, so ratios of the medians are steadier than those of separate long runs.
    Returns a dict: name -> list of `rounds` epoch times in seconds.

    Example:
        >>> features, groups, y = grouped_regression(2048, 10)
        >>> runs = {"plain": (plain_keras_model(10, 10), [features, groups], y)}
        >>> len(alternating_epoch_seconds(runs, batch_size=1024, rounds=2)["plain"])
        2
    """
    for model, inputs, targets in runs.values():
        model.fit(inputs, targets, batch_size=batch_size, epochs=1, verbose=0)
    seconds = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (model, inputs, targets) in runs.items():
            timer = EpochTimer()
            model.fit(
                inputs, targets, batch_size=batch_size, epochs=1, callbacks=[timer], verbose=0
            )
            seconds[name] += timer.seconds
    return seconds


def lmmnn_simulation(num_rows, num_groups, group_variance, binary=False, seed=0):
    """The simulation of Simchoni & Rosset (2021, LMMNN): one high-cardinality factor.

        x ~ Uniform(-1, 1)^10,  m = 1 + sum(x),  f(x) = m cos(m) + 2 x0 x1
        group sizes ~ Multinomial(num_rows, p),  p proportional to Poisson(3) + 1 per level
        b ~ Normal(0, group_variance),  y = f(x) + b[g] + Normal(0, 1)
        binary: y ~ Bernoulli(sigmoid(f(x) + b[g])), no noise term

    Returns features `(n, 10)` float32, group ids `(n,)` int64, y `(n,)` float32, f(x) and the
    drawn offsets b.
    """
    rng = np.random.default_rng(seed)
    features = rng.uniform(-1.0, 1.0, (num_rows, 10))
    m = 1.0 + features.sum(axis=1)
    f = m * np.cos(m) + 2.0 * features[:, 0] * features[:, 1]
    weights = rng.poisson(3.0, num_groups) + 1.0
    sizes = rng.multinomial(num_rows, weights / weights.sum())
    groups = rng.permutation(np.repeat(np.arange(num_groups), sizes))
    offsets = rng.normal(0.0, np.sqrt(group_variance), num_groups)
    eta = f + offsets[groups]
    if binary:
        y = (rng.random(num_rows) < 1.0 / (1.0 + np.exp(-eta))).astype("float32")
    else:
        y = (eta + rng.normal(0.0, 1.0, num_rows)).astype("float32")
    return features.astype("float32"), groups.astype("int64"), y, f, offsets


def crossed_regression(num_rows, num_levels, num_features=2, seed=0):
    """`grouped_regression`'s model with several crossed grouping factors.

    Each factor k has `num_levels[k]` (at most `num_rows`) levels, every one observed: one
    row each, the other rows spread by skewed (lognormal) weights, independently of the other
    factors. Its offsets ~ Normal(0, 0.7 / (k + 1)); y adds every factor's offset. Returns
    features `(n, num_features)` float32, a list of `(n,)` int64 id arrays (one per factor)
    and y `(n,)` float32.
    """
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(num_rows, num_features)).astype("float32")
    coef = rng.normal(0.0, 0.5, num_features)
    y = 1.0 + features @ coef + rng.normal(0.0, 1.0, num_rows)
    ids = []
    for k, levels in enumerate(num_levels):
        weights = rng.lognormal(0.0, 1.0, levels)
        extra = rng.choice(levels, size=num_rows - levels, p=weights / weights.sum())
        groups = rng.permutation(np.concatenate([np.arange(levels), extra]))
        y += rng.normal(0.0, 0.7 / (k + 1), levels)[groups]
        ids.append(groups.astype("int64"))
    return features, ids, y.astype("float32")


def dummies_and_continuous(num_train, num_test=None, nonlinear=False, seed=0):
    """A table as data scientists have them: many sparse dummies, a few continuous columns.

        d_j ~ Bernoulli(p_j), p_j ~ Uniform(0.02, 0.2), j < 40;  c_j ~ Normal(0, 1), j < 3
        300 groups of lognormal size, b ~ Normal(0, 0.7^2), beta ~ Normal(0, 0.5^2)
        y = 1 + d . beta_d + c . beta_c [+ sin(2 c0) + 0.5 c1 c2] + b[g] + Normal(0, 1)

    Returns X (a DataFrame: c0..c2, d0..d39 and the group column g) and y for `num_train`
    training rows, then the same for `num_test` test rows (default: as many).
    """
    num_test = num_train if num_test is None else num_test
    rng = np.random.default_rng(seed)
    num_rows = num_train + num_test
    dummies = (rng.random((num_rows, 40)) < rng.uniform(0.02, 0.2, 40)).astype("float64")
    continuous = rng.normal(size=(num_rows, 3))
    weights = rng.lognormal(0.0, 1.0, 300)
    groups = rng.choice(300, num_rows, p=weights / weights.sum())
    y = (
        1.0
        + dummies @ rng.normal(0.0, 0.5, 40)
        + continuous @ rng.normal(0.0, 0.5, 3)
        + rng.normal(0.0, 0.7, 300)[groups]
        + rng.normal(0.0, 1.0, num_rows)
    )
    if nonlinear:
        y += np.sin(2.0 * continuous[:, 0]) + 0.5 * continuous[:, 1] * continuous[:, 2]
    names = [f"c{j}" for j in range(3)] + [f"d{j}" for j in range(40)]
    X = pd.DataFrame(np.column_stack([continuous, dummies]), columns=names).assign(g=groups)
    return X[:num_train], y[:num_train], X[num_train:].reset_index(drop=True), y[num_train:]
