"""The benchmark scripts run end to end at smoke size (tiny data, one epoch, --no-append)."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_remnn_simulation_smoke(capsys):
    _load("remnn_simulation").main(
        "--rows 1500 --groups 30 --variances 1 --binary-groups 30 --repeats 1 "
        "--epochs-scale 0.01 --no-append".split()
    )
    out = capsys.readouterr().out
    assert "oracle (true f and sigma_b)" in out and "AUC" in out and "test MSE" in out


def test_imdb_smoke(capsys):
    imdb = _load("imdb")
    if not (imdb.DEFAULT_DATA / "imdb.csv.gz").exists():
        pytest.skip(f"IMDb data not found at {imdb.DEFAULT_DATA}")
    imdb.main("--rows 1500 --folds 1 --epochs-scale 0.01 --no-append".split())
    out = capsys.readouterr().out
    assert "reffects REMNN (layers, subnetwork on continuous)" in out
    assert "CatBoost (published" in out


def test_streaming_smoke(capsys):
    _load("streaming").main(
        "--rows 3000 --groups 50 --chunk-rows 1000 --batch-size 512 --same-process "
        "--no-append".split()
    )
    out = capsys.readouterr().out
    assert "peak RSS fit MB" in out and "3,000" in out
