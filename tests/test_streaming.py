import keras
import numpy as np
import pytest
import tensorflow as tf

from reffects import ELBOModel, FixedEffects, GlobalIntercept, RandomIntercept, count_groups
from reffects.models import build_mixed_model

NUM_GROUPS = 20


def _data(num_rows=1200, seed=0):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, NUM_GROUPS, num_rows)
    features = rng.normal(size=(num_rows, 2)).astype("float32")
    y = rng.normal(0.0, 0.8, NUM_GROUPS)[groups] + features @ [0.5, -0.25]
    return features, groups, (y + rng.normal(0.0, 1.0, num_rows)).astype("float32")


def _model(num_examples=None):
    x = keras.Input(shape=(2,), name="x")
    g = keras.Input(shape=(), dtype="int64", name="g")
    eta = keras.layers.Add()(
        [
            GlobalIntercept(seed=1)(x),
            RandomIntercept(NUM_GROUPS, seed=2, name="group")(g),
            FixedEffects(seed=3)(x),
        ]
    )
    model = ELBOModel(keras.Model([x, g], eta), num_examples=num_examples)
    model.compile(optimizer=keras.optimizers.Adam(0.02))
    return model


def _write_csv_files(directory, features, groups, y, num_files=3):
    """Rows split over `num_files` CSV files with a header (9 digits: float32 exactly)."""
    paths = []
    for index, rows in enumerate(np.array_split(np.arange(len(y)), num_files)):
        path = directory / f"part-{index}.csv"
        lines = ["x0,x1,g,y"] + [
            f"{features[i, 0]:.9g},{features[i, 1]:.9g},{groups[i]},{y[i]:.9g}" for i in rows
        ]
        path.write_text("\n".join(lines) + "\n")
        paths.append(str(path))
    return paths


def _csv_stream(paths, batch_size):
    """Batches of ((x, g), y) parsed from the files in order, one batch of lines at a time."""
    defaults = [0.0, 0.0, tf.constant(0, "int64"), 0.0]

    def parse(lines):
        x0, x1, g, y = tf.io.decode_csv(lines, record_defaults=defaults)
        return (tf.stack([x0, x1], axis=1), g), y

    lines = tf.data.Dataset.from_tensor_slices(paths).flat_map(
        lambda path: tf.data.TextLineDataset(path).skip(1)
    )
    return lines.batch(batch_size).map(parse)


def test_count_groups_counts_a_batched_stream():
    ids = np.random.default_rng(0).integers(0, 7, 1000)
    counts = count_groups(tf.data.Dataset.from_tensor_slices(ids).batch(64), num_groups=9)
    np.testing.assert_array_equal(counts, np.bincount(ids, minlength=9))
    assert counts.dtype == np.int64 and counts.sum() == 1000


@pytest.mark.parametrize("bad", [-1, 9])
def test_count_groups_rejects_out_of_range_ids(bad):
    ids = tf.data.Dataset.from_tensor_slices(np.array([0, 3, bad, 2])).batch(3)
    with pytest.raises(ValueError, match=f"group id {bad} is out of range for num_groups=9"):
        count_groups(ids, num_groups=9)


def test_count_groups_rejects_float_ids_and_bad_num_groups():
    floats = tf.data.Dataset.from_tensor_slices(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="integer group id tensors"):
        count_groups(floats, num_groups=3)
    ids = tf.data.Dataset.from_tensor_slices(np.array([0, 1]))
    with pytest.raises(ValueError, match="Received: num_groups=0"):
        count_groups(ids, num_groups=0)


def test_adapt_from_a_stream_equals_adapt_from_an_array():
    ids = np.random.default_rng(1).integers(0, 5, 300)
    from_array, from_stream = RandomIntercept(5), RandomIntercept(5)
    from_array.adapt(ids)
    from_stream.adapt(tf.data.Dataset.from_tensor_slices(ids).batch(50))
    np.testing.assert_array_equal(from_stream.group_counts.numpy(), from_array.group_counts.numpy())


def test_fit_from_csv_files_with_stated_n_equals_the_in_memory_fit(tmp_path):
    features, groups, y = _data()
    paths = _write_csv_files(tmp_path, features, groups, y)
    stream = _csv_stream(paths, batch_size=100)

    streamed = _model(num_examples=len(y))
    streamed.network.get_layer("group").adapt(stream.map(lambda inputs, target: inputs[1]))
    # Repeated with stated steps: an epoch that ends when a stream of unknown length runs dry
    # runs one more, failing step, which still advances the layers' seed generators.
    streamed.fit(stream.repeat(), epochs=3, steps_per_epoch=12, verbose=0)
    in_memory = _model()
    in_memory.fit([features, groups], y, batch_size=100, epochs=3, shuffle=False, verbose=0)

    assert float(streamed.training_size) == len(y)
    layer = streamed.network.get_layer("group")
    np.testing.assert_array_equal(layer.group_counts.numpy(), np.bincount(groups))
    # Same rows in the same batches with the same seeds: the same computation up to float32
    # rounding (the CSV holds each float32 exactly), so the weights agree to ~1e-6.
    for streamed_weight, weight in zip(streamed.weights, in_memory.weights):
        np.testing.assert_allclose(np.asarray(streamed_weight), np.asarray(weight), atol=1e-5)


def test_fit_rejects_counts_that_do_not_sum_to_the_stated_n():
    features, groups, y = _data(200)
    model = _model(num_examples=150)
    model.network.get_layer("group").adapt(groups)
    stream = tf.data.Dataset.from_tensor_slices(((features, groups), y)).batch(50)
    with pytest.raises(ValueError, match="adapted on 200 rows but fit trains on N=150"):
        model.fit(stream, epochs=1, verbose=0)


def test_a_poisson_rate_with_an_offset_trains_from_a_stream():
    # lme4's offset(log(exposure)) in the Keras workflow: `build_mixed_model(offset=True)`
    # takes the offset as its last input, which a stream feeds like any other column.
    rng = np.random.default_rng(3)
    num_rows = 2000
    groups = rng.integers(0, NUM_GROUPS, num_rows)
    features = rng.normal(size=(num_rows, 1)).astype("float32")
    exposure = rng.uniform(1.0, 20.0, num_rows)
    rate = np.exp(-1.0 + 0.3 * features[:, 0] + rng.normal(0.0, 0.3, NUM_GROUPS)[groups])
    y = rng.poisson(exposure * rate).astype("float32")
    offset = np.log(exposure).astype("float32")

    def model(num_examples=None):
        fitted = build_mixed_model(
            1, [NUM_GROUPS], likelihood="poisson", offset=True, seed=0, num_examples=num_examples
        )
        fitted.compile(optimizer=keras.optimizers.Adam(0.05))
        return fitted

    streamed = model(num_examples=num_rows)
    streamed.network.get_layer("random_intercept_0").adapt(
        tf.data.Dataset.from_tensor_slices(groups).batch(500)
    )
    stream = tf.data.Dataset.from_tensor_slices(((features, groups, offset), y)).batch(100)
    streamed.fit(stream.repeat(), epochs=15, steps_per_epoch=20, verbose=0)
    in_memory = model()
    in_memory.fit(
        [features, groups, offset], y, batch_size=100, epochs=15, shuffle=False, verbose=0
    )
    # the same batches and seeds: the same computation to float32 rounding
    for streamed_weight, weight in zip(streamed.weights, in_memory.weights):
        np.testing.assert_allclose(np.asarray(streamed_weight), np.asarray(weight), atol=1e-5)
    # the offset is used: at offset 0 the model predicts each row's rate, not its count
    # (whose log is ~2 higher on average); each of 20 groups has ~100 rows of mean count ~4,
    # so its rate is known to ~5%, and the SGD fit's log rates sit within 0.15 of the truth
    predicted = streamed.predict([features, groups, np.zeros_like(offset)], verbose=0)
    error = np.abs(np.log(np.ravel(predicted)) - np.log(rate))
    assert np.median(error) < 0.15, np.median(error)
