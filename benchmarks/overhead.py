"""Epoch time of a reffects model vs the plain Keras model with the same structure.

    python benchmarks/overhead.py [--rows 400000] [--groups 10000] [--rounds 15]

Plain Keras: `Embedding(num_groups, 1)` + `Dense(1)` on MSE. reffects: `GlobalIntercept` +
`RandomIntercept` + `FixedEffects` on the ELBO. Same data, batch size and optimizer (Adam);
the two fit one epoch each in turn (`problems.alternating_epoch_seconds`), and the table
quotes the median epoch times, their ratio and the spread of the per-round ratios.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from problems import (  # noqa: E402
    alternating_epoch_seconds,
    grouped_regression,
    plain_keras_model,
    reffects_model,
)
from results import append, markdown  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--groups", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=15, help="timed epochs per model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    features, groups, y = grouped_regression(args.rows, args.groups)
    rows = []
    for batch_size in args.batch_sizes:
        runs = {
            name: (build(features.shape[1], args.groups), [features, groups], y)
            for name, build in (("plain Keras", plain_keras_model), ("reffects", reffects_model))
        }
        times = alternating_epoch_seconds(runs, batch_size, args.rounds)
        plain, ours = np.array(times["plain Keras"]), np.array(times["reffects"])
        low, high = np.percentile(ours / plain, [25, 75])
        rows.append(
            {
                "batch size": batch_size,
                "plain Keras s/epoch": np.median(plain),
                "reffects s/epoch": np.median(ours),
                "ratio": np.median(ours) / np.median(plain),
                "per-round ratio, middle half": f"{low:.2f}-{high:.2f}",
                "reffects rows/s": args.rows / np.median(ours),
            }
        )
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format="{:.3f}".format))
    if not args.no_append:
        append(
            f"Overhead over plain Keras ({args.rows:,} rows, {args.groups:,} groups)",
            markdown(table, "{:.3f}"),
            f"Medians of {args.rounds} epochs per model, fitted one epoch each in turn after an "
            "untimed first epoch; 'middle half' is the interquartile range of the ratios of "
            "the two epochs of each round. Goal: ratio <= 1.3.",
        )


if __name__ == "__main__":
    main()
