import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402

SEED = 20261122


@pytest.fixture(autouse=True)
def fixed_seed():
    """Every test starts from the same global seeds (Keras, TensorFlow, NumPy, random)."""
    keras.utils.set_random_seed(SEED)
    yield
