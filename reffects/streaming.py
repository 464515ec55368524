"""Training from streams: the group counts a `RandomIntercept` needs, from one pass over data.

A `tf.data` pipeline that reads files keeps memory flat however many rows there are, but
`ELBOModel.fit` cannot see the whole training set before the first step. Two numbers it
would otherwise take from in-memory data must then be given:

- N, the number of training rows, divides the KL: `ELBOModel(..., num_examples=N)`.
- n_g, each group's training count, scales `RandomIntercept`'s per-row KL. One streamed
  pass over the group column gives them: `layer.adapt(ids_dataset)` (which calls
  `count_groups`). The counts sum to the number of rows, and `fit` checks that they sum to
  the stated N, so counts taken from other data than `fit` trains on are an error.

    ids = train.map(lambda features, y: features["group"])   # parses one column
    layer.adapt(ids)                                          # one pass, memory flat
    model = ELBOModel(network, num_examples=N)

Under `tf.distribute.MultiWorkerMirroredStrategy` every worker states the global N and adapts
on the ids of the whole training set, not of its own shard, so all workers hold the same
counts.
"""

import numpy as np
import tensorflow as tf


def count_groups(dataset: tf.data.Dataset, num_groups: int) -> np.ndarray:
    """Counts each group id in a stream of integer ids, in one pass and constant memory.

    Args:
        dataset: a `tf.data.Dataset` whose elements are integer id tensors of any shape
            (batches of ids count fastest); every id must lie in `[0, num_groups)`.
        num_groups: number of levels.

    Returns:
        An int64 numpy array of shape `(num_groups,)`; its sum is the number of ids read.

    Raises:
        ValueError: the elements are not integer tensors, or an id is out of range.

    Example:
        >>> ids = tf.data.Dataset.from_tensor_slices(np.array([0, 2, 2, 1, 2])).batch(2)
        >>> count_groups(ids, num_groups=4)
        array([1, 1, 3, 0])
    """
    if (
        isinstance(num_groups, bool)
        or not isinstance(num_groups, (int, np.integer))
        or num_groups < 1
    ):
        raise ValueError(
            f"`num_groups` must be a positive integer. Received: num_groups={num_groups!r}"
        )
    spec = dataset.element_spec
    if not isinstance(spec, tf.TensorSpec) or not spec.dtype.is_integer:
        raise ValueError(
            "count_groups takes a dataset of integer group id tensors (map it to the id "
            f"column and cast it to an integer type first). Received elements: {spec}"
        )

    def add(state, ids):
        counts, low, high = state
        ids = tf.cast(tf.reshape(ids, [-1]), "int64")
        valid = tf.boolean_mask(ids, (ids >= 0) & (ids < num_groups))  # others raise below
        batch_counts = tf.math.bincount(
            valid, minlength=num_groups, maxlength=num_groups, dtype="int64"
        )
        return (
            counts + batch_counts,
            tf.minimum(low, tf.reduce_min(ids)),  # an empty batch gives the dtype's max
            tf.maximum(high, tf.reduce_max(ids)),
        )

    start = (tf.zeros([num_groups], "int64"), tf.constant(0, "int64"), tf.constant(0, "int64"))
    counts, low, high = (value.numpy() for value in dataset.reduce(start, add))
    if low < 0 or high >= num_groups:
        bad = low if low < 0 else high
        raise ValueError(
            f"group id {bad} is out of range for num_groups={num_groups}; ids must lie in "
            f"[0, {num_groups})"
        )
    return counts
