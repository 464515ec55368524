"""Trains one small ELBOModel under a tf.distribute strategy and saves what it did.

    python tests/distributed_run.py {single,mirrored,multi_worker} OUTPUT.npz

`single` trains on one device, `mirrored` under `MirroredStrategy` over two logical CPU
devices, `multi_worker` under `MultiWorkerMirroredStrategy` as the worker that TF_CONFIG
names. All three see the same batches in the same order (global batch 64, 8 steps), with
SGD (so a loss scaled by the wrong factor changes the weights, which Adam would hide) and
posterior scales at 2e-5 so the noise drawn in training, which differs across replicas,
moves nothing beyond float32 rounding. `tests/test_distributed.py` runs it in subprocesses,
because logical devices and TF_CONFIG must be set before TensorFlow starts; the
single-device reference also runs in the test's own process through `train`.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

NUM_ROWS, NUM_GROUPS, BATCH_SIZE, STEPS = 512, 20, 64, 8
POSTERIOR_SCALE = 2e-5


def _strategy(mode):
    import tensorflow as tf

    if mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    if mode == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def _data():
    import numpy as np

    rng = np.random.default_rng(0)
    groups = rng.integers(0, NUM_GROUPS, NUM_ROWS)
    features = rng.normal(size=(NUM_ROWS, 2)).astype("float32")
    offsets = rng.normal(0.0, 0.8, NUM_GROUPS)
    y = 1.0 + offsets[groups] + features @ [0.5, -0.25] + rng.normal(0.0, 1.0, NUM_ROWS)
    return features, groups, y.astype("float32")


def _model():
    import keras

    from reffects import ELBOModel, FixedEffects, GlobalIntercept, RandomIntercept

    x = keras.Input(shape=(2,), name="x")
    g = keras.Input(shape=(), dtype="int64", name="g")
    eta = keras.layers.Add()(
        [
            GlobalIntercept(initial_posterior_scale=POSTERIOR_SCALE, seed=1, name="intercept")(x),
            RandomIntercept(
                NUM_GROUPS, initial_posterior_scale=POSTERIOR_SCALE, seed=2, name="group"
            )(g),
            FixedEffects(initial_posterior_scale=POSTERIOR_SCALE, seed=3, name="fixed")(x),
        ]
    )
    model = ELBOModel(keras.Model([x, g], eta), likelihood="gaussian", num_examples=NUM_ROWS)
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    return model


def _replica_noise(strategy):
    """Training noise each local replica draws from one seed generator: (replicas, 4)."""
    import keras
    import tensorflow as tf

    from reffects.posteriors import training_noise

    with strategy.scope():
        generator = keras.random.SeedGenerator(7)
    draws = strategy.run(tf.function(lambda: training_noise((4,), generator)))
    return tf.stack(strategy.experimental_local_results(draws)).numpy()


def train(strategy) -> dict:
    """Trains the model under `strategy`; returns the losses, metrics and weights."""
    import keras
    import numpy as np
    import tensorflow as tf

    features, groups, y = _data()
    with strategy.scope():
        model = _model()
    model.network.get_layer("group").adapt(tf.data.Dataset.from_tensor_slices(groups).batch(100))
    stream = tf.data.Dataset.from_tensor_slices(((features, groups), y)).batch(BATCH_SIZE)
    # One step per epoch, so History holds the loss and metrics of every step.
    history = model.fit(stream.repeat(), epochs=STEPS, steps_per_epoch=1, verbose=0)
    evaluation = model.evaluate(stream, verbose=0, return_dict=True)
    return dict(
        replicas=strategy.num_replicas_in_sync,
        loss=np.array(history.history["loss"]),
        nll=np.array(history.history["nll"]),
        kl=np.array(history.history["kl"]),
        evaluate=np.array([evaluation["loss"], evaluation["nll"], evaluation["kl"]]),
        training_size=keras.ops.convert_to_numpy(model.training_size),
        group_counts=keras.ops.convert_to_numpy(model.network.get_layer("group").group_counts),
        replica_noise=_replica_noise(strategy),
        **{f"weight_{i}": np.asarray(w) for i, w in enumerate(model.network.weights)},
    )


def main(mode, output):
    strategy = _strategy(mode)  # before anything else touches TensorFlow's devices
    import numpy as np

    np.savez(output, **train(strategy))


if __name__ == "__main__":
    main(*sys.argv[1:])
