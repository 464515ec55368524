"""Epoch time of a reffects model vs the plain Keras model with the same structure.

    python benchmarks/overhead.py [--rows 400000] [--groups 10000] [--epochs 4] [--repeats 3]

Plain Keras: `Embedding(num_groups, 1)` + `Dense(1)` on MSE. reffects: `GlobalIntercept` +
`RandomIntercept` + `FixedEffects` on the ELBO. Same data, batch size and optimizer; the two
are fitted alternately and the table quotes medians of the per-run median epoch times.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from problems import (  # noqa: E402
    epoch_seconds,
    grouped_regression,
    plain_keras_model,
    reffects_model,
)
from results import append, markdown  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--groups", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    features, groups, y = grouped_regression(args.rows, args.groups)
    rows = []
    for batch_size in args.batch_sizes:
        times = {"plain Keras": [], "reffects": []}
        for _ in range(args.repeats):
            for name, build in (("plain Keras", plain_keras_model), ("reffects", reffects_model)):
                model = build(features.shape[1], args.groups)
                times[name].append(
                    epoch_seconds(model, features, groups, y, batch_size, args.epochs)
                )
        plain, ours = np.median(times["plain Keras"]), np.median(times["reffects"])
        rows.append(
            {
                "batch size": batch_size,
                "plain Keras s/epoch": plain,
                "reffects s/epoch": ours,
                "ratio": ours / plain,
                "reffects rows/s": args.rows / ours,
            }
        )
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format="{:.3f}".format))
    if not args.no_append:
        append(
            f"Overhead over plain Keras ({args.rows:,} rows, {args.groups:,} groups)",
            markdown(table, "{:.3f}"),
            f"Median over {args.repeats} alternating runs of the median epoch time "
            f"(epochs 2-{args.epochs}). Goal: ratio <= 1.3.",
        )


if __name__ == "__main__":
    main()
