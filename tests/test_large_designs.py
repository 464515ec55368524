"""Designs too large for the dense finish: the sparse one, or SGD's variational posterior
with a warning.

The finish factors every grouping factor's coefficients but the largest's densely, at most
`finish.MAX_DENSE_LEVELS` (4,000); past it, random intercepts go to the sparse finish
(tests/test_sparse_finish.py; GLMMs in tests/test_finish.py), and random slopes or K > 2
classes keep SGD's answer: the estimators say so and still predict with intervals. The
limit is lowered here so that a small crossed design crosses it.
"""

import warnings

import numpy as np
import pandas as pd
import pytest

from reffects import RandomEffectsClassifier, RandomEffectsRegressor, finish, inspection
from reffects.joint_posterior import GroupsGivenFixedPosterior, IndependentGroupsPosterior


def _crossed(num_rows, seed=0):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 60, num_rows), rng.integers(0, 40, num_rows)
    x = rng.normal(size=num_rows)
    eta = 1.0 + 0.5 * x + rng.normal(0, 0.8, 60)[a] + rng.normal(0, 0.5, 40)[b]
    return pd.DataFrame({"a": a, "b": b, "x": x}), eta


def test_a_design_past_the_dense_limit_is_fitted_by_sgd_with_a_warning(monkeypatch):
    monkeypatch.setattr(finish, "MAX_DENSE_LEVELS", 30)  # b's 41 levels x 2 terms + 2 fixed
    X, eta = _crossed(3000)
    y = eta + np.random.default_rng(1).normal(0, 1.0, 3000)
    train, test = slice(0, 2000), slice(2000, None)
    # a slope on b (its variance 0 in the data): past the limit, not a sparse finish's model
    est = RandomEffectsRegressor(group_cols=["a", "b"], random_slopes={"b": ["x"]}, random_state=0)
    match = r"at most 30, beyond .* one term per factor .*; this model has 63\. It is fitted by SGD"
    with pytest.warns(UserWarning, match=match):
        est.fit(X[train], y[train])
    assert isinstance(est.joint_posterior_, IndependentGroupsPosterior)
    assert est.history_  # SGD ran at the default schedule
    assert "variational inference" in str(inspection.summary(est))
    # 33 and 50 rows per level: SGD's estimates are close to the truth (0.8, 0.5, 1.0, 0.5),
    # within the sampling error of 60 and 40 levels (sd of a sigma estimate ~ 0.1 sigma)
    # plus the variational posterior's small shrinkage.
    assert est.variance_components_["a"] == pytest.approx(0.8, rel=0.3)
    assert est.variance_components_["b"] == pytest.approx(0.5, rel=0.4)
    assert est.noise_scale_ == pytest.approx(1.0, rel=0.1)
    assert est.coef_[0] == pytest.approx(0.5, abs=0.1)
    mean, std = est.predict(X[test], return_std=True)
    assert np.all(np.isfinite(mean)) and np.all(std > est.noise_scale_)
    # 90% intervals of 1,000 held-out rows: binomial sd of the coverage 0.0095, so 0.87-0.93
    # is three sds; the independent-groups posterior leaves out correlations that are small
    # at 33-50 rows per level.
    lower, upper = est.predict_interval(X[test], level=0.9)
    covered = np.mean((y[test] >= lower) & (y[test] <= upper))
    assert 0.87 <= covered <= 0.93


def test_a_classifier_past_the_dense_limit_gets_the_sparse_laplace_finish(monkeypatch):
    X, eta = _crossed(1500, seed=2)
    labels = np.random.default_rng(3).random(1500) < 1.0 / (1.0 + np.exp(-eta))
    dense = RandomEffectsClassifier(group_cols=["a", "b"], random_state=0).fit(X, labels)
    monkeypatch.setattr(finish, "MAX_DENSE_LEVELS", 30)  # b's 41 levels + 2 fixed effects
    clf = RandomEffectsClassifier(group_cols=["a", "b"], random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "fitted by SGD alone"
        clf.fit(X, labels)
    assert isinstance(clf.joint_posterior_, GroupsGivenFixedPosterior)
    # the same Laplace fit, M factored sparse: glmer's optimum both times
    assert np.r_[clf.intercept_, clf.coef_] == pytest.approx(
        np.r_[dense.intercept_, dense.coef_], rel=1e-3
    )
    for g in ("a", "b"):
        assert clf.variance_components_[g] == pytest.approx(dense.variance_components_[g], rel=1e-3)
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_allclose(proba, dense.predict_proba(X), atol=1e-3)


def test_independent_groups_posterior_moments_match_its_draws():
    # Monte Carlo with 40,000 draws: the variance's relative sd is sqrt(2 / 40,000) = 0.7%,
    # so 3% is four sds; rows of one group share its draw (their covariance is its variance).
    rng = np.random.default_rng(0)
    covariance = np.array([[[0.5, 0.1], [0.1, 0.2]], [[0.3, -0.05], [-0.05, 0.4]]])
    posterior = IndependentGroupsPosterior(
        np.array([1.0, -0.5]), np.array([0.1, 0.2]), [np.array([[0.3], [-0.3], [0.0]]),
        np.array([[0.2, 0.1], [-0.1, 0.4]])], [np.full((3, 1, 1), 0.25), covariance],
    )  # fmt: skip
    design = np.column_stack([np.ones(4), [0.5, -1.0, 2.0, 0.5]])
    codes = [np.array([0, 1, 2, 0]), np.array([0, 1, 1, 0])]
    terms = [None, np.column_stack([np.ones(4), [1.0, -2.0, 0.5, 1.0]])]
    draws = posterior.sample_predictor(design, codes, 40_000, rng, terms)
    np.testing.assert_allclose(
        draws.mean(axis=0), posterior.predictor_mean(design, codes, terms), atol=0.02
    )
    np.testing.assert_allclose(
        draws.var(axis=0), posterior.predictor_variance(design, codes, terms), rtol=0.03
    )
    assert np.corrcoef(draws[:, 0], draws[:, 3])[0, 1] > 0.99  # rows 0 and 3: same groups, x
