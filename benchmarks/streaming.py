"""Training from CSV files on disk through tf.data: memory stays flat as the rows grow.

    python benchmarks/streaming.py [--rows 1000000 4000000] [--groups 10000] [--epochs 1]

For each size, a fresh process writes the rows as CSV files to a temporary directory (in
chunks, never whole in memory), counts each group's rows in one streamed pass over the group
column (`RandomIntercept.adapt` on a dataset, i.e. `reffects.count_groups`), then fits
`ELBOModel(num_examples=N)` from a `tf.data` pipeline that parses batches of lines. N is
stated (the number of rows written) and `fit` checks that the counts sum to it. Peak
resident memory (VmHWM, reset between phases through /proc/self/clear_refs) is read for the
counting pass and for training; the in-memory path would instead hold every row as arrays.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import pandas as pd  # noqa: E402
from problems import grouped_regression_chunks, reffects_model  # noqa: E402
from results import append, markdown  # noqa: E402

MB = 2**20


def peak_rss_mb(reset=False):
    """Peak resident memory of this process since the last reset, in MB (Linux)."""
    with open("/proc/self/status") as handle:
        kilobytes = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM"))
    if reset:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current resident size
    return kilobytes * 1024 / MB


def write_csv(directory, num_rows, num_groups, num_features, chunk_rows):
    """Writes one CSV file (with a header) per chunk; returns the paths."""
    paths = []
    chunks = grouped_regression_chunks(num_rows, num_groups, num_features, chunk_rows)
    for index, (features, groups, y) in enumerate(chunks):
        frame = pd.DataFrame(features, columns=[f"x{j}" for j in range(num_features)])
        frame["g"], frame["y"] = groups, y
        path = Path(directory) / f"part-{index:04d}.csv"
        frame.to_csv(path, index=False, float_format="%.6g")
        paths.append(str(path))
    return paths


def csv_lines(paths, batch_size):
    """Batches of CSV lines, read from a few files at a time (header lines skipped)."""
    import tensorflow as tf

    files = tf.data.Dataset.from_tensor_slices(paths)
    lines = files.interleave(
        lambda path: tf.data.TextLineDataset(path).skip(1),
        cycle_length=4,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    )
    return lines.batch(batch_size)


def group_ids(paths, num_features, batch_size):
    """The group column alone, parsed from the same files."""
    import tensorflow as tf

    def parse(lines):
        return tf.io.decode_csv(lines, [tf.constant(0, "int64")], select_cols=[num_features])[0]

    return csv_lines(paths, batch_size).map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def training_stream(paths, num_features, batch_size):
    """Batches of ((features, group ids), y)."""
    import tensorflow as tf

    defaults = [0.0] * num_features + [tf.constant(0, "int64"), 0.0]

    def parse(lines):
        fields = tf.io.decode_csv(lines, defaults)
        return (tf.stack(fields[:num_features], axis=1), fields[num_features]), fields[-1]

    stream = csv_lines(paths, batch_size).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    return stream.prefetch(tf.data.AUTOTUNE)


def measure(num_rows, args):
    """Writes, counts and trains at one size in this process; returns one table row."""
    import keras

    keras.utils.set_random_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        paths = write_csv(directory, num_rows, args.groups, args.features, args.chunk_rows)
        write_seconds = time.perf_counter() - start
        csv_mb = sum(os.path.getsize(path) for path in paths) / MB

        model = reffects_model(args.features, args.groups, num_examples=num_rows)
        layer = next(lay for lay in model.network.layers if lay.name.startswith("random"))
        peak_rss_mb(reset=True)
        start = time.perf_counter()
        layer.adapt(group_ids(paths, args.features, args.batch_size))
        count_seconds = time.perf_counter() - start
        count_peak = peak_rss_mb(reset=True)

        start = time.perf_counter()
        history = model.fit(
            training_stream(paths, args.features, args.batch_size),
            epochs=args.epochs,
            verbose=0,
        )
        fit_seconds = time.perf_counter() - start
        fit_peak = peak_rss_mb()
    return {
        "rows": f"{num_rows:,}",
        "CSV MB": csv_mb,
        "write s": write_seconds,
        "count s": count_seconds,
        "count rows/s": num_rows / count_seconds,
        "fit s": fit_seconds,
        "fit rows/s": num_rows * args.epochs / fit_seconds,
        "final loss": history.history["loss"][-1],
        "peak RSS count MB": count_peak,
        "peak RSS fit MB": fit_peak,
        "arrays in memory MB": num_rows * (4 * args.features + 8 + 4) / MB,
    }


def measure_in_fresh_process(num_rows, argv):
    """`measure` in a child process, so that no size inherits another's memory."""
    command = [sys.executable, __file__, *argv, "--rows", str(num_rows), "--child"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--groups", type=int, default=10_000)
    parser.add_argument("--features", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--chunk-rows", type=int, default=250_000, help="rows per CSV file")
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="measure every size in this process (quicker; later peaks include earlier ones)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.rows[0], args)))
        return
    shared = [arg for arg in argv if arg not in ("--no-append", "--same-process")]
    shared = _without_option(shared, "--rows")
    rows = [
        measure(n, args) if args.same_process else measure_in_fresh_process(n, shared)
        for n in args.rows
    ]
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format="{:,.1f}".format))
    if not args.no_append:
        append(
            f"Streaming from CSV files ({args.groups:,} groups, {args.features} features, "
            f"batch {args.batch_size})",
            markdown(table, "{:,.1f}"),
            "Each size in a fresh process: CSV written in chunks to a temporary directory, "
            "one streamed pass over the group column for the counts (`RandomIntercept.adapt` "
            f"on a dataset), then {args.epochs} epoch(s) of `fit` from tf.data with N stated. "
            "Peak RSS is VmHWM, reset between the counting pass and training; it includes "
            "TensorFlow itself. 'arrays in memory' is what the in-memory path would hold for "
            "the data alone (float32 features and y, int64 ids).",
        )


def _without_option(argv, option):
    """`argv` less `option` and the values that follow it."""
    kept, skipping = [], False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg == option
        if not skipping:
            kept.append(arg)
    return kept


if __name__ == "__main__":
    main()
