"""The scikit-learn example runs at small size, so it cannot rot."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_sklearn_pipeline_example_runs(capsys):
    search = _load("sklearn_pipeline").main(["--rows", "600", "--epochs", "2"])
    assert len(search.cv_results_["params"]) == 4
    assert "identical after pickling: True" in capsys.readouterr().out
