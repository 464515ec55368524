"""Epoch time at the same number of rows with 1,000 vs 1,000,000 groups.

    python benchmarks/groups_scale.py [--rows 400000] [--groups 1000 1000000] [--rounds 9]

Per-step work must not grow with the number of groups: a batch gathers, samples, charges KL
to and (through IndexedSlices) differentiates only its own groups. Keras's Adam still
densifies the update, so some cost per group remains; this measures how much.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from problems import alternating_epoch_seconds, grouped_regression, reffects_model  # noqa: E402
from results import append, markdown  # noqa: E402

from reffects.optimizers import LazyAdam  # noqa: E402

OPTIMIZERS = {"Adam": lambda: keras.optimizers.Adam(0.01), "LazyAdam": lambda: LazyAdam(0.01)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--groups", type=int, nargs="+", default=[1_000, 1_000_000])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=9, help="timed epochs per model")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    data = {g: grouped_regression(args.rows, g) for g in args.groups}
    cells = [(name, g) for name in OPTIMIZERS for g in args.groups]
    runs = {
        (name, g): (
            reffects_model(data[g][0].shape[1], g, optimizer=OPTIMIZERS[name]()),
            [data[g][0], data[g][1]],
            data[g][2],
        )
        for name, g in cells
    }
    times = alternating_epoch_seconds(runs, args.batch_size, args.rounds)
    weight_bytes = {
        g: sum(int(np.prod(w.shape)) * 4 for w in runs[cells[0][0], g][0].weights)
        for g in args.groups
    }
    table = pd.DataFrame(
        [
            {
                "optimizer": name,
                "groups": f"{g:,}",
                "s/epoch": np.median(times[name, g]),
                "ratio to first": np.median(times[name, g])
                / np.median(times[name, args.groups[0]]),
                "model weights MB": weight_bytes[g] / 1e6,
            }
            for name, g in cells
        ]
    )
    print(table.to_string(index=False, float_format="{:.3f}".format))
    if not args.no_append:
        append(
            f"Groups scale ({args.rows:,} rows, batch {args.batch_size})",
            markdown(table, "{:.3f}"),
            f"Medians of {args.rounds} epochs per model, the four fitted one epoch each in "
            "turn after an untimed first epoch. Goal: ratio <= 1.5; weights grow linearly in "
            "groups. "
            "Keras's Adam densifies the sparse gradient of the offsets and updates every "
            "group every step; reffects.optimizers.LazyAdam updates only the batch's rows.",
        )


if __name__ == "__main__":
    main()
