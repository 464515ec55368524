"""Bundled data (reedfrogs) and simulators of grouped data."""

from reffects.datasets.bundled import load_reedfrogs
from reffects.datasets.simulate import make_housing, simulate_mixed

__all__ = ["load_reedfrogs", "make_housing", "simulate_mixed"]
