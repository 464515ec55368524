"""TensorFlow's C++ start-up lines stay out of stderr (see `reffects/_startup.py`)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reffects._startup import native_stderr_hidden

ROOT = Path(__file__).resolve().parents[1]
# absl / glog records, as C++ writes them: "I0000 00:00:1796051839.116725    5440 port.cc:153] ..."
NATIVE_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]")
NOISE = ("cuDNN", "absl", "computation placer")


def _stderr_of(*args):
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the user sets nothing: reffects' default applies
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result.stdout, result.stderr


def _assert_quiet(stderr):
    for line in stderr.splitlines():
        assert not NATIVE_LOG_LINE.match(line), line
        assert not any(word in line for word in NOISE), line


def test_importing_reffects_writes_no_start_up_lines():
    _, stderr = _stderr_of("-c", "import reffects")
    _assert_quiet(stderr)


@pytest.mark.slow
def test_the_demo_prints_only_its_own_output():
    stdout, stderr = _stderr_of(
        "-m", "reffects.demo", "--rows", "1000", "--zipcodes", "20", "--epochs", "2"
    )
    _assert_quiet(stderr)
    assert "validation MAE" in stdout


def test_only_native_writes_are_hidden(capfd, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    with native_stderr_hidden():
        os.write(2, b"from C++\n")
        print("from Python", file=sys.stderr, flush=True)
    os.write(2, b"after\n")
    assert capfd.readouterr().err.splitlines() == ["from Python", "after"]


def test_hidden_writes_come_back_when_the_block_fails(capfd, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    with pytest.raises(ImportError), native_stderr_hidden():
        os.write(2, b"why it failed\n")
        raise ImportError("no")
    assert "why it failed" in capfd.readouterr().err


def test_a_low_log_level_hides_nothing(capfd, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    with native_stderr_hidden():
        os.write(2, b"from C++\n")
    assert capfd.readouterr().err == "from C++\n"
