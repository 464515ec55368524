"""More than two classes: the Categorical likelihood, K - 1 outputs in `build_mixed_model`,
the multinomial Laplace finish (`reffects.multinomial_finish`) and
`RandomEffectsClassifier`'s multinomial model."""

import importlib.util
import pickle
import warnings
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow_probability as tfp
from scipy import optimize
from scipy.special import logsumexp, roots_hermite, softmax
from sklearn.utils.estimator_checks import check_classifiers_train

from reffects import (
    Categorical,
    ELBOModel,
    GlobalIntercept,
    RandomEffectsClassifier,
    finish,
    inspection,
)
from reffects.likelihoods import Bernoulli, get_likelihood
from reffects.models import build_mixed_model, mixed_model_layers
from reffects.multinomial_finish import MultinomialMixedModel, finish_multinomial
from reffects.posteriors import normal_kl

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


# ----------------------------------------------------------------------- the finish
def _finish_data(num_rows=240, num_groups=8, num_classes=4, seed=3):
    """Labels, integer weights (some 0), the design [1, x0, x1] and one factor's codes."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, num_groups, num_rows)
    design = np.column_stack([np.ones(num_rows), rng.normal(size=(num_rows, 2))])
    offsets = rng.normal(0.0, 0.8, (num_groups, num_classes - 1))
    eta = design @ rng.normal(0.0, 0.7, (3, num_classes - 1)) + offsets[groups]
    p = softmax(np.column_stack([np.zeros(num_rows), eta]), axis=1)
    labels = np.minimum((rng.random(num_rows)[:, None] > np.cumsum(p, axis=1)).sum(axis=1), 3)
    return labels, rng.integers(0, 4, num_rows).astype(float), design, groups


def _group_laplace(labels, weights, fixed, groups, num_groups, sigma):
    """The oracle: -2 log of the Laplace approximation to p(y | sigma, beta), group by group,
    and the groups' modes b*. b* by BFGS on the group's own negative log posterior (no
    PIRLS, no pseudo-rows), the Hessian sum_i w_i (diag(p_i) - p_i p_i') + Sigma^-1 in
    closed form; `fixed` is each row's d_i . beta_c, `(n, K - 1)`."""
    d = fixed.shape[1]
    total, modes = 0.0, np.zeros((num_groups, d))
    for group in range(num_groups):
        rows = groups == group
        label, weight, part = labels[rows], weights[rows], fixed[rows]

        def objective(b, label=label, weight=weight, part=part):
            logits = np.column_stack([np.zeros(len(part)), part + b])
            chosen = logits[np.arange(len(part)), label] - logsumexp(logits, axis=1)
            return -weight @ chosen + 0.5 * np.sum(np.square(b / sigma))

        b = optimize.minimize(objective, np.zeros(d), method="BFGS", options={"gtol": 1e-10}).x
        p = softmax(np.column_stack([np.zeros(len(part)), part + b]), axis=1)[:, 1:]
        hessian = np.diag(weight @ p) - (weight[:, None] * p).T @ p + np.diag(sigma**-2.0)
        total += 2.0 * objective(b) + np.linalg.slogdet(hessian * sigma**2)[1]
        modes[group] = b
    return total, modes


def test_laplace_deviance_and_modes_match_an_independent_laplace_per_group():
    # Four classes (three offsets per group), two features, weights with zeros.
    labels, weights, design, groups = _finish_data()
    model = MultinomialMixedModel(labels, weights, design, [groups], [8], 0.0, 0.01, 4)
    beta, sigma = np.linspace(-0.5, 0.5, 9), np.array([0.3, 0.8, 1.5])
    expected, modes = _group_laplace(
        labels, weights, design @ beta.reshape(3, 3).T, groups, 8, sigma
    )
    expected += 0.01 * beta @ beta  # the deviance carries beta's prior penalty
    # Both find the same modes to ~1e-10 (PIRLS: deviance changes under 1e-12; BFGS:
    # gradient under 1e-10), so the values agree to rounding, far inside 1e-9.
    assert model.laplace_deviance(sigma, beta) == pytest.approx(expected, rel=1e-9)
    offsets, _, _ = model.pirls(sigma, [np.zeros((8, 3))], beta, False)
    # The offsets with beta held are each group's MAP on its own rows.
    np.testing.assert_allclose(offsets[0] * sigma, modes, atol=1e-7)


def test_laplace_deviance_with_crossed_factors_matches_a_dense_laplace():
    # Two crossed factors: the oracle optimises every offset jointly (BFGS over all
    # (5 + 4) x 3 of them) and takes log det of the dense Hessian
    # sum_i Z_i' W_i Z_i + Sigma^-1, with no elimination of the larger factor.
    labels, weights, design, first = _finish_data(num_groups=5)
    second = np.random.default_rng(1).integers(0, 4, len(labels))
    model = MultinomialMixedModel(labels, weights, design, [first, second], [5, 4], 0.0, 0.0, 4)
    beta, theta = np.linspace(0.4, -0.4, 9), np.array([0.3, 0.8, 1.5, 1.1, 0.2, 0.6])
    fixed = design @ beta.reshape(3, 3).T
    scale = np.concatenate([np.tile(theta[:3], 5), np.tile(theta[3:], 4)])
    columns = np.stack([first * 3, 15 + second * 3])  # each row's first column per factor

    def eta_of(b):
        coefficients = b.reshape(-1, 3)
        return fixed + coefficients[first] + coefficients[5 + second]

    def objective(b):
        logits = np.column_stack([np.zeros(len(labels)), eta_of(b)])
        chosen = logits[np.arange(len(labels)), labels] - logsumexp(logits, axis=1)
        return -weights @ chosen + 0.5 * np.sum(np.square(b / scale))

    b = optimize.minimize(objective, np.zeros(27), method="BFGS", options={"gtol": 1e-10}).x
    p = softmax(np.column_stack([np.zeros(len(labels)), eta_of(b)]), axis=1)[:, 1:]
    hessian = np.diag(scale**-2.0)
    for i in range(len(labels)):
        block = weights[i] * (np.diag(p[i]) - np.outer(p[i], p[i]))
        for r in columns[:, i]:
            for c in columns[:, i]:
                hessian[r : r + 3, c : c + 3] += block
    expected = 2.0 * objective(b) + np.linalg.slogdet(hessian * scale**2)[1]
    # As for one factor: both modes to ~1e-10, the values to rounding.
    assert model.laplace_deviance(theta, beta) == pytest.approx(expected, rel=1e-9)


def _exact_deviance(labels, sigma, alpha, num_nodes=40):
    """-2 log p(y | sigma, alpha) for one group of rows (no features), K = 3, by adaptive
    Gauss-Hermite quadrature on the 2-d offset (centred at the mode, scaled by the
    Laplace covariance): the integral itself, not an approximation of its log."""
    counts = np.bincount(labels, minlength=3)
    _, (mode,) = _group_laplace(
        labels,
        np.ones(len(labels)),
        np.tile(alpha, (len(labels), 1)),
        np.zeros(len(labels), int),
        1,
        sigma,
    )
    p = softmax(np.concatenate([[0.0], alpha + mode]))[1:]
    hessian = len(labels) * (np.diag(p) - np.outer(p, p)) + np.diag(sigma**-2.0)
    root = np.linalg.cholesky(np.linalg.inv(hessian))
    nodes, node_weights = roots_hermite(num_nodes)
    z = np.stack(np.meshgrid(nodes, nodes, indexing="ij"), -1).reshape(-1, 2)
    log_w = np.log(np.outer(node_weights, node_weights)).reshape(-1) + np.sum(z**2, axis=1)
    b = mode + np.sqrt(2.0) * z @ root.T
    logits = np.column_stack([np.zeros(len(b)), alpha + b])
    log_lik = (logits - logsumexp(logits, axis=1, keepdims=True)) @ counts
    log_prior = -0.5 * np.sum(np.square(b / sigma), axis=1) - np.log(2 * np.pi * np.prod(sigma))
    log_jacobian = np.log(2.0) + np.linalg.slogdet(root)[1]
    return -2.0 * (logsumexp(log_w + log_lik + log_prior) + log_jacobian)


def test_laplace_deviance_approaches_the_integrated_likelihood_as_groups_grow():
    # One group, K = 3, no features: the Laplace deviance against the exact integral, on 40
    # labels and on the same labels repeated 4 and 16 times. The Laplace approximation's
    # relative error in the integral is O(1 / n) (Tierney and Kadane 1986), so each 4-fold
    # n should cut the gap close to 4 times once n dominates the prior (measured: 2.3,
    # then 3.3); a wrong log det (a missing factor, a transposed L_i) leaves a gap that
    # does not shrink.
    rng = np.random.default_rng(7)
    sigma, alpha = np.array([0.7, 1.2]), np.array([0.2, -0.4])
    base = rng.choice(3, 40, p=softmax(np.concatenate([[0.0], alpha + [0.5, -0.8]])))
    gaps = []
    for repeats in (1, 4, 16):
        labels = np.tile(base, repeats)
        ones = np.ones(len(labels))
        model = MultinomialMixedModel(
            labels, ones, ones[:, None], [np.zeros(len(labels), int)], [1], 0.0, 0.0, 3
        )
        gaps.append(model.laplace_deviance(sigma, alpha) - _exact_deviance(labels, sigma, alpha))
    assert abs(gaps[0]) < 0.1  # an O(1 / n) error of -2 log p on 40 rows
    assert abs(gaps[1]) < abs(gaps[0]) / 2 and abs(gaps[2]) < abs(gaps[1]) / 3


def test_without_factors_the_fit_is_multinomial_logistic_regression():
    # No grouping factor and a negligible prior: the Laplace finish is the MLE, its
    # posterior sds the inverse observed information, statsmodels' MNLogit's.
    statsmodels = pytest.importorskip("statsmodels.api")
    labels, _, design, _ = _finish_data(num_rows=400, seed=4)
    model = MultinomialMixedModel(labels, np.ones(400), design, [], [], 0.0, 1e-10, 4)
    theta, offsets, beta = model.fit(np.zeros(0), [], np.zeros(9))
    posterior = model.posterior(theta, offsets, beta)
    oracle = statsmodels.MNLogit(labels, design).fit(method="newton", tol=1e-12, disp=0)
    # MNLogit's params are (p, K - 1), ours class by class; both converge to 1e-10, and the
    # prior (precision 1e-10) moves the estimates by ~1e-10 of their variance.
    np.testing.assert_allclose(beta, oracle.params.T.reshape(-1), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(posterior.fixed_sd(), oracle.bse.T.reshape(-1), rtol=1e-6)


def test_fit_maximises_the_laplace_approximation_and_ignores_weights_form_and_start():
    labels, weights, design, groups = _finish_data()
    model = MultinomialMixedModel(labels, weights, design, [groups], [8], 0.0, 0.01, 4)
    theta, offsets, beta = model.fit(np.full(3, 0.5), [np.zeros((8, 3))], np.zeros(9))
    # A minimum of the Laplace deviance with (u, beta) at their joint mode: no sigma_c on
    # its interior moves it down (a sigma at its boundary 1e-5 only up); PIRLS converges
    # the deviance (~700 here) to 1e-12 of itself, so 1e-9 is its rounding.
    _, _, value = model.pirls(theta, offsets, beta)
    for c in range(3):
        for factor in (0.99, 1.01):
            trial = theta.copy()
            trial[c] = max(trial[c] * factor, 1e-5)
            assert model.pirls(trial, offsets, beta)[2] >= value - 1e-9
    # Repeated rows instead of integer weights, in another order, from another start: the
    # same fit. The polish leaves theta within ~1e-9 of the optimum; measured agreement
    # 1e-10.
    rows = np.random.default_rng(0).permutation(
        np.repeat(np.arange(len(labels)), weights.astype(int))
    )
    repeated = MultinomialMixedModel(
        labels[rows], np.ones(len(rows)), design[rows], [groups[rows]], [8], 0.0, 0.01, 4
    )
    other = repeated.fit(np.full(3, 1.5), [np.ones((8, 3))], np.ones(9))
    np.testing.assert_allclose(other[0], theta, atol=1e-8)
    np.testing.assert_allclose(other[1][0], offsets[0], atol=1e-8)
    np.testing.assert_allclose(other[2], beta, atol=1e-8)


def test_a_held_offset_moves_only_the_coefficients_it_duplicates():
    # h = x0 c held (a subnetwork's output that happens to be linear in x0): under a flat
    # prior on beta the penalised deviance at (u, beta) with h equals that at
    # (u, beta + c on x0) without it, so the fit is the same but for x0's coefficients,
    # which move by -c. As `(n, K)` (one column per class, any shift per row: the
    # softmax ignores it), h gives the same fit. The fits converge theta to ~1e-9 (the
    # test above): 1e-8.
    labels, weights, design, groups = _finish_data()
    c = np.array([0.7, -0.4, 0.2])
    held = design[:, [1]] * c

    def fit(h):
        model = MultinomialMixedModel(labels, weights, design, [groups], [8], 0.0, 0.0, 4, h)
        return model.fit(np.full(3, 0.5), [np.zeros((8, 3))], np.zeros(9))

    theta, offsets, beta = fit(0.0)
    moved = beta.reshape(3, 3).copy()
    moved[:, 1] -= c
    row_shift = np.random.default_rng(0).normal(size=(len(labels), 1))
    for h in (held, np.column_stack([row_shift, row_shift + held])):
        other = fit(h)
        np.testing.assert_allclose(other[0], theta, atol=1e-8)
        np.testing.assert_allclose(other[1][0], offsets[0], atol=1e-8)
        np.testing.assert_allclose(other[2], moved.reshape(-1), atol=1e-8)
    with pytest.raises(ValueError, match=r"`held` must be a scalar or of shape \(240, 3\)"):
        MultinomialMixedModel(labels, weights, design, [groups], [8], 0.0, 0.0, 4, held[:, :2])


def test_finish_writes_the_laplace_marginals_into_the_layers():
    features, groups, y = _multinomial_data(num_rows=300)
    model = build_mixed_model(2, [12], likelihood=Categorical(num_classes=3), seed=0)
    layers = mixed_model_layers(model)
    layers.factors[0].adapt(groups)
    posterior = finish_multinomial(
        model,
        layers.intercept,
        [(layers.factors[0], groups)],
        layers.fixed_effects,
        features,
        y=y,
    )
    # The layers hold float32: agreement to its rounding.
    mean, sd = posterior.fixed_mean().reshape(2, 3), posterior.fixed_sd().reshape(2, 3)
    np.testing.assert_allclose(layers.intercept.intercept_loc.numpy(), mean[:, 0], rtol=1e-6)
    q = layers.fixed_effects.posterior()
    np.testing.assert_allclose(q.loc.numpy(), mean[:, 1:].T, rtol=1e-6)
    np.testing.assert_allclose(q.scale.numpy(), sd[:, 1:].T, rtol=1e-5)
    offsets = layers.factors[0].posterior()["offset"]
    np.testing.assert_allclose(offsets.loc.numpy(), posterior.offset_mean(0), atol=1e-6)
    np.testing.assert_allclose(offsets.scale.numpy(), posterior.offset_sd(0), rtol=1e-5)
    sigma = layers.factors[0].group_scale().numpy()
    assert np.all(sigma > 0.1)  # simulated 0.5 and 1.0 over 12 groups
    # predict uses them: the class probabilities at the posterior means
    eta = mean[:, 0] + features @ mean[:, 1:].T + posterior.offset_mean(0)[groups]
    expected = softmax(np.column_stack([np.zeros(300), eta]), axis=1)
    np.testing.assert_allclose(model.predict([features, groups], verbose=0), expected, atol=1e-5)


def test_finish_needs_a_categorical_model_and_labels_in_range():
    ids = keras.Input(shape=(), dtype="int64")
    alpha = GlobalIntercept()
    model = ELBOModel(keras.Model(ids, alpha(ids)), likelihood=Bernoulli())
    with pytest.raises(ValueError, match="Categorical likelihood. Received: Bernoulli"):
        finish_multinomial(model, alpha, [], y=np.eye(3)[[0, 1, 2]])
    with pytest.raises(ValueError, match="`labels` must be integers in \\[0, 3\\)"):
        MultinomialMixedModel([0, 3], np.ones(2), np.ones((2, 1)), [], [], 0.0, 1.0, 3)
    with pytest.raises(ValueError, match="num_classes=1"):
        MultinomialMixedModel([0, 0], np.ones(2), np.ones((2, 1)), [], [], 0.0, 1.0, 1)


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
    clf = RandomEffectsClassifier(group_cols=["clinic"], random_state=0)
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
    # The finish's posterior has K - 1 outputs, which the readers of `joint_posterior_`
    # (intervals, inspection) do not take; its marginals are in the layers.
    assert clf.joint_posterior_ is None
    assert clf.history_ == {}  # no subnetwork: the Laplace finish alone, no SGD


def test_fit_is_deterministic_and_ignores_row_order_weights_form_and_sgd(fitted):
    clf, X, labels = fitted
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    rng = np.random.default_rng(0)
    weights = rng.integers(0, 4, len(X))
    rows = rng.permutation(np.repeat(np.arange(len(X)), weights))
    others = [
        RandomEffectsClassifier(group_cols=["clinic"]).fit(X.iloc[rows[::-1]], labels[rows[::-1]]),
        RandomEffectsClassifier(group_cols=["clinic"]).fit(X, labels, sample_weight=weights),
    ]
    # The layers hold float32: a logit of size ~3 is rounded by ~2e-7, the probabilities
    # as much relatively; the float64 fits agree to ~1e-9 (the finish's polish).
    np.testing.assert_allclose(
        others[0].predict_proba(X), others[1].predict_proba(X), rtol=1e-6, atol=1e-9
    )
    # SGD before the finish (`epochs`) only moves its start, and row order changes nothing.
    warm = RandomEffectsClassifier(group_cols=["clinic"], epochs=5, random_state=1)
    shuffled = rng.permutation(len(X))
    warm.fit(X.iloc[shuffled], labels[shuffled])
    assert len(warm.history_["loss"]) == 5
    np.testing.assert_allclose(warm.predict_proba(X), proba, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(
        warm.variance_components_["clinic"], clf.variance_components_["clinic"], rtol=1e-6
    )


def test_a_new_group_gets_offset_zero_so_the_linear_part_alone(fitted):
    clf, X, _ = fitted
    new = X.head(5).assign(clinic="never seen")
    linear = clf.intercept_ + new[["x0", "x1"]].to_numpy() @ clf.coef_.T
    np.testing.assert_allclose(clf.decision_function(new), linear, atol=1e-5)


def test_summary_reads_each_class(fitted):
    clf, _, _ = fitted
    text = str(inspection.summary(clf))
    assert "categorical (log odds against the reference class 'mild')" in text
    fit_by = "fit by a Laplace approximation with beta at its joint mode (glmer's nAGQ = 0)"
    assert fit_by in text  # the fixture's classifier has no subnetwork
    components = inspection.variance_components(clf)
    assert list(components.index) == [("clinic", "none"), ("clinic", "severe")]
    np.testing.assert_allclose(components["sd"], clf.variance_components_["clinic"])
    fixed = inspection.fixed_effects(clf)
    np.testing.assert_allclose(fixed.loc["severe", "mean"], [clf.intercept_[2], *clf.coef_[2]])
    with pytest.raises(ValueError, match="no residuals"):
        inspection.summary(clf, y=[1])


def test_group_effects_read_each_class_and_plot(fitted):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from reffects import plotting

    clf, _, _ = fitted
    assert inspection.factors(clf) == ["clinic"]
    table = clf.random_effects_["clinic"]
    severe = inspection.group_effects(clf, term="severe", level=0.9)
    np.testing.assert_array_equal(severe["mean"], table["mean_severe"])
    np.testing.assert_array_equal(severe["n"], table["n"])
    half_width = 1.6448536269514722 * table["sd_severe"].to_numpy()  # the 90% Normal interval
    np.testing.assert_allclose(severe["upper"] - severe["mean"], half_width, rtol=1e-12)
    first = inspection.group_effects(clf, "clinic")  # None: the first class after the reference
    np.testing.assert_array_equal(first["mean"], table["mean_none"])
    with pytest.raises(ValueError, match="one of the classes \\['none', 'severe'\\]"):
        inspection.group_effects(clf, term="mild")
    with pytest.raises(ValueError, match="leave out X and y"):
        inspection.group_effects(clf, X=[0], y=[0])
    with pytest.raises(ValueError, match="one of the grouping factors \\['clinic'\\]"):
        inspection.group_effects(clf, "ward")
    ax = plotting.group_effects(clf, term="severe", ax=plt.figure().gca())
    assert "log odds of severe vs mild" in ax.get_xlabel()
    plt.close(ax.figure)


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
    assert 0.0 <= clf.subnetwork_weight_ <= 1.0  # guarded (tests/test_multiclass_guard.py)
    np.testing.assert_allclose(clf.predict_proba(X).sum(axis=1), 1.0, rtol=1e-12)
    # SGD, then the multinomial Laplace finish with the subnetwork's output held
    text = str(inspection.summary(clf))
    laplace = "a Laplace approximation with beta at its joint mode (glmer's nAGQ = 0)"
    assert f"fit by SGD on the ELBO, then {laplace}" in text
    assert " Subnetwork f(x): " in text


def test_the_dense_limit_counts_the_multinomial_model_s_coefficients(monkeypatch):
    # K = 3: each level has K - 1 = 2 offsets and each fixed effect 2 coefficients. clinic
    # (16 levels, the unseen one included: 32 coefficients) is the largest factor; ward's 5
    # levels give 10, the intercept and 2 features 6: 16 in all, where counting one term per
    # level and 1 + p fixed effects would give 5 + 3 = 8.
    X, labels = _clinics(300, seed=2)
    X = X.assign(ward=np.random.default_rng(2).integers(0, 4, len(X)))
    options = {"group_cols": ["clinic", "ward"], "epochs": 2, "random_state": 0}
    monkeypatch.setattr(finish, "MAX_DENSE_LEVELS", 15)
    with pytest.warns(
        UserWarning, match=r"at most 15, .*; this model has 16\. It is fitted by SGD"
    ):
        clf = RandomEffectsClassifier(**options).fit(X, labels)
    assert "fit by variational inference" in str(inspection.summary(clf))
    np.testing.assert_allclose(clf.predict_proba(X).sum(axis=1), 1.0, rtol=1e-6)
    monkeypatch.setattr(finish, "MAX_DENSE_LEVELS", 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "fitted by SGD alone" warning
        clf = RandomEffectsClassifier(**options).fit(X, labels)
    assert "then a Laplace approximation" in str(inspection.summary(clf))


def test_random_slopes_and_a_single_class_are_errors():
    X, labels = _clinics(300)
    with pytest.raises(ValueError, match="`random_slopes` are not supported with more than two"):
        RandomEffectsClassifier(group_cols=["clinic"], random_slopes={"clinic": ["x0"]}).fit(
            X, labels
        )
    with pytest.raises(ValueError, match="needs at least 2 classes"):
        RandomEffectsClassifier(group_cols=["clinic"]).fit(X, np.full(len(X), "none"))


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param({}, id="plain"),
        # The same fits on read-only (and float32) copies of the data: 2-4 s each.
        pytest.param({"readonly_memmap": True}, id="readonly_memmap"),
        pytest.param({"readonly_memmap": True, "X_dtype": "float32"}, id="readonly_memmap_float32"),
    ],
)
def test_scikit_learn_check_classifiers_train_without_grouping_factors(variant):
    # tests/test_sklearn.py runs the check on RandomEffectsClassifier(group_cols=[0]): one
    # factor with a level per row. Here the other edge: no grouping factor at all, where
    # the finish is a penalised multinomial logistic regression (no SGD at the defaults).
    multiclass = RandomEffectsClassifier(group_cols=(), random_state=0)
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
    assert clf.history_ == {}  # the multinomial Laplace finish alone
    sigma = clf.variance_components_["g"].to_numpy()

    # The oracle on the same data: P(y = c | y in {a, c}) = sigmoid(eta_c), so a binary fit
    # on the rows of classes a and c (glmer's Laplace fit: the exact finish) estimates
    # sigma_c too, from fewer rows. Over 6 simulated data sets (seeds 2026, 1-5) the
    # multinomial Laplace fit was -3.6% to +6.8% from it (mean +1.2%, sd 3.7%; the two
    # use different rows): 15% is about 3.5 sds.
    for c, label in enumerate(["b", "c"]):
        pair = np.isin(labels, ["a", label])
        laplace = RandomEffectsClassifier(group_cols=["g"]).fit(X[pair], labels[pair])
        assert sigma[c] == pytest.approx(laplace.variance_components_["g"], rel=0.15)

    # Against the offsets' realised sds (0.528, 0.919 here): with 60 rows of 3 classes per
    # group, a class's offset is known to about +-0.3, so from 100 groups sigma_b = 0.5 is
    # estimated to about 12% and sigma_c = 1.0 to about 5%: 35% and 15% are about 3 of
    # those (over the 6 data sets: 0.89-1.10 and 0.94-1.05 times the realised sds).
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
