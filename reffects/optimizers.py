"""An Adam that updates only the rows a sparse gradient touches.

Keras's `Adam` densifies `tf.IndexedSlices`, so every step rewrites every group's offset and
both moment estimates, and momentum keeps moving groups absent from the batch. With many
groups that dominates the step time. `LazyAdam` scatters the update into the touched rows
only (moments of other rows are left as they are, as in TensorFlow Addons' LazyAdam), so a
step costs the same at 1,000 or 1,000,000 groups. Dense gradients get plain Adam.
"""

import keras
import tensorflow as tf
from keras import ops


@keras.saving.register_keras_serializable(package="reffects")
class LazyAdam(keras.optimizers.Adam):
    """Adam with row-sparse updates for `IndexedSlices` gradients (e.g. `RandomIntercept`).

    Takes the arguments of `keras.optimizers.Adam` (without `amsgrad`).

    Example:
        >>> optimizer = LazyAdam(learning_rate=0.01)
        >>> variable = keras.Variable([[1.0], [1.0], [1.0]])
        >>> _ = optimizer.apply_gradients(
        ...     [(tf.IndexedSlices(tf.constant([[1.0]]), tf.constant([1]), [3, 1]), variable)]
        ... )
        >>> [round(float(v), 3) for v in variable.numpy()[:, 0]]
        [1.0, 0.99, 1.0]
    """

    def __init__(self, *args, amsgrad=False, **kwargs):
        if amsgrad:
            raise ValueError("LazyAdam does not support amsgrad. Received: amsgrad=True")
        super().__init__(*args, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        # Sum repeated rows first, so each touched row gets one update.
        rows, position = tf.unique(gradient.indices)
        values = tf.math.unsorted_segment_sum(gradient.values, position, tf.shape(rows)[0])
        values = ops.cast(values, variable.dtype)
        step = ops.cast(self.iterations + 1, variable.dtype)
        beta_1 = ops.cast(self.beta_1, variable.dtype)
        beta_2 = ops.cast(self.beta_2, variable.dtype)
        alpha = (
            ops.cast(learning_rate, variable.dtype)
            * ops.sqrt(1 - ops.power(beta_2, step))
            / (1 - ops.power(beta_1, step))
        )
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        # tf.gather on the resource variable reads only these rows (ops.take would read all).
        m_rows = beta_1 * tf.gather(m.value, rows) + (1 - beta_1) * values
        v_rows = beta_2 * tf.gather(v.value, rows) + (1 - beta_2) * ops.square(values)
        self.assign(m, tf.IndexedSlices(m_rows, rows))
        self.assign(v, tf.IndexedSlices(v_rows, rows))
        step_rows = alpha * m_rows / (ops.sqrt(v_rows) + self.epsilon)
        self.assign_sub(variable, tf.IndexedSlices(step_rows, rows))

    def get_config(self):
        config = super().get_config()
        config.pop("amsgrad", None)
        return config
