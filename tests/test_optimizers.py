import keras
import numpy as np
import tensorflow as tf

from reffects import LazyAdam


def test_lazy_adam_touches_only_the_gradient_rows_and_matches_adam_there():
    start = np.arange(8, dtype="float32").reshape(4, 2)
    lazy_variable, dense_variable = keras.Variable(start), keras.Variable(start)
    lazy, dense = LazyAdam(0.1), keras.optimizers.Adam(0.1)
    rows = tf.constant([2, 0, 2])  # row 2 twice: its gradients add up
    values = tf.constant([[1.0, -2.0], [0.5, 0.5], [1.0, 1.0]])
    for _ in range(3):
        lazy.apply_gradients([(tf.IndexedSlices(values, rows, [4, 2]), lazy_variable)])
        dense_gradient = tf.convert_to_tensor(tf.IndexedSlices(values, rows, [4, 2]))
        dense.apply_gradients([(dense_gradient, dense_variable)])
    lazy_now, dense_now = lazy_variable.numpy(), dense_variable.numpy()
    # Rows with a gradient at every step follow Adam. The two differ by float32 round-off,
    # mostly from Adam's bias correction: 1 - 0.999^t in float32 is off by ~1e-5 relative.
    np.testing.assert_allclose(lazy_now[[0, 2]], dense_now[[0, 2]], rtol=2e-5)
    # Rows never touched do not move at all.
    np.testing.assert_array_equal(lazy_now[[1, 3]], start[[1, 3]])


def test_lazy_adam_config_round_trips():
    config = LazyAdam(0.01).get_config()
    assert "amsgrad" not in config
    assert LazyAdam.from_config(config).learning_rate == LazyAdam(0.01).learning_rate
