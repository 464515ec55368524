"""ELBOModel under tf.distribute strategies trains as it does on one device.

Each strategy runs `tests/distributed_run.py` in fresh processes (logical devices and
TF_CONFIG must be set before TensorFlow starts); the single-device reference runs here. All
runs see the same global batches in the same order, trained by SGD, so a loss scaled by the
wrong number of replicas (or a KL counted once per replica) changes the reported losses and
the weights.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

SCRIPT = Path(__file__).with_name("distributed_run.py")
ROOT = SCRIPT.parents[1]
TIMEOUT_SECONDS = 240


def _environment(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _run(mode, output, **env):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), mode, str(output)],
        env=_environment(**env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(output))


@pytest.fixture(scope="module")
def single_device():
    spec = importlib.util.spec_from_file_location("distributed_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.train(tf.distribute.get_strategy())


def _assert_same_training(run, reference):
    assert int(run["replicas"]) == 2
    assert float(run["training_size"]) == 512
    np.testing.assert_array_equal(run["group_counts"], reference["group_counts"])
    # The layers draw noise of scale 2e-5 in training, independently per replica, so the
    # per-step losses differ by the noise's effect (measured <= 2e-5) plus float32 rounding
    # of sums taken in another order; a wrong replica scaling would double them.
    for key in ("loss", "nll", "kl"):
        np.testing.assert_allclose(run[key], reference[key], atol=1e-4, err_msg=key)
    np.testing.assert_allclose(run["evaluate"], reference["evaluate"], atol=1e-4)
    # Eight SGD steps of size <= 0.05 * gradient: weights agree to ~1e-6 (measured); twice
    # the gradient would move the intercept and coefficients by about 0.1.
    weights = sorted(key for key in reference if key.startswith("weight_"))
    for key in weights:
        np.testing.assert_allclose(run[key], reference[key], atol=2e-5, err_msg=key)


@pytest.mark.slow  # 19 s on 2 cores: in CI's slow run
def test_mirrored_strategy_on_two_logical_cpus_matches_one_device(single_device, tmp_path):
    mirrored = _run("mirrored", tmp_path / "mirrored.npz")
    _assert_same_training(mirrored, single_device)
    # The two replicas draw different training noise from the same seed generator.
    first, second = mirrored["replica_noise"]
    assert not np.allclose(first, second)


def _free_loopback_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.mark.slow
def test_multi_worker_mirrored_strategy_with_two_local_workers_matches_one_device(
    single_device, tmp_path
):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_loopback_ports(2)]}
    workers = []
    try:
        for index in range(2):
            config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            workers.append(
                subprocess.Popen(
                    [sys.executable, str(SCRIPT), "multi_worker", str(tmp_path / f"{index}.npz")],
                    env=_environment(TF_CONFIG=config),
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for worker in workers:
            _, stderr = worker.communicate(timeout=TIMEOUT_SECONDS)
            assert worker.returncode == 0, stderr[-3000:]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    runs = [dict(np.load(tmp_path / f"{index}.npz")) for index in range(2)]
    for run in runs:
        _assert_same_training(run, single_device)
    assert not np.allclose(runs[0]["replica_noise"], runs[1]["replica_noise"])
