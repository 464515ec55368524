"""Shared by the benchmark scripts: describe the machine and append a table to RESULTS.md."""

import datetime
import os
import platform
import sys
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    import keras
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}"
    )


def markdown(frame, float_format="{:.4f}") -> str:
    """A DataFrame as a GitHub markdown table (no extra dependency); missing cells are blank."""

    def cell(value):
        if pd.isna(value):
            return ""
        return float_format.format(value) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |"]
    lines.append("|" + "---|" * len(frame.columns))
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def append(title: str, table_markdown: str, notes: str = "") -> None:
    """Appends one dated section with the command that made it."""
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = f"\n## {title}\n\n{stamp} · {machine()}\n\n`{command}`\n\n{table_markdown}\n" + (
        f"\n{notes}\n" if notes else ""
    )
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nEach section is appended by the script named in it.\n"
        )
    with RESULTS.open("a") as handle:
        handle.write(section)
