"""The founding housing analysis, end to end, on the bundled housing-style simulated data.

    python examples/housing.py --output-dir housing_figures [--rows 30000] [--zipcodes 300]
                               [--epochs N]

Fits a Bayesian linear regression, the same plus zip-code random intercepts, and the same
plus a (32, 16) dense subnetwork; prints the validation MAE table and the mixed model's
summary; and saves to the output folder:

    history.png         loss (negative ELBO per example), NLL and KL / N per epoch, for
                        the fits that ran SGD (the subnetwork's; the others with --epochs)
    fixed_effects.png   posterior density of each coefficient under each model
    residuals.png       validation residuals of each model against its fitted noise density
    group_effects.png   the zip-code offsets with 95% intervals, ordered
    shrinkage.png       posterior zip-code means against their within-zip estimates
    separate_fits.png   random-effects estimates against separate least-squares fits per
                        zip code, for small, medium and large zip codes
"""

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from reffects import inspection, plotting  # noqa: E402
from reffects.demo import (  # noqa: E402
    fit_models,
    housing_split,
    model_columns,
    results_table,
)

FEATURES = ["sqft", "age", "distance"]
MIXED = "+ zip-code random intercepts"


def separate_fits(X, y, min_rows: int) -> pd.DataFrame:
    """Ordinary least squares of y on the features within each zip code with >= min_rows rows.

    Returns the level of each zip code at x = 0 (the fit's intercept) and its row count.
    """
    rows = {}
    targets = np.asarray(y)
    features = X[FEATURES].to_numpy()
    for zipcode, index in X.groupby("zipcode").indices.items():
        if len(index) >= min_rows:
            design = np.column_stack([np.ones(len(index)), features[index]])
            coef, *_ = np.linalg.lstsq(design, targets[index], rcond=None)
            rows[zipcode] = {"separate": coef[0], "n": len(index)}
    return pd.DataFrame.from_dict(rows, orient="index")


def plot_separate_fits(est, X, y, ax_row):
    """Random-effects zip-code levels against per-zip OLS, in three size classes."""
    # Two residual degrees of freedom at least, so every separate fit is determined.
    fits = separate_fits(X, y, min_rows=len(FEATURES) + 3)
    effects = est.random_effects_["zipcode"]
    fits["random_effects"] = est.intercept_ + effects["mean"].reindex(fits.index)
    classes = pd.qcut(fits["n"], 3, labels=["small", "medium", "large"])
    low = fits[["separate", "random_effects"]].min().min()
    high = fits[["separate", "random_effects"]].max().max()
    for ax, name in zip(ax_row, ["small", "medium", "large"]):
        chosen = fits[classes == name]
        ax.scatter(chosen["separate"], chosen["random_effects"], s=12, alpha=0.7, color="C0")
        ax.axline((low, low), slope=1.0, color="0.5", linestyle="--", label="y = x")
        ax.axhline(est.intercept_, color="C3", label="global intercept")
        ax.set_xlim(low - 0.05, high + 0.05)
        ax.set_ylim(low - 0.05, high + 0.05)
        ax.set_title(
            f"{name} zip codes ({chosen['n'].min()}-{chosen['n'].max()} rows, {len(chosen)} zips)"
        )
        ax.set_xlabel("separate least-squares fit per zip code")
    ax_row[0].set_ylabel("random-effects estimate")
    ax_row[0].legend(loc="upper left")


def plot_fixed_effect_posteriors(models: dict, axes):
    """The posterior density of each coefficient under each model, one panel per feature."""
    for color, (name, est) in enumerate(models.items()):
        table = inspection.fixed_effects(est)
        for ax, feature in zip(axes, FEATURES):
            mean, sd = table.loc[feature, ["mean", "sd"]]
            grid = np.linspace(mean - 4 * sd, mean + 4 * sd, 200)
            density = np.exp(-0.5 * ((grid - mean) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
            ax.plot(grid, density, color=f"C{color}", label=name)
            ax.fill_between(grid, density, color=f"C{color}", alpha=0.2)
    for ax, feature in zip(axes, FEATURES):
        ax.set_title(f"coefficient of {feature}")
        ax.set_xlabel("change in log price per unit of the feature")
        ax.set_yticks([])
    axes[0].set_ylabel("posterior density")
    axes[1].legend(loc="upper center", fontsize="small")


def save(figure, folder: Path, name: str):
    figure.tight_layout()
    figure.savefig(folder / name, dpi=110)
    plt.close(figure)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True, type=Path, help="folder for the PNGs")
    parser.add_argument("--rows", type=int, default=30000)
    parser.add_argument("--zipcodes", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=None, help="default: chosen from the data")
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    X_train, y_train, X_valid, y_valid = housing_split(args.rows, args.zipcodes)
    models = fit_models(X_train, y_train, epochs=args.epochs)
    table = results_table(models, X_valid, y_valid)
    with pd.option_context(
        "display.float_format", "{:.4f}".format, "display.width", 120, "display.max_columns", 10
    ):
        print(table, end="\n\n")
    mixed = models[MIXED]
    print(inspection.summary(mixed, X_train, y_train), end="\n\n")

    # Models without a subnetwork are solved exactly and run no SGD unless `--epochs` asks
    trained = {name: est for name, est in models.items() if est.history_}
    figure, axes = plt.subplots(1, len(trained), figsize=(5 * len(trained), 4), squeeze=False)
    for ax, (name, est) in zip(axes[0], trained.items()):
        plotting.history(est, ax=ax).set_title(name)
    save(figure, args.output_dir, "history.png")

    figure, axes = plt.subplots(1, len(FEATURES), figsize=(15, 3.8))
    plot_fixed_effect_posteriors(models, axes)
    save(figure, args.output_dir, "fixed_effects.png")

    figure, axes = plt.subplots(1, 3, figsize=(15, 4), sharex=True, sharey=True)
    for ax, (name, est) in zip(axes, models.items()):
        plotting.residuals(est, model_columns(X_valid, name), y_valid, ax=ax)
        ax.set_title(f"{name} (validation)")
    save(figure, args.output_dir, "residuals.png")

    figure, ax = plt.subplots(figsize=(7, 8))
    plotting.group_effects(mixed, "zipcode", ax=ax)
    save(figure, args.output_dir, "group_effects.png")

    figure, ax = plt.subplots(figsize=(7, 5.5))
    plotting.shrinkage(mixed, X_train, y_train, "zipcode", ax=ax)
    save(figure, args.output_dir, "shrinkage.png")

    figure, axes = plt.subplots(1, 3, figsize=(15, 5), sharex=True, sharey=True)
    plot_separate_fits(mixed, X_train, y_train, axes)
    save(figure, args.output_dir, "separate_fits.png")

    print(f"Figures saved to {args.output_dir} ({time.perf_counter() - start:.1f} s in all)")
    return table


if __name__ == "__main__":
    main()
