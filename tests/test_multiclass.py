"""More than two classes: the Categorical likelihood, K - 1 outputs in `build_mixed_model`,
and `RandomEffectsClassifier`'s multinomial model (SGD only)."""

import importlib.util
import pickle
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow_probability as tfp
from scipy.special import softmax
from sklearn.utils.estimator_checks import check_classifiers_train

from reffects import Categorical, ELBOModel, RandomEffectsClassifier, inspection
from reffects.likelihoods import get_likelihood
from reffects.models import build_mixed_model, mixed_model_layers
from reffects.posteriors import normal_kl
from reffects.training_recipe import default_schedule

tfd = tfp.distributions

RNG = np.random.default_rng(0)
ETA = RNG.normal(0.0, 1.5, size=(50, 3)).astype("float32")
LABELS = RNG.integers(0, 4, size=50)
Y = np.eye(4, dtype="float32")[LABELS]
WEIGHTS = RNG.uniform(0.0, 3.0, size=50).astype("float32")


# ----------------------------------------------------------------------- the likelihood
def test_categorical_mean_is_the_softmax_with_class_0_as_reference():
    likelihood = Categorical(num_classes=4)
    mean = likelihood(ETA).numpy()
    expected = softmax(np.column_stack([np.zeros(50), ETA]), axis=1)
    np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-7)
    assert mean.shape == (50, 4) == likelihood.compute_output_shape((50, 3))
    np.testing.assert_allclose(mean.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(likelihood.link(mean), ETA, rtol=1e-4, atol=1e-4)
    assert likelihood.predictor_units == 3 and get_likelihood("poisson").predictor_units == 1


def test_categorical_nll_is_minus_the_tfp_log_prob_times_the_weight():
    likelihood = Categorical(num_classes=4)
    logits = np.column_stack([np.zeros(50), ETA]).astype("float32")
    reference = -WEIGHTS * tfd.Categorical(logits=logits).log_prob(LABELS).numpy()
    nll = likelihood.nll(Y, likelihood(ETA), WEIGHTS).numpy()
    assert nll.shape == (50, 1)  # one value per row
    np.testing.assert_allclose(nll[:, 0], reference, rtol=1e-4, atol=1e-5)
    mean_nll = float(likelihood.mean_nll(Y, likelihood(ETA), WEIGHTS))
    assert mean_nll == pytest.approx(reference.mean(), rel=1e-5)


def test_categorical_draws_are_one_hot_with_the_class_shares():
    likelihood = Categorical(num_classes=3)
    mean = likelihood(np.tile(np.array([[0.5, -1.0]], dtype="float32"), (20000, 1)))
    draws = likelihood.sample(mean, seed=3).numpy()
    assert draws.shape == (20000, 3)
    np.testing.assert_array_equal(draws.sum(axis=1), 1.0)
    # 20,000 draws: each share within 4 standard errors of its probability.
    p = mean.numpy()[0]
    assert np.all(np.abs(draws.mean(axis=0) - p) <= 4 * np.sqrt(p * (1 - p) / 20000))
    np.testing.assert_allclose(likelihood.variance(mean).numpy()[0], p * (1 - p), rtol=1e-6)


def test_categorical_config_round_trips_and_needs_its_number_of_classes():
    likelihood = Categorical(num_classes=5)
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(likelihood))
    assert type(revived) is Categorical and revived.num_classes == 5
    with pytest.raises(ValueError, match="num_classes=1"):
        Categorical(num_classes=1)
    with pytest.raises(ValueError, match="Categorical\\(num_classes=K\\)"):
        get_likelihood("categorical")


@pytest.mark.parametrize(
    "y, message",
    [
        (np.zeros((3, 4)), "shape \\(n, 3\\)"),
        (np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]), "0 or 1 \\(one-hot\\)"),
        (np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]), "row 1 has 2"),
        (np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), "row 1 has 0"),
    ],
)
def test_categorical_targets_must_be_one_hot(y, message):
    with pytest.raises(ValueError, match=message):
        Categorical(num_classes=3).check_targets(y)


# ----------------------------------------------------------------------- the model
def _multinomial_data(num_rows=600, num_groups=12, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(num_rows, 2)).astype("float32")
    groups = rng.integers(0, num_groups, num_rows)
    offsets = rng.normal(0.0, [0.5, 1.0], size=(num_groups, 2))
    eta = np.column_stack(
        [np.zeros(num_rows), features @ [[1.0, -0.5], [0.5, 0.8]] + offsets[groups]]
    )
    labels = (rng.random(num_rows)[:, None] > np.cumsum(softmax(eta, axis=1), axis=1)).sum(axis=1)
    return features, groups, np.eye(3, dtype="float32")[labels]


def test_build_mixed_model_gives_every_term_k_minus_1_outputs(tmp_path):
    features, groups, y = _multinomial_data()
    model = build_mixed_model(
        2,
        [12],
        hidden_units=(4,),
        likelihood=Categorical(num_classes=3),
        intercept_init=[0.1, -0.2],
        seed=0,
    )
    layers = mixed_model_layers(model)
    assert [layers.intercept.units, layers.fixed_effects.units, layers.factors[0].units] == [
        2,
        2,
        2,
    ]
    assert model.network.get_layer("subnetwork_output").units == 2
    np.testing.assert_allclose(layers.intercept.intercept_loc.numpy(), [0.1, -0.2], rtol=1e-6)
    model.compile(optimizer=keras.optimizers.Adam(0.03))
    model.fit([features, groups], y, epochs=2, batch_size=100, verbose=0)
    probabilities = model.predict([features, groups], verbose=0)
    assert probabilities.shape == (600, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    model.save(tmp_path / "multinomial.keras")
    revived = keras.saving.load_model(tmp_path / "multinomial.keras")
    assert isinstance(revived.likelihood, Categorical) and revived.likelihood.num_classes == 3
    np.testing.assert_array_equal(revived.predict([features, groups], verbose=0), probabilities)


def test_build_mixed_model_rejects_random_slopes_and_a_wrong_intercept_init():
    likelihood = Categorical(num_classes=3)
    with pytest.raises(ValueError, match="Random slopes take a one-column predictor"):
        build_mixed_model(2, [5], likelihood=likelihood, random_slopes=[[0]])
    with pytest.raises(ValueError, match="one number or 2"):
        build_mixed_model(2, [5], likelihood=likelihood, intercept_init=[0.0, 0.0, 0.0])


def test_reported_loss_is_nll_sum_plus_kl_over_n_with_three_classes():
    features, groups, y = _multinomial_data()
    network_model = build_mixed_model(2, [12], likelihood=Categorical(num_classes=3), seed=1)
    model = ELBOModel(network_model.network, likelihood=Categorical(num_classes=3))
    model.compile(optimizer=keras.optimizers.Adam(0.03))
    model.fit([features, groups], y, epochs=3, batch_size=100, verbose=0)
    result = model.evaluate([features, groups], y, batch_size=128, verbose=0, return_dict=True)

    # By hand, from the same weights: NLL at the posterior means, analytic KL of every term.
    layers = mixed_model_layers(model)
    intercept = layers.intercept.posterior()
    offsets = layers.factors[0].posterior()["offset"]
    kernel = layers.fixed_effects.posterior()
    eta = intercept.loc.numpy() + offsets.loc.numpy()[groups] + features @ kernel.loc.numpy()
    p = softmax(np.column_stack([np.zeros(len(y)), eta]), axis=1)
    nll_sum = -np.sum(np.log(np.sum(y * p, axis=1)))
    sigma = layers.factors[0].group_scale().numpy()  # one per class: (2,)
    kl = (
        normal_kl(intercept.loc, intercept.scale, 0.0, 10.0).numpy().sum()
        + normal_kl(offsets.loc, offsets.scale, 0.0, sigma).numpy().sum()
        + normal_kl(kernel.loc, kernel.scale, 0.0, 10.0).numpy().sum()
    )
    # float32 sums over 600 rows: agreement to 1e-4 relative.
    assert result["loss"] == pytest.approx((nll_sum + kl) / len(y), rel=1e-4)
    assert result["kl"] == pytest.approx(kl / len(y), rel=1e-4)


# ----------------------------------------------------------------------- the estimator
def _clinics(num_rows=900, seed=0):
    """Three string classes, string groups, two features."""
    features, groups, y = _multinomial_data(num_rows, num_groups=15, seed=seed)
    X = pd.DataFrame(
        {"clinic": [f"c{g}" for g in groups], "x0": features[:, 0], "x1": features[:, 1]}
    )
    labels = np.array(["mild", "none", "severe"])[y.argmax(axis=1)]
    return X, labels


@pytest.fixture(scope="module")
def fitted():
    X, labels = _clinics()
    clf = RandomEffectsClassifier(group_cols=["clinic"], epochs=40, random_state=0)
    return clf.fit(X, labels), X, labels


def test_predict_proba_decision_function_and_predict_agree(fitted):
    clf, X, labels = fitted
    np.testing.assert_array_equal(clf.classes_, ["mild", "none", "severe"])
    proba = clf.predict_proba(X)
    decision = clf.decision_function(X)
    assert proba.shape == decision.shape == (len(X), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(decision[:, 0], 0.0)  # classes_[0] is the reference
    np.testing.assert_allclose(proba, softmax(decision, axis=1), rtol=1e-12)
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[np.argmax(proba, axis=1)])
    # The columns are in classes_'s order: each column's mean is close to its class's share.
    shares = [np.mean(labels == c) for c in clf.classes_]
    np.testing.assert_allclose(proba.mean(axis=0), shares, atol=0.03)
    assert clf.score(X, labels) > 0.6  # the classes are well separated by x and the groups


def test_fitted_attributes_follow_scikit_learn_multinomial_shapes(fitted):
    clf, X, _ = fitted
    assert clf.intercept_.shape == (3,) and clf.coef_.shape == (3, 2)
    assert clf.intercept_[0] == 0.0 and np.all(clf.coef_[0] == 0.0)
    # Simulated log odds against class 0 per unit of x0, x1: (1.0, 0.5) and (-0.5, 0.8);
    # 900 rows give standard errors near 0.1.
    np.testing.assert_allclose(clf.coef_[1:], [[1.0, 0.5], [-0.5, 0.8]], atol=0.35)
    sigma = clf.variance_components_["clinic"]
    assert list(sigma.index) == ["none", "severe"] and sigma.index.name == "class"
    assert np.all(sigma > 0)
    covariance = clf.random_effects_covariance_["clinic"]
    np.testing.assert_allclose(np.diag(covariance), sigma**2)
    table = clf.random_effects_["clinic"]
    assert list(table.columns) == [
        f"{stat}_{c}" for c in ["none", "severe"] for stat in ("mean", "sd", "lower", "upper")
    ] + ["n"]
    assert table["n"].sum() == len(X) and len(table) == 15
    assert clf.joint_posterior_ is None  # no exact finish for K > 2


def test_a_new_group_gets_offset_zero_so_the_linear_part_alone(fitted):
    clf, X, _ = fitted
    new = X.head(5).assign(clinic="never seen")
    linear = clf.intercept_ + new[["x0", "x1"]].to_numpy() @ clf.coef_.T
    np.testing.assert_allclose(clf.decision_function(new), linear, atol=1e-5)


def test_summary_reads_each_class(fitted):
    clf, _, _ = fitted
    text = str(inspection.summary(clf))
    assert "categorical (log odds against the reference class 'mild')" in text
    components = inspection.variance_components(clf)
    assert list(components.index) == [("clinic", "none"), ("clinic", "severe")]
    np.testing.assert_allclose(components["sd"], clf.variance_components_["clinic"])
    fixed = inspection.fixed_effects(clf)
    np.testing.assert_allclose(fixed.loc["severe", "mean"], [clf.intercept_[2], *clf.coef_[2]])
    with pytest.raises(ValueError, match="no residuals"):
        inspection.summary(clf, y=[1])


def test_pickle_round_trip_predicts_the_same(fitted):
    clf, X, _ = fitted
    revived = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(revived.predict_proba(X), clf.predict_proba(X))


def test_subnetwork_weights_and_early_stopping_with_three_classes():
    X, labels = _clinics(600, seed=1)
    clf = RandomEffectsClassifier(
        group_cols=["clinic"],
        hidden_units=(8,),
        epochs=30,
        early_stopping=True,
        n_iter_no_change=2,
        random_state=0,
    ).fit(X, labels, sample_weight=np.full(len(X), 2.0))
    assert clf.model_.network.get_layer("subnetwork_output").units == 2
    assert "val_loss" in clf.history_ and len(clf.history_["loss"]) <= 30
    np.testing.assert_allclose(clf.predict_proba(X).sum(axis=1), 1.0, rtol=1e-12)


def test_random_slopes_and_a_single_class_are_errors():
    X, labels = _clinics(300)
    with pytest.raises(ValueError, match="`random_slopes` are not supported with more than two"):
        RandomEffectsClassifier(group_cols=["clinic"], random_slopes={"clinic": ["x0"]}).fit(
            X, labels
        )
    with pytest.raises(ValueError, match="needs at least 2 classes"):
        RandomEffectsClassifier(group_cols=["clinic"]).fit(X, np.full(len(X), "none"))


class _BinaryTagged(RandomEffectsClassifier):
    """The check suite's classifier with scikit-learn's binary-only tag, to run the binary
    half of `check_classifiers_train` alone."""

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param({}, id="plain"),
        # The same fits on read-only (and float32) copies of the data: 25-35 s each.
        pytest.param({"readonly_memmap": True}, id="readonly_memmap", marks=pytest.mark.slow),
        pytest.param(
            {"readonly_memmap": True, "X_dtype": "float32"},
            id="readonly_memmap_float32",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_scikit_learn_check_classifiers_train_binary_and_multiclass(variant):
    # tests/test_sklearn.py runs every check on RandomEffectsClassifier(group_cols=[0],
    # epochs=2), which now sees multiclass data in all of them; `check_classifiers_train`
    # (its three variants) is listed there as an expected failure for the accuracy its
    # multiclass half wants (MULTICLASS_TRAIN_REASON). Here: its binary half on that
    # instance, as before, and both halves on an instance that keeps both of the check's
    # features (a multinomial GLM with no grouping factor, SGD only).
    binary = _BinaryTagged(group_cols=[0], epochs=2, random_state=0)
    check_classifiers_train("RandomEffectsClassifier (binary half)", binary, **variant)
    multiclass = RandomEffectsClassifier(group_cols=(), epochs=20, random_state=0)
    check_classifiers_train("RandomEffectsClassifier", multiclass, **variant)


# ----------------------------------------------------------------------- simulation
def _simulate(seed, num_rows=6000, num_groups=100, sigmas=(0.5, 1.0)):
    """3 classes, 100 groups, 6,000 rows: eta_c = alpha_c + x . beta_c + b[g, c] for the
    classes 1 and 2 (class "a" is the reference), b[., c] ~ Normal(0, sigmas[c])."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, num_groups, num_rows)
    x = rng.normal(size=(num_rows, 2))
    offsets = rng.normal(0.0, 1.0, (num_groups, 2)) * np.array(sigmas)
    coef = np.array([[1.0, -0.5], [0.5, 0.8]])  # columns: classes 1 and 2
    eta = np.column_stack([np.zeros(num_rows), [0.3, -0.2] + x @ coef + offsets[groups]])
    labels = (rng.random(num_rows)[:, None] > np.cumsum(softmax(eta, axis=1), axis=1)).sum(axis=1)
    X = pd.DataFrame({"g": groups, "x0": x[:, 0], "x1": x[:, 1]})
    return X, np.array(["a", "b", "c"])[labels], offsets


def test_simulation_recovers_the_per_class_variance_components():
    X, labels, offsets = _simulate(2026)
    clf = RandomEffectsClassifier(group_cols=["g"], random_state=0).fit(X, labels)
    # K > 2 always runs SGD, at the default schedule (about 4,000 steps).
    assert len(clf.history_["loss"]) == default_schedule(len(X))[1]
    sigma = clf.variance_components_["g"].to_numpy()

    # The oracle on the same data: P(y = c | y in {a, c}) = sigmoid(eta_c), so a binary fit
    # on the rows of classes a and c (glmer's Laplace fit: the exact finish) estimates
    # sigma_c too, from fewer rows. Over 7 simulated data sets the SGD fit was 0.8% to 7.6%
    # from it (mean -1.7%, sd 3.4%; the two use different rows, and mean-field q runs
    # slightly low), and refits with 4 random_states moved sigma by under 0.3%: 15%
    # is about 3 sds of that difference beyond its mean.
    for c, label in enumerate(["b", "c"]):
        pair = np.isin(labels, ["a", label])
        laplace = RandomEffectsClassifier(group_cols=["g"]).fit(X[pair], labels[pair])
        assert sigma[c] == pytest.approx(laplace.variance_components_["g"], rel=0.15)

    # Against the offsets' realised sds (0.528, 0.919 here): with 60 rows of 3 classes per
    # group, a class's offset is known to about +-0.3, so from 100 groups sigma_b = 0.5 is
    # estimated to about 12% (the Laplace oracle itself was 0.75-1.11 times the realised sd
    # over 7 data sets) and sigma_c = 1.0 to about 5%: 35% and 15% are about 3 of those.
    realised = offsets.std(axis=0, ddof=1)
    assert sigma[0] == pytest.approx(realised[0], rel=0.35)
    assert sigma[1] == pytest.approx(realised[1], rel=0.15)
    assert sigma[1] > 1.5 * sigma[0]  # the classes keep their own scales
    # Fixed effects: 6,000 rows give standard errors of about 0.04.
    np.testing.assert_allclose(clf.intercept_, [0.0, 0.3, -0.2], atol=0.2)
    np.testing.assert_allclose(clf.coef_[1:], [[1.0, 0.5], [-0.5, 0.8]], atol=0.15)


# ----------------------------------------------------------------------- benchmark
@pytest.mark.slow
def test_multiclass_benchmark_smoke(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "multiclass.py"
    spec = importlib.util.spec_from_file_location("multiclass", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main("--rows 1500 --groups 20 --repeats 1 --epochs 5 --no-append".split())
    out = capsys.readouterr().out
    assert "LogisticRegression" in out and "one-vs-rest" in out and "log loss" in out
