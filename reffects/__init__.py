"""reffects: Bayesian random-effects layers and estimators for Keras."""

from reffects.estimators import RandomEffectsRegressor
from reffects.layers import FixedEffects, GlobalIntercept, RandomIntercept
from reffects.likelihoods import Gaussian
from reffects.posteriors import Exponential, HalfNormal
from reffects.training import ELBOModel

__all__ = [
    "ELBOModel",
    "RandomEffectsRegressor",
    "Exponential",
    "FixedEffects",
    "Gaussian",
    "GlobalIntercept",
    "HalfNormal",
    "RandomIntercept",
]
