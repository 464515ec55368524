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


# The scripts marked slow build 5 to 9 Keras models each even at smoke size (17-80 s on two
# cores): they run with `pytest -m slow` (in CI too); the other benchmark scripts by default.
@pytest.mark.slow
def test_remnn_simulation_smoke(capsys):
    _load("remnn_simulation").main(
        "--rows 1500 --groups 30 --variances 1 --binary-groups 30 --repeats 1 "
        "--epochs-scale 0.01 --no-append".split()
    )
    out = capsys.readouterr().out
    assert "oracle (true f and sigma_b)" in out and "AUC" in out and "test MSE" in out


@pytest.mark.slow
def test_imdb_smoke(capsys):
    imdb = _load("imdb")
    if not (imdb.DEFAULT_DATA / "imdb.csv.gz").exists():
        pytest.skip(f"IMDb data not found at {imdb.DEFAULT_DATA}")
    imdb.main("--rows 1500 --folds 1 --epochs 1 --every-column --no-append".split())
    out = capsys.readouterr().out
    assert "reffects REMNN (defaults, hidden_units=(64, 32))" in out
    assert "on every column" in out and "CatBoost (published" in out


@pytest.mark.slow
def test_subnetwork_guard_smoke(capsys):
    _load("subnetwork_guard").main("--draws 1 --train-rows 600 --epochs 1 --no-append".split())
    out = capsys.readouterr().out
    assert "weight forced to 1" in out and "nonlinear" in out


def test_streaming_smoke(capsys):
    _load("streaming").main(
        "--rows 3000 --groups 50 --chunk-rows 1000 --batch-size 512 --same-process "
        "--no-append".split()
    )
    out = capsys.readouterr().out
    assert "peak RSS fit MB" in out and "3,000" in out


def test_reml_recovery_smoke(capsys):
    _load("reml_recovery").main("--sizes 400 --repeats 1 --no-append".split())
    out = capsys.readouterr().out
    assert "sleepstudy" in out and "reffects defaults" in out


def test_lmm_tools_smoke(capsys):
    _load("lmm_tools").main(
        ["--rows", "3000", "--groups", "100", "--repeats", "1", "--no-append", "--tools"]
        + ["statsmodels MixedLM (REML)", "reffects defaults"]
    )
    assert "sigma vs REML" in capsys.readouterr().out


@pytest.mark.slow
def test_overhead_and_groups_scale_smoke(capsys):
    _load("overhead").main(
        "--rows 4000 --groups 50 --rounds 2 --batch-sizes 1024 --no-append".split()
    )
    _load("groups_scale").main("--rows 4000 --groups 10 1000 --rounds 2 --no-append".split())
    out = capsys.readouterr().out
    assert "per-round ratio" in out and "ratio to first" in out


# Every case's fits at smoke size plus two warm-up fits and mixedlm (lmer and glmer; case
# h's Poisson model past the GLMM's dense limit, about 10 s of it), about 25 s on two cores.
@pytest.mark.slow
def test_finish_speed_smoke(capsys):
    _load("finish_speed").main(["--quick"])
    out = capsys.readouterr().out
    assert "estimator / plain" in out and "mixedlm.lmer (REML)" in out and "finish s" in out
    assert "mixedlm.glmer (Laplace)" in out


# Part 1 at 150 groups and part 2 at 3,000 rows with two epochs, both with mixedlm: about
# 20 s on two cores.
@pytest.mark.slow
def test_random_slopes_smoke(capsys):
    _load("random_slopes").main(["--quick"])
    out = capsys.readouterr().out
    assert "corr (Intercept), x0" in out and "time / lmer" in out
    assert "(a) reffects slopes + (64, 32)" in out and "LMMNN (published" in out


# One problem (100 levels beside 3,000), each path once: about 10 s on two cores.
@pytest.mark.slow
def test_glmm_dense_limit_smoke(capsys):
    _load("glmm_dense_limit").main(["--levels", "100", "--repeats", "1", "--no-append"])
    out = capsys.readouterr().out
    assert "sparse / dense" in out and "max |theta difference|" in out
