"""Offsets (`offset_col`, lme4's `offset()`): a known part of the linear predictor.

The fits are lme4's deterministic optima (REML; glmer's Laplace fit), so they are compared
with `mixedlm` at 1e-3 relative, as in test_finish.py; the estimators' weak Normal(0, 10)
prior on the standardised fixed effects moves them by about 1e-4.
"""

import pickle

import mixedlm
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from reffects import RandomEffectsClassifier, RandomEffectsRegressor, from_formula, inspection
from reffects.formula import design_frame

RELATIVE = 1e-3


def _exposures(seed=3, n=2000, groups=60):
    """Poisson counts over exposures t from 0.5 to 20: log E[y] = log t - 1 + 0.4 x + b_g."""
    rng = np.random.default_rng(seed)
    g, x, t = rng.integers(0, groups, n), rng.normal(size=n), rng.uniform(0.5, 20.0, n)
    b = rng.normal(size=groups) * 0.5
    y = rng.poisson(t * np.exp(-1.0 + 0.4 * x + b[g]))
    labels = [f"g{v:02d}" for v in g]  # sorted as lme4 orders its levels
    return pd.DataFrame({"y": y, "x": x, "g": labels, "t": t, "log_t": np.log(t)})


def _oracle_values(fit):
    return (
        np.array(list(fit.fixef().values())),
        float(fit.VarCorr().groups["g"].stddev["(Intercept)"]),
        np.sqrt(np.diag(np.asarray(fit.vcov()))),
    )


def test_poisson_exposure_matches_glmer():
    data = _exposures()
    X = data[["g", "x", "log_t"]]
    est = RandomEffectsRegressor(group_cols=["g"], family="poisson", offset_col="log_t")
    est.fit(X, data["y"])
    fit = mixedlm.glmer(
        "y ~ x + (1 | g)", data, family=mixedlm.families.Poisson(), offset=data["log_t"].to_numpy()
    )
    fixed, sd, se = _oracle_values(fit)
    # glmer: (Intercept) -1.058, x 0.418, sd(g) 0.517
    assert np.r_[est.intercept_, est.coef_] == pytest.approx(fixed, rel=RELATIVE)
    assert est.variance_components_["g"] == pytest.approx(sd, rel=RELATIVE)
    assert inspection.fixed_effects(est)["sd"].to_numpy() == pytest.approx(se, rel=RELATIVE)
    assert list(est.feature_names_) == ["x"]  # the offset is not a feature
    assert est.predict(X) == pytest.approx(fit.fitted(), rel=RELATIVE)
    # twice the exposure, twice the rate: the offset enters with coefficient 1
    doubled = X.assign(log_t=X["log_t"] + np.log(2.0))
    np.testing.assert_allclose(est.predict(doubled), 2.0 * est.predict(X), rtol=1e-5)
    lower, upper = est.predict_interval(doubled.iloc[:200])
    assert np.all(lower <= 2.0 * est.predict(X.iloc[:200])) and np.all(upper >= lower)


def test_gaussian_offset_matches_lmer():
    data = _exposures()
    rng = np.random.default_rng(4)
    b = rng.normal(size=60) * 0.5
    codes = data["g"].str[1:].astype(int).to_numpy()
    data["known"] = 2.0 * data["log_t"]
    data["z"] = data["known"] + 0.5 * data["x"] + b[codes] + rng.normal(size=len(data))
    est = RandomEffectsRegressor(group_cols=["g"], offset_col="known")
    est.fit(data[["g", "x", "known"]], data["z"])
    fit = mixedlm.lmer("z ~ x + (1 | g)", data, REML=True, offset=data["known"].to_numpy())
    fixed, sd, se = _oracle_values(fit)
    assert np.r_[est.intercept_, est.coef_] == pytest.approx(fixed, rel=RELATIVE, abs=1e-4)
    assert est.variance_components_["g"] == pytest.approx(sd, rel=RELATIVE)
    assert est.noise_scale_ == pytest.approx(float(fit.sigma), rel=RELATIVE)
    assert inspection.fixed_effects(est)["sd"].to_numpy() == pytest.approx(se, rel=RELATIVE)
    assert est.predict(data[["g", "x", "known"]]) == pytest.approx(fit.fitted(), abs=1e-3)
    # the offset moves the prediction one for one, and not its sd
    mean, sd_new = est.predict(data[["g", "x", "known"]].iloc[:5], return_std=True)
    shifted = data[["g", "x", "known"]].iloc[:5].assign(known=lambda f: f["known"] + 3.0)
    mean_3, sd_3 = est.predict(shifted, return_std=True)
    np.testing.assert_allclose(mean_3, mean + 3.0, rtol=1e-6)
    np.testing.assert_allclose(sd_3, sd_new, rtol=1e-6)


def test_bernoulli_offset_matches_glmer():
    rng = np.random.default_rng(5)
    n, groups = 3000, 50
    g, x, known = rng.integers(0, groups, n), rng.normal(size=n), rng.normal(size=n)
    b = rng.normal(size=groups) * 0.8
    y = rng.binomial(1, 1.0 / (1.0 + np.exp(-(known + 0.2 + 0.7 * x + b[g]))))
    data = pd.DataFrame({"y": y, "x": x, "known": known, "g": [f"g{v:02d}" for v in g]})
    est = RandomEffectsClassifier(group_cols=["g"], offset_col="known")
    est.fit(data[["g", "x", "known"]], data["y"])
    fit = mixedlm.glmer(
        "y ~ x + (1 | g)", data, family=mixedlm.families.Binomial(), offset=known
    )  # fmt: skip
    fixed, sd, se = _oracle_values(fit)
    assert np.r_[est.intercept_, est.coef_.ravel()] == pytest.approx(fixed, rel=RELATIVE)
    assert est.variance_components_["g"] == pytest.approx(sd, rel=RELATIVE)
    proba = est.predict_proba(data[["g", "x", "known"]])[:, 1]
    assert proba == pytest.approx(fit.fitted(), abs=1e-3)


def test_offset_term_in_a_formula():
    data = _exposures()
    est = from_formula("y ~ x + offset(np.log(t)) + (1 | g)", data, family="poisson")
    assert est.get_params()["offset_col"] == "offset(np.log(t))"
    direct = RandomEffectsRegressor(group_cols=["g"], family="poisson", offset_col="log_t").fit(
        data[["g", "x", "log_t"]], data["y"]
    )
    np.testing.assert_allclose(est.coef_, direct.coef_, rtol=1e-6)
    new = data.iloc[:10].assign(t=lambda f: 3.0 * f["t"])
    X_new = design_frame(est, new)
    assert list(X_new.columns) == ["g", "x", "offset(np.log(t))"]
    np.testing.assert_allclose(
        est.predict(X_new), 3.0 * est.predict(design_frame(est, data.iloc[:10])), rtol=1e-5
    )
    with pytest.raises(ValueError, match="come from the formula"):
        from_formula("y ~ x + (1 | g)", data, family="poisson", offset_col="log_t")


def test_subnetwork_with_an_offset_keeps_it_exact():
    # SGD sees the offset as an input of the network; the exact finish holds it with f
    data = _exposures(n=3000)
    data["y"] = np.random.default_rng(6).poisson(data["t"] * np.exp(np.sin(2 * data["x"]) - 1))
    X = data[["g", "x", "log_t"]]
    est = RandomEffectsRegressor(
        group_cols=["g"], family="poisson", offset_col="log_t", hidden_units=(16,),
        random_state=0,
    ).fit(X, data["y"])  # fmt: skip
    doubled = X.assign(log_t=X["log_t"] + np.log(2.0))
    np.testing.assert_allclose(est.predict(doubled), 2.0 * est.predict(X), rtol=1e-4)
    # the subnetwork finds the sine the linear model cannot
    linear = RandomEffectsRegressor(group_cols=["g"], family="poisson", offset_col="log_t")
    linear.fit(X, data["y"])
    rate = np.exp(np.sin(2 * data["x"]) - 1)
    assert est.subnetwork_weight_ > 0.5
    deep_error = np.mean((est.predict(X) / data["t"] - rate) ** 2)
    linear_error = np.mean((linear.predict(X) / data["t"] - rate) ** 2)
    assert deep_error < 0.5 * linear_error
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(again.predict(X), est.predict(X))
    assert clone(est).get_params()["offset_col"] == "log_t"


@pytest.mark.parametrize(
    "change, params, message",
    [
        (lambda X: X.assign(log_t=np.where(np.arange(len(X)) == 7, np.nan, X["log_t"])), {},
         "offset column 'log_t' has a missing or infinite value at row 7"),
        (lambda X: X.assign(log_t="a"), {}, "offset column 'log_t' must be numeric"),
        (lambda X: X, {"offset_col": "g"}, "offset column 'g' is a group column"),
        (lambda X: X, {"offset_col": "nope"}, "offset column 'nope' is not in X"),
        (lambda X: X, {"random_slopes": {"g": ["log_t"]}},
         "random slope column 'log_t' is the offset column"),
        (lambda X: X, {"subnetwork_cols": ["log_t"], "hidden_units": (4,)},
         "subnetwork column 'log_t' is the offset column"),
    ],
)  # fmt: skip
def test_bad_offsets_are_clear_errors(change, params, message):
    data = _exposures(n=200)
    X = change(data[["g", "x", "log_t"]])
    params = {"offset_col": "log_t", **params}
    with pytest.raises(ValueError, match=message):
        RandomEffectsRegressor(group_cols=["g"], family="poisson", epochs=1, **params).fit(
            X, data["y"]
        )


def test_an_offset_with_three_classes_is_an_error():
    data = _exposures(n=300)
    y = np.asarray(data["y"]) % 3
    with pytest.raises(ValueError, match="`offset_col` is not supported with more than two"):
        RandomEffectsClassifier(group_cols=["g"], offset_col="log_t").fit(
            data[["g", "x", "log_t"]], y
        )


def test_a_large_gaussian_offset_keeps_float32_precision():
    # the model sees the offset less its mean: 1e7 + a known part, unit noise
    data = _exposures(n=1500)
    rng = np.random.default_rng(7)
    codes = data["g"].str[1:].astype(int).to_numpy()
    data["known"] = 1e7 + 3.0 * data["log_t"]
    b = rng.normal(size=60) * 0.5
    data["z"] = data["known"] + 0.5 * data["x"] + b[codes] + rng.normal(size=len(data))
    est = RandomEffectsRegressor(group_cols=["g"], offset_col="known")
    est.fit(data[["g", "x", "known"]], data["z"])
    data["less_known"] = data["z"] - data["known"]  # exact in float64
    fit = mixedlm.lmer("less_known ~ x + (1 | g)", data, REML=True)
    fixed, sd, _ = _oracle_values(fit)
    assert np.r_[est.intercept_, est.coef_] == pytest.approx(fixed, rel=RELATIVE, abs=1e-4)
    assert est.variance_components_["g"] == pytest.approx(sd, rel=RELATIVE)
    residual = data["z"] - est.predict(data[["g", "x", "known"]])
    assert float(np.std(residual)) == pytest.approx(
        float(np.std(data["z"] - fit.fitted() - data["known"])), rel=1e-3
    )


def test_missing_inputs_with_an_offset_and_a_subnetwork():
    # the missing values' draws run the subnetwork alone; the offset still counts once
    data = _exposures(n=1500)
    X = data[["g", "x", "log_t"]].copy()
    X.loc[np.random.default_rng(8).random(len(X)) < 0.1, "x"] = np.nan
    est = RandomEffectsRegressor(
        group_cols=["g"], family="poisson", offset_col="log_t", hidden_units=(4,),
        epochs=3, random_state=0,
    ).fit(X, data["y"])  # fmt: skip
    lower, upper = est.predict_interval(X.iloc[:300], num_samples=200)
    mean = est.predict(X.iloc[:300])
    assert np.all(lower <= upper) and np.all(np.isfinite(upper))
    doubled = X.iloc[:300].assign(log_t=lambda f: f["log_t"] + np.log(2.0))
    np.testing.assert_allclose(est.predict(doubled), 2.0 * mean, rtol=1e-5)
    covered = (data["y"].iloc[:300] >= lower) & (data["y"].iloc[:300] <= upper)
    assert covered.mean() > 0.8  # 90% intervals of a model close to the truth
