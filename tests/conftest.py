# reffects first: it imports TensorFlow with the C++ start-up lines hidden and sets
# TF_CPP_MIN_LOG_LEVEL=2 unless it is set (see reffects/_startup.py); keras would import
# TensorFlow without that.
import reffects  # noqa: F401

# isort: split
import keras
import pytest

SEED = 20261122


@pytest.fixture(autouse=True)
def fixed_seed():
    """Every test starts from the same global seeds (Keras, TensorFlow, NumPy, random)."""
    keras.utils.set_random_seed(SEED)
    yield
