"""The estimators' encoding of X for the model, and the map from the model's scale back.

The model sees standardised features (each column centred and scaled by its mean and sd in
fit), one integer code per row and grouping factor (its label's position among the labels
seen in fit; an unseen label gets the reserved last code, a new group) and, per factor with
random slopes, the slope covariates. The estimators report every estimate on the data's
scale through `DataScale` (intercept and fixed effects) and `factor_term_scale` (a
factor's intercept and slopes).

Example:
    >>> features = np.array([[1.0], [3.0]])
    >>> standardise(features, ["x"], "feature column")
    (array([2.]), array([1.]))
    >>> features[:, 0].tolist()
    [-1.0, 1.0]
    >>> levels = group_levels("g", np.array(["b", "a", "b"], dtype=object))
    >>> group_codes("g", levels, np.array(["a", "c"], dtype=object), warn_unseen=False)
    array([1, 2])
"""

import os
import sys
import warnings
from typing import NamedTuple

import numpy as np
import pandas as pd

from reffects.checks import (
    FLOAT32_MAX,
    category_labels,
    first_unhashable,
    is_categorical,
    numeric_values,
)

_UNSEEN_WARNING_SHARE = 0.5
"""Warn when more than this share of a factor's labels at predict were not seen in fit."""


class EncodedData:
    """Design pieces of X: standardised features, integer group codes per factor, when
    fit saw missing values the mask of the entries filled (`latent`, else None), and the
    offset on the model's predictor scale (`offset`, else None).

    Example:
        >>> data = EncodedData(np.zeros((2, 1), "float32"), [np.array([0, 1])])
        >>> [part.shape for part in data.model_inputs()]
        [(2, 1), (2,)]
    """

    def __init__(self, features, codes, latent=None, offset=None):
        self.features = features
        self.codes = codes
        self.latent = latent  # mask of the filled missing values (`reffects.imputation`)
        self.offset = offset

    def subset(self, rows) -> "EncodedData":
        """The rows `rows` (a mask, indices or a slice) of every piece."""
        latent = None if self.latent is None else self.latent[rows]
        offset = None if self.offset is None else self.offset[rows]
        codes = [codes[rows] for codes in self.codes]
        return EncodedData(self.features[rows], codes, latent, offset)

    def model_inputs(self):
        """The inputs of the model `build_mixed_model` builds: features (if any), codes,
        the offset (if any)."""
        inputs = list(self.codes)
        if self.features.shape[1]:
            inputs.insert(0, self.features)
        if self.offset is not None:
            inputs.append(np.asarray(self.offset, "float32"))
        return inputs


def standardise(values: np.ndarray, labels, kind: str, sample_weight=None):
    """Centres and scales the float64 columns of `values` in place; returns (mean, scale).

    Stable for any spread around any mean (1000 + 1e-7 z) and any magnitude (1e200 z,
    1e-200 z): a column is constant only when all its values are equal (it becomes exact
    zeros, scale 1); the mean is corrected by the mean of the column centred at it (what
    rounding left); the sd is taken after centring, of the column divided by its largest
    |value|, whose squares neither overflow nor underflow. The columns are then centred
    and scaled by the returned mean and scale, exactly as `predict` does. A column whose
    centred values float64 cannot hold is an error naming it (`labels[j]`, a `kind` such
    as "feature column").

    With `sample_weight` (frequency weights, not all zero), the mean and the sd are the
    weighted ones, taken over the rows of positive weight, so that a row of weight 2 is
    exactly two rows and a row of weight 0 none: the same standardisation as for the
    repeated rows.

    Example:
        >>> values = np.array([[5.0], [5.0]])
        >>> standardise(values, ["x"], "feature column"), values[:, 0].tolist()
        ((array([5.]), array([1.])), [0.0, 0.0])
        >>> values = np.array([[1.0], [4.0], [9.0]])
        >>> standardise(values, ["x"], "feature column", sample_weight=np.array([2, 1, 0]))
        (array([2.]), array([1.41421356]))
    """
    if sample_weight is None or np.all(sample_weight == 1):
        rows, weight = values, np.ones(len(values))
    else:
        weighted = np.asarray(sample_weight, dtype="float64") > 0
        rows, weight = values[weighted], np.asarray(sample_weight, dtype="float64")[weighted]
    total = weight.sum()
    highest, lowest = rows.max(axis=0), rows.min(axis=0)
    constant = highest == lowest
    with np.errstate(over="ignore", invalid="ignore"):
        mean = weight @ rows / total  # BLAS: several times faster than `mean(axis=0)`
        for j in np.flatnonzero(~np.isfinite(mean)):  # the sum overflowed
            peak = max(abs(highest[j]), abs(lowest[j]))
            mean[j] = peak * (weight @ (rows[:, j] / peak)) / total
        mean = np.where(constant, lowest, mean + weight @ (rows - mean) / total)
        peak = np.maximum(highest - mean, mean - lowest)  # largest |centred value|
    bad = ~(np.isfinite(mean) & np.isfinite(peak))
    if bad.any():
        j = int(np.argmax(bad))
        raise ValueError(
            f"{kind} {labels[j]!r} is too large to centre in float64 (values from "
            f"{lowest[j]:.3g} to {highest[j]:.3g}; their differences must stay below "
            f"{np.finfo('float64').max:.3g}); rescale it"
        )
    values -= mean
    if rows is not values:  # the weighted rows: a copy of their own
        rows -= mean
    peak = np.where(constant, 1.0, peak)
    normalised = rows / peak
    np.square(normalised, out=normalised)
    scale = np.where(constant, 1.0, peak * np.sqrt(weight @ normalised / total))
    values /= scale
    return mean, scale


MISSING_SUFFIX = "[missing]"
"""A missing-value indicator column is named `<column>[missing]`."""


class _NumericColumn(NamedTuple):
    """A numeric feature: its values and, when it had missing values in fit, an indicator
    of them (the values are then left missing, for `reffects.imputation`); `fill` (its mean
    in fit) fills a missing value of a column that had none in fit."""

    label: str
    fill: float
    indicator: bool

    def names(self) -> list:
        return [self.label] + ([self.label + MISSING_SUFFIX] if self.indicator else [])


class _CategoricalColumn(NamedTuple):
    """A categorical feature: a treatment-coded dummy per level but the first (the
    reference) and, when it had missing values in fit, an indicator of them (missing is a
    category of its own)."""

    label: str
    levels: pd.Index
    indicator: bool

    def names(self) -> list:
        dummies = [f"{self.label}[T.{level}]" for level in self.levels[1:]]
        return dummies + ([self.label + MISSING_SUFFIX] if self.indicator else [])


class FeatureCoding:
    """How X's feature columns become the model's numeric columns; learned in fit.

    - A numeric column stays one column. If it had missing values (NaN, None, NA) in fit,
      they stay NaN here, for the estimator's missing-value model to fill
      (`reffects.imputation`: their conditional means given the row's other columns), and
      a 0/1 column `<col>[missing]` follows it, so the indicator's coefficient learns what
      the fill misses, in the linear part and in a subnetwork alike.
    - A categorical column (see `reffects.checks.is_categorical`) becomes treatment-coded
      dummy columns `<col>[T.<level>]`, one per level seen in fit but the reference: the
      first level in sorted order, or in a category dtype's order (formulaic's coding and
      names, as `reffects.formula` uses). Missing values are a category of their own,
      `<col>[missing]`. A column with a single level gives no column (a constant).

    At predict time the same columns are made with fit's levels and fills. An unseen
    level gives zeros for all of its column's dummies, and a missing value in a column that
    had none in fit is filled (its mean; zeros for a categorical's dummies) without an
    indicator: each with a warning naming the column. Levels and "had missing values"
    count only rows of positive weight, as if a row of weight 0 were not there.

    Attributes:
        names: the model's column names, in order.
        positions: per feature column of X, the positions of its model columns.
        categorical: per feature column of X, whether it is categorical.
        latent: positions of the numeric model columns that had missing values in fit
            (left NaN by `encode`).
        indicators: positions of the missing-value indicator columns.

    Example:
        >>> frame = pd.DataFrame({"x": [1.0, None, 3.0], "c": ["b", "a", "b"]})
        >>> coding = FeatureCoding.learn(["x", "c"], [frame["x"], frame["c"]])
        >>> coding.names, coding.positions
        (['x', 'x[missing]', 'c[T.b]'], [[0, 1], [2]])
        >>> coding.encode([frame["x"], frame["c"]], num_rows=3).tolist()
        [[1.0, 0.0, 1.0], [nan, 1.0, 0.0], [3.0, 0.0, 1.0]]
        >>> coding.latent, coding.indicators
        ([0], [1])
    """

    def __init__(self, columns):
        self.columns = columns
        self.names, self.positions = [], []
        for column in columns:
            start = len(self.names)
            self.names += column.names()
            self.positions.append(list(range(start, len(self.names))))
        self.categorical = [isinstance(c, _CategoricalColumn) for c in columns]
        self.latent = [
            positions[0]
            for column, positions in zip(columns, self.positions)
            if isinstance(column, _NumericColumn) and column.indicator
        ]
        self.indicators = [
            positions[-1]
            for column, positions in zip(columns, self.positions)
            if column.indicator and positions
        ]

    @classmethod
    def learn(cls, labels, columns, sample_weight=None) -> "FeatureCoding":
        """The coding of the feature `columns` (Series, named `labels`) seen in fit."""
        weight = None if sample_weight is None else np.asarray(sample_weight, dtype="float64")
        learned = []
        for label, column in zip(labels, columns):
            if is_categorical(label, column):
                learned.append(_learn_categorical(label, column, weight))
            else:
                learned.append(_learn_numeric(label, numeric_values(label, column), weight))
        return cls(learned)

    def encode(self, columns, num_rows: int, warn: bool = False) -> np.ndarray:
        """The model's columns (float64, before standardisation) for the feature `columns`
        of `num_rows` rows, NaN where a column in `latent` is missing; with `warn`, warns
        of unseen levels and of missing values fit did not see."""
        result = np.zeros((num_rows, len(self.names)))
        for coding, column, positions in zip(self.columns, columns, self.positions):
            if not positions:
                continue  # a single level in fit: no column
            out = result[:, positions[0] : positions[-1] + 1]  # a view: written in place
            if isinstance(coding, _CategoricalColumn):
                _encode_categorical(coding, column, out, warn)
            else:
                _encode_numeric(coding, column, out, warn)
        return result

    def expand(self, feature_positions) -> list | None:
        """Positions of the model's columns of the given feature columns (None: None)."""
        if feature_positions is None:
            return None
        return [p for j in feature_positions for p in self.positions[j]]

    def slope_positions(self, group_col, feature_positions, labels) -> list | None:
        """Positions of the model's columns of a factor's random slopes: each numeric
        column's own (its filled values; not its missing indicator). A categorical slope
        is an error that says how to get per-level slopes."""
        if not feature_positions:
            return None
        for j in feature_positions:
            if self.categorical[j]:
                raise ValueError(
                    f"random slope column {labels[j]!r} of {group_col!r} is categorical; "
                    "slopes vary on numeric columns. For a slope per level, add its 0/1 "
                    "dummy columns to X and list those"
                )
        return [self.positions[j][0] for j in feature_positions]


def _learn_numeric(label, values, weight) -> _NumericColumn:
    missing = np.isnan(values)
    if weight is None:
        indicator = bool(missing.any())
        observed, observed_weight = (values[~missing] if indicator else values), None
    else:
        counted = weight > 0
        indicator = bool((missing & counted).any())
        present = ~missing & counted
        observed, observed_weight = values[present], weight[present]
    return _NumericColumn(label, _mean(observed, observed_weight), indicator)


def _mean(values, weight) -> float:
    """The (weighted) mean, stable for values near 1e308; 0 when there are none."""
    if not len(values):
        return 0.0

    def average(v):
        return np.mean(v) if weight is None else (weight @ v) / weight.sum()

    with np.errstate(over="ignore", invalid="ignore"):
        mean = average(values)
    if np.isfinite(mean):
        return float(mean)
    peak = np.abs(values).max()  # the sum overflowed
    return float(peak * average(values / peak))


def _learn_categorical(label, column, weight) -> _CategoricalColumn:
    codes, labels = category_labels(label, column)
    present = codes >= 0
    counts = np.bincount(
        codes[present], None if weight is None else weight[present], minlength=len(labels)
    )
    seen = labels[counts > 0]
    if isinstance(column.dtype, pd.CategoricalDtype):
        present_levels = set(seen)
        order = [c for c in column.cat.categories if c in present_levels]
    else:
        try:
            order = sorted(seen)
        except TypeError:  # labels of several types (text and True/False)
            order = sorted(seen, key=lambda level: (type(level).__name__, str(level)))
    missing = ~present if weight is None else ~present & (weight > 0)
    return _CategoricalColumn(label, pd.Index(order, dtype=object), bool(missing.any()))


def _encode_numeric(coding, column, out, warn):
    values = numeric_values(coding.label, column)
    missing = np.isnan(values)
    if missing.any():
        if coding.indicator:
            out[:, 1] = missing  # the values stay NaN, for the missing-value model
        else:
            values = np.where(missing, coding.fill, values)  # never written: it may be X's
        if warn and not coding.indicator:
            _warn(
                f"feature column {coding.label!r} has {missing.sum()} missing value(s) (first "
                f"at row {int(np.argmax(missing))}) but had none in fit; they are filled with "
                f"its mean in fit ({coding.fill:.6g}), without a missing indicator"
            )
    out[:, 0] = values


def _encode_categorical(coding, column, out, warn):
    codes, labels = category_labels(coding.label, column)
    level = coding.levels.get_indexer(labels)  # -1: not seen in fit
    row_level = np.full(len(codes), -1)
    row_level[codes >= 0] = level[codes[codes >= 0]]
    dummies = max(len(coding.levels) - 1, 0)
    rows = np.flatnonzero(row_level > 0)
    out[rows, row_level[rows] - 1] = 1.0
    missing = codes < 0
    if coding.indicator:
        out[:, dummies] = missing
    elif warn and missing.any():
        _warn(
            f"feature column {coding.label!r} has {missing.sum()} missing value(s) (first at "
            f"row {int(np.argmax(missing))}) but had none in fit; they are coded as the "
            "reference level (zeros), without a missing indicator"
        )
    unseen = (codes >= 0) & (row_level < 0)
    if warn and unseen.any():
        new = labels[np.unique(codes[unseen])]
        more = " ..." if len(new) > 5 else ""
        _warn(
            f"feature column {coding.label!r} has levels not seen in fit: "
            f"{', '.join(map(repr, new[:5]))}{more} ({unseen.sum()} row(s), first at row "
            f"{int(np.argmax(unseen))}); they are coded as zeros for every dummy of the "
            "column, as the reference level is"
        )


def _warn(message):
    warnings.warn(message, UserWarning, stacklevel=_caller_outside_package())


def _caller_outside_package() -> int:
    """The `stacklevel` of the first caller outside reffects (the user's `predict`)."""
    frame, level = sys._getframe(2), 2  # 1: `_warn`'s caller; `_warn` itself is not counted
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIRECTORY):
        frame, level = frame.f_back, level + 1
    return level


_PACKAGE_DIRECTORY = os.path.dirname(os.path.abspath(__file__)) + os.sep


def model_features(features: np.ndarray, labels) -> np.ndarray:
    """Standardised float64 features as the model's float32; a value float32 cannot hold
    is an error naming its column (`labels[j]`).

    Example:
        >>> model_features(np.array([[0.5]]), ["x"]).dtype
        dtype('float32')
    """
    result = features.astype("float32")
    too_large = ~np.isfinite(result)
    if too_large.any():
        row, j = np.argwhere(too_large)[0]
        raise ValueError(
            f"feature column {labels[j]!r} at row {row} is "
            f"{features[row, j]:.3g} standard deviations from its mean in fit, beyond "
            f"the largest float32 ({FLOAT32_MAX:.4g}) the model computes in; "
            "rescale the column"
        )
    return result


def group_levels(col, values) -> pd.Index:
    """The distinct labels of a group column, in order of first appearance.

    Example:
        >>> group_levels("g", np.array([3, 1, 3])).tolist()
        [3, 1]
    """
    try:
        return pd.Index(pd.unique(pd.Series(values)))
    except TypeError:
        raise _unhashable_label_error(col, values) from None


def group_codes(col, levels: pd.Index, values, warn_unseen: bool) -> np.ndarray:
    """Each row's position in `levels`; unseen labels get `len(levels)` (a new group).

    With `warn_unseen`, warns when most rows' labels are unseen and they look like the
    seen ones in another type (3 in fit, "3" now) or are of another kind altogether
    (numbers in fit, strings now): then they are probably not new groups.

    Example:
        >>> group_codes("g", pd.Index([3, 1]), np.array([1, 1, 7]), warn_unseen=False)
        array([1, 1, 2])
    """
    try:
        codes = levels.get_indexer(values)
    except TypeError:
        raise _unhashable_label_error(col, values) from None
    unseen = codes < 0
    if warn_unseen and len(levels) and unseen.mean() > _UNSEEN_WARNING_SHARE:
        _warn_if_label_types_differ(col, levels, pd.unique(pd.Series(values[unseen])), unseen)
    return np.where(unseen, len(levels), codes).astype("int64")


def _unhashable_label_error(col, values) -> ValueError:
    found = first_unhashable(values)
    if found is not None:
        row, value = found
        return ValueError(
            f"group column {col!r} holds an unhashable label at row {row} "
            f"({type(value).__name__} {value!r}); group labels must be scalars such as "
            "strings or integers"
        )
    return ValueError(f"group column {col!r} holds labels that cannot be compared")


def _label_kind(labels) -> str:
    kind = pd.api.types.infer_dtype(labels, skipna=True)
    if kind in ("integer", "floating", "mixed-integer-float", "decimal", "boolean"):
        return "number"
    if kind in ("string", "bytes"):
        return "string"
    return kind


def _warn_if_label_types_differ(col, levels, new_labels, unseen):
    sample = new_labels[:1000]
    seen_text = {str(label) for label in levels[:100_000]}
    looks_seen = any(str(label) in seen_text for label in sample)
    if not looks_seen and _label_kind(levels) == _label_kind(sample):
        return  # new groups of the same kind: what GroupKFold gives, nothing to warn about
    warnings.warn(
        f"{unseen.mean():.0%} of the rows of group column {col!r} have labels not seen in fit "
        f"(e.g. {sample[0]!r} of type {type(sample[0]).__name__}; fit saw labels such as "
        f"{levels[0]!r} of type {type(levels[0]).__name__}). They are predicted as new "
        "groups (offset 0); check that the labels have the same type as in fit.",
        UserWarning,
        stacklevel=6,  # the caller of predict (through the estimator's _encode)
    )


def slope_shifts(
    random_slopes, correlated_slopes, feature_mean, feature_scale, random_intercepts=None
) -> list:
    """Per factor, what the slope inputs add to the standardised features: nothing when
    the terms are correlated (`correlated_slopes`, per factor) with a random intercept
    (the fit does not depend on the origin), the features' mean over sd when they are
    independent or have no random intercept (`random_intercepts`, per factor; default all
    True), so that the slopes vary about the data's own origin, as lme4's `||` and
    `(0 + x | g)` mean it.

    Example:
        >>> shifts = slope_shifts([None, [0]], [True, False], np.array([2.0]), np.array([4.0]))
        >>> shifts[0], float(shifts[1][0])
        (None, 0.5)
    """
    random_intercepts = random_intercepts or [True] * len(random_slopes)
    shifts = []
    for positions, correlated, intercept in zip(
        random_slopes, correlated_slopes, random_intercepts
    ):
        if not positions or (correlated and intercept):
            shifts.append(None)
            continue
        shifts.append(list(feature_mean[positions] / feature_scale[positions]))
    return shifts


def slope_inputs(features, random_slopes, shifts) -> list:
    """Per factor, its rows' slope covariates on the model's scale (float64), or None.

    Example:
        >>> slope_inputs(np.array([[1.0, 2.0]]), [[1], None], [[0.5], None])
        [array([[2.5]]), None]
    """
    inputs = []
    for positions, shift in zip(random_slopes, shifts):
        if not positions:
            inputs.append(None)
            continue
        z = features[:, positions].astype("float64")
        inputs.append(z if shift is None else z + np.asarray(shift))
    return inputs


def factor_terms(slope_inputs, random_intercepts=None) -> list:
    """Per factor, its rows' term vectors `[1, z]`, or `z` for a factor without a random
    intercept (`random_intercepts`, per factor; default all True); None for a random
    intercept alone.

    Example:
        >>> factor_terms([np.array([[2.0]]), None, np.array([[3.0]])], [True, True, False])
        [array([[1., 2.]]), None, array([[3.]])]
    """
    random_intercepts = random_intercepts or [True] * len(slope_inputs)
    return [
        None if z is None else np.column_stack([np.ones(len(z)), z]) if intercept else z
        for z, intercept in zip(slope_inputs, random_intercepts)
    ]


class DataScale(NamedTuple):
    """The affine map from the model's standardised parameters to the data's scale.

    `[intercept_, *coef_]` is `shift + matrix @ [alpha, *beta]` for the model's global
    intercept alpha and fixed effects beta, and each group offset, sigma_k and the noise
    scale is `response_scale` times the model's.
    """

    shift: np.ndarray
    matrix: np.ndarray
    response_scale: float

    @classmethod
    def from_standardisation(cls, y_mean, y_scale, feature_mean, feature_scale) -> "DataScale":
        """The map of a model fitted to `(y - y_mean) / y_scale` and to features
        standardised by `feature_mean` and `feature_scale`.

        Example:
            >>> scale = DataScale.from_standardisation(1.0, 2.0, np.array([3.0]), np.array([4.0]))
            >>> scale.shift.tolist(), scale.matrix.tolist(), scale.response_scale
            ([1.0, 0.0], [[2.0, -1.5], [0.0, 0.5]], 2.0)
        """
        ratio = y_scale / feature_scale
        matrix = np.zeros((ratio.size + 1, ratio.size + 1))
        matrix[0, 0] = y_scale
        matrix[0, 1:] = -ratio * feature_mean
        matrix[1:, 1:] = np.diag(ratio)
        shift = np.zeros(ratio.size + 1)
        shift[0] = y_mean
        return cls(shift, matrix, y_scale)


def factor_term_scale(
    slope_positions, correlated, feature_mean, feature_scale, intercept=True
) -> np.ndarray:
    """The map A from a factor's coefficients on the model's scale to the data's, less
    the response scale: a group's `[intercept, *slopes]` (its `slopes` without a random
    `intercept`) on the data's scale is `response_scale * A` times the model's.
    `slope_positions` are the positions of the factor's slope columns among the features
    (None for a random intercept alone); `correlated`: whether its terms are correlated.

    Example:
        >>> factor_term_scale([0], True, np.array([3.0]), np.array([4.0])).tolist()
        [[1.0, -0.75], [0.0, 0.25]]
        >>> factor_term_scale([0], True, np.array([3.0]), np.array([4.0]), False).tolist()
        [[0.25]]
    """
    positions = slope_positions or []
    if not intercept:  # slopes about the data's origin (`slope_shifts`)
        return np.diag(1.0 / feature_scale[positions])
    matrix = np.eye(1 + len(positions))
    if positions:
        scale = feature_scale[positions]
        matrix[1:, 1:] = np.diag(1.0 / scale)
        if correlated:  # centred slopes move the intercept
            matrix[0, 1:] = -feature_mean[positions] / scale
    return matrix
