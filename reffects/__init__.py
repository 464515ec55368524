"""reffects: Bayesian random-effects layers and estimators for Keras."""

# First, before any module imports TensorFlow: see `reffects/_startup.py`.
from reffects import _startup  # noqa: F401
from reffects.estimators import RandomEffectsClassifier, RandomEffectsRegressor
from reffects.formula import from_formula
from reffects.layers import FixedEffects, GlobalIntercept, RandomEffects, RandomIntercept
from reffects.likelihoods import Bernoulli, Binomial, Categorical, Gaussian, Poisson
from reffects.optimizers import LazyAdam
from reffects.posteriors import Exponential, HalfNormal
from reffects.streaming import count_groups
from reffects.training import ELBOModel, predict_interval, sample_predictive

__all__ = [
    "ELBOModel",
    "RandomEffectsClassifier",
    "RandomEffectsRegressor",
    "Bernoulli",
    "Binomial",
    "Categorical",
    "Exponential",
    "FixedEffects",
    "Gaussian",
    "GlobalIntercept",
    "HalfNormal",
    "LazyAdam",
    "Poisson",
    "RandomEffects",
    "RandomIntercept",
    "count_groups",
    "from_formula",
    "predict_interval",
    "sample_predictive",
]
