"""Plots for reading a fitted model: shrinkage, group effects, fixed effects, residuals, history.

Needs matplotlib (`pip install reffects[plots]`). Each function takes the same objects as
`reffects.inspection` (a Keras model built from reffects layers or a fitted
`RandomEffectsRegressor`), draws on `ax` (the current Axes when None) and returns it.
"""

import math

import numpy as np

from reffects import inspection


def _axes(ax):
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "reffects.plotting needs matplotlib; install it with `pip install reffects[plots]`."
        ) from error
    return plt.gca() if ax is None else ax


def _percent(level: float) -> str:
    return f"{100 * level:g}%"


def shrinkage(obj, X, y, factor=None, ax=None, *, term=None):
    """Posterior group means against within-group estimates: partial pooling at a glance.

    Each point is a group seen in training: x is its level estimated from its own rows alone
    (`unpooled` of `inspection.group_effects`), y the posterior mean of intercept + offset.
    Colour and size grow with the group's training rows. Points on the dashed line y = x are
    not pooled at all; the solid line is the global intercept, where complete pooling would
    put every group. Small groups sit closer to it. For a random slope (`term`, or a factor
    without a random intercept) the same for the group's slope: fixed slope + its offset
    against the slope fitted to the group's own rows, the solid line at the fixed slope.

    Args:
        obj: a fitted `RandomEffectsRegressor` or the trained `ELBOModel`.
        X, y: the training data, as given to `fit`.
        factor: the grouping factor; None when there is only one.
        ax: the matplotlib Axes to draw on.
        term: the factor's term (`"(Intercept)"` or a slope column); None: its first.

    Returns:
        The Axes, holding one collection (the groups) and two lines.

    Example:
        >>> import matplotlib.pyplot as plt
        >>> from reffects.models import build_mixed_model
        >>> model = build_mixed_model(num_features=0, num_groups=[3])
        >>> ids, y = np.array([0, 0, 1, 2]), np.array([1.0, 3.0, -1.0, 0.5])
        >>> model.get_layer("mixed_model").get_layer("random_intercept_0").adapt(ids)
        >>> ax = shrinkage(model, ids, y, ax=plt.figure().gca())
        >>> len(ax.collections), len(ax.lines)
        (1, 2)
        >>> plt.close(ax.figure)
    """
    ax = _axes(ax)
    import matplotlib.colors

    table = inspection.group_effects(obj, factor, X, y, term=term)
    key = inspection.factors(obj)[0] if factor is None else factor
    table = table[(table["n"] > 0) & table["unpooled"].notna()]
    terms = inspection.random_effects_covariance(obj)[key].index  # group_effects checked term
    name = terms[0] if term is None else next(t for t in terms if str(t) == str(term))
    fixed = inspection.fixed_effects(obj)
    reference = float(fixed["mean"].get(name, 0.0))
    pooled = reference + table["mean"].to_numpy()
    counts = table["n"].to_numpy()
    points = ax.scatter(
        table["unpooled"],
        pooled,
        s=8 + 40 * np.sqrt(counts / counts.max()),
        c=counts,
        cmap="viridis",
        norm=matplotlib.colors.LogNorm(vmin=counts.min(), vmax=max(counts.max(), 2)),
        alpha=0.8,
        edgecolors="none",
    )
    ax.figure.colorbar(points, ax=ax, label="training rows in the group")
    low = min(table["unpooled"].min(), pooled.min())
    ax.axline((low, low), slope=1.0, color="0.5", linestyle="--", label="no pooling (y = x)")
    label = "global intercept" if name == inspection.INTERCEPT else f"fixed slope of {name}"
    ax.axhline(reference, color="C3", label=f"{label} {reference:.4g}")
    ax.set_xlabel("within-group estimate (no pooling)")
    ax.set_ylabel("posterior group mean (partial pooling)")
    ax.set_title(f"Shrinkage of {key}" + ("" if name == inspection.INTERCEPT else f": {name}"))
    ax.legend(loc="upper left")
    return ax


def group_effects(obj, factor=None, level: float = 0.95, ax=None, *, term=None):
    """Each group's offset with its central interval, ordered by posterior mean.

    Only groups seen in training are drawn (the others sit at the prior). Level labels are
    written on the axis when there are at most 40 groups. For a factor with random slopes,
    `term` chooses the coefficient drawn: the intercept by default, or a slope column, whose
    per-group offsets from the fixed slope are drawn (`inspection.group_effects(...,
    term=term)`).

    Args:
        obj: a Keras model built from reffects layers, or a fitted `RandomEffectsRegressor`.
        factor: the grouping factor; None when there is only one.
        level: probability mass of the intervals.
        ax: the matplotlib Axes to draw on.
        term: the term of a factor with random slopes; None: the first (the intercept).
            For a classifier of K > 2 classes, a class after `classes_[0]` (None: the
            first of them).

    Returns:
        The Axes, holding one collection (the intervals) and two lines (the means, zero).

    Example:
        >>> import matplotlib.pyplot as plt
        >>> from reffects.models import build_mixed_model
        >>> model = build_mixed_model(num_features=0, num_groups=[3])
        >>> model.get_layer("mixed_model").get_layer("random_intercept_0").adapt([0, 1, 2])
        >>> ax = group_effects(model, ax=plt.figure().gca())
        >>> len(ax.collections), len(ax.lines)
        (1, 2)
        >>> plt.close(ax.figure)
    """
    ax = _axes(ax)
    table = inspection.group_effects(obj, factor, level=level, term=term)
    key = inspection.factors(obj)[0] if factor is None else factor
    table = table[table["n"] > 0].sort_values("mean")
    position = np.arange(len(table))
    ax.hlines(position, table["lower"], table["upper"], color="C0", alpha=0.5, linewidth=1)
    ax.plot(table["mean"], position, "o", color="C0", markersize=3, label="posterior mean")
    ax.axvline(0.0, color="0.5", linestyle="--", linewidth=1)
    if len(table) <= 40:
        ax.set_yticks(position, [str(label) for label in table.index])
    else:
        ax.set_yticks([])
    ax.set_ylabel(f"{key} (ordered by posterior mean)")
    is_slope = term is not None and str(term) != inspection.INTERCEPT
    what = f"offset of the slope of {term}" if is_slope else "group offset"
    if inspection.is_multinomial(obj):  # a class's log odds against the first
        label = obj.classes_[1] if term is None else term
        is_slope, what = False, f"offset of the log odds of {label} vs {obj.classes_[0]}"
    ax.set_xlabel(f"{what}, posterior mean and {_percent(level)} interval")
    title = f"{key}, {term}" if is_slope else str(key)
    ax.set_title(f"Group effects: {title} ({len(table)} groups)")
    return ax


def fixed_effects(obj, level: float = 0.95, include_intercept: bool = False, ax=None):
    """The posterior of each fixed effect: its mean and central interval, one row per term.

    Args:
        obj: a Keras model built from reffects layers, or a fitted `RandomEffectsRegressor`.
        level: probability mass of the intervals.
        include_intercept: also draw the global intercept (often on another scale).
        ax: the matplotlib Axes to draw on.

    Returns:
        The Axes, holding one collection (the intervals) and two lines (the means, zero).

    Example:
        >>> import matplotlib.pyplot as plt
        >>> from reffects.models import build_mixed_model
        >>> model = build_mixed_model(num_features=3, num_groups=[2])
        >>> ax = fixed_effects(model, ax=plt.figure().gca())
        >>> [label.get_text() for label in ax.get_yticklabels()]
        ['x0', 'x1', 'x2']
        >>> plt.close(ax.figure)
    """
    ax = _axes(ax)
    table = inspection.fixed_effects(obj, level)
    if not include_intercept:
        table = table.drop(index=inspection.INTERCEPT, errors="ignore")
    position = np.arange(len(table))
    ax.hlines(position, table["lower"], table["upper"], color="C0", linewidth=2)
    ax.plot(table["mean"], position, "o", color="C0", label="posterior mean")
    ax.axvline(0.0, color="0.5", linestyle="--", linewidth=1)
    ax.set_yticks(position, list(table.index))
    ax.set_ylim(len(table) - 0.5, -0.5)
    ax.set_xlabel(f"coefficient, posterior mean and {_percent(level)} interval")
    ax.set_title("Fixed effects")
    return ax


def residuals(obj, X, y, bins: int = 40, ax=None):
    """A histogram of the residuals y - prediction, with the fitted noise density.

    For a Gaussian likelihood the Normal(0, noise scale) density is drawn over the histogram:
    residuals wider or skewed against it point to structure the model misses.

    Args:
        obj: a fitted `RandomEffectsRegressor` or an `ELBOModel`.
        X, y: data, as given to `predict` and `fit`.
        bins: number of histogram bins.
        ax: the matplotlib Axes to draw on.

    Returns:
        The Axes, holding `bins` bars and, for a Gaussian likelihood, one line.

    Example:
        >>> import matplotlib.pyplot as plt
        >>> from reffects.models import build_mixed_model
        >>> model = build_mixed_model(num_features=0, num_groups=[2])
        >>> X, y = np.array([0, 1, 1]), np.array([0.5, -1.0, 0.2])
        >>> ax = residuals(model, X, y, bins=5, ax=plt.figure().gca())
        >>> len(ax.patches), len(ax.lines)
        (5, 1)
        >>> plt.close(ax.figure)
    """
    ax = _axes(ax)
    values = inspection.residuals(obj, X, y)
    mae = float(np.mean(np.abs(values)))
    ax.hist(values, bins=bins, density=True, color="C0", alpha=0.6, label=f"MAE {mae:.3g}")
    components = inspection.variance_components(obj)
    factor = components.index.get_level_values(0)  # (factor, term) with random slopes
    if inspection.RESIDUAL in factor:
        noise = float(components["sd"][factor == inspection.RESIDUAL].iloc[0])
        grid = np.linspace(values.min(), values.max(), 200)
        density = np.exp(-0.5 * (grid / noise) ** 2) / (noise * math.sqrt(2.0 * math.pi))
        ax.plot(grid, density, color="C3", label=f"Normal(0, {noise:.3g})")
    ax.set_xlabel("residual (y - posterior-mean prediction)")
    ax.set_ylabel("density")
    ax.legend(loc="upper right")
    return ax


def history(obj, ax=None):
    """Training curves: the loss (negative ELBO per example) and its NLL and KL / N parts.

    On one Axes, so which part dominates is plain. Validation curves, if any, are dashed.

    Args:
        obj: a fitted `RandomEffectsRegressor`, a Keras model after `fit`, the `History`
            that `fit` returned, or its `history` dict.
        ax: the matplotlib Axes to draw on.

    Returns:
        The Axes, holding one line per curve.

    Raises:
        ValueError: without a history, or with an empty one: an estimator without a
            subnetwork runs no SGD unless `epochs` (or `early_stopping`) asks for it.

    Example:
        >>> import matplotlib.pyplot as plt
        >>> curves = {"loss": [1.0, 0.6], "nll": [0.9, 0.55], "kl": [0.1, 0.05]}
        >>> ax = history(curves, ax=plt.figure().gca())
        >>> [line.get_label() for line in ax.lines]
        ['loss = -ELBO / N', 'NLL', 'KL / N']
        >>> plt.close(ax.figure)
    """
    ax = _axes(ax)
    curves = obj if isinstance(obj, dict) else inspection.training_history(obj)
    if curves is None:
        raise ValueError(
            f"{type(obj).__name__} has no training history; fit it first or pass the "
            "History that `fit` returned."
        )
    if not curves:
        raise ValueError(
            f"no SGD ran: this {type(obj).__name__} has an empty training history (an "
            "estimator without a subnetwork is solved exactly by its finish, so it runs no "
            "SGD by default); pass epochs=... (e.g. epochs=20) to run the ELBO warm start and "
            "record its curves."
        )
    labels = {"loss": "loss = -ELBO / N", "nll": "NLL", "kl": "KL / N"}
    for color, (name, label) in enumerate(labels.items()):
        for prefix, style in (("", "-"), ("val_", "--")):
            if prefix + name in curves:
                values = np.asarray(curves[prefix + name], dtype="float64")
                epochs = np.arange(1, len(values) + 1)
                text = label if not prefix else f"validation {label}"
                ax.plot(epochs, values, style, color=f"C{color}", label=text)
    ax.set_xlabel("epoch")
    ax.set_ylabel("per training example")
    ax.set_title("Training history")
    ax.legend(loc="upper right")
    return ax
