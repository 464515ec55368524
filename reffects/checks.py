"""The estimators' checks of their parameters and of X and `sample_weight`.

Each check raises an error that names what is wrong and how to fix it, and returns what it
checked in the form the estimators use: a seed, a tuple of layer widths, X as a DataFrame,
the positions of the columns `group_cols`, `subnetwork_cols` and `random_slopes` name, the
feature columns and each group column's labels. A feature column is numeric (missing values
as NaN) or categorical (`is_categorical`); `reffects.encoding.FeatureCoding` turns them into
the model's numeric columns. scikit-learn's own checks (`validate_data`) stay in
`reffects.estimators`.

Example:
    >>> import pandas as pd
    >>> frame = as_frame(pd.DataFrame({"g": ["a", "b"], "x": [1.0, None], "c": ["u", "v"]}))
    >>> columns = split_columns(frame, group_cols=["g"])
    >>> columns.groups[0].tolist(), columns.feature_labels
    (['a', 'b'], ['x', 'c'])
    >>> [is_categorical(label, column) for label, column in zip(["x", "c"], columns.features)]
    [False, True]
    >>> numeric_values("x", columns.features[0]).tolist()
    [1.0, nan]
"""

import numbers
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

FLOAT32_MAX = float(np.finfo("float32").max)
"""The model computes in float32: values it is given must stay below this."""


def check_params(estimator) -> int:
    """Checks an estimator's training parameters; returns the fit's one seed.

    Example:
        >>> from reffects import RandomEffectsRegressor
        >>> check_params(RandomEffectsRegressor(group_cols=["g"], random_state=3))
        3
    """
    if not (isinstance(estimator.prior_scale, numbers.Real) and estimator.prior_scale > 0):
        raise ValueError(
            f"`prior_scale` must be positive. Received: prior_scale={estimator.prior_scale!r}"
        )
    for name in ("epochs", "batch_size", "n_iter_no_change"):
        value = getattr(estimator, name)
        if value is not None and (
            not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1
        ):
            raise ValueError(
                f"`{name}` must be a positive integer or None. Received: {name}={value!r}"
            )
    learning_rate = estimator.learning_rate
    if not (isinstance(learning_rate, numbers.Real) and learning_rate > 0):
        raise ValueError(
            f"`learning_rate` must be positive. Received: learning_rate={learning_rate!r}"
        )
    fraction = estimator.validation_fraction
    if not (isinstance(fraction, numbers.Real) and 0 < fraction < 1):
        raise ValueError(
            f"`validation_fraction` must be in (0, 1). Received: validation_fraction={fraction!r}"
        )
    hidden_layers(estimator.hidden_units)
    eta = estimator.correlation_prior
    if eta is not None and (
        isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0 < eta < np.inf
    ):
        raise ValueError(
            "`correlation_prior` must be None or a positive finite number (the LKJ eta). "
            f"Received: correlation_prior={eta!r}"
        )
    return random_seed(estimator.random_state)


def hidden_layers(hidden_units) -> tuple:
    """`hidden_units` as a tuple of layer widths; an int is one layer, as in MLPRegressor.

    Example:
        >>> hidden_layers(8), hidden_layers([32, 16]), hidden_layers(())
        ((8,), (32, 16), ())
    """
    if _is_positive_int(hidden_units):
        return (int(hidden_units),)
    if (
        isinstance(hidden_units, (str, bytes, dict))
        or not np.iterable(hidden_units)
        or not all(_is_positive_int(u) for u in hidden_units)
    ):
        raise ValueError(
            "`hidden_units` must be a positive integer or a tuple of positive integers "
            f"(() for no subnetwork). Received: hidden_units={hidden_units!r}"
        )
    return tuple(int(u) for u in hidden_units)


def random_seed(random_state) -> int:
    """The one int seed of a fit, from `random_state` (None, an int or a RandomState).

    An int is used as it is; a RandomState gives one draw (advancing it, as scikit-learn
    estimators do); None a fresh random seed.

    Example:
        >>> random_seed(7)
        7
    """
    state = random_state
    if state is None:
        return int(np.random.default_rng().integers(2**31 - 1))
    if isinstance(state, numbers.Integral) and not isinstance(state, bool):
        if not 0 <= state < 2**32:
            raise ValueError(
                "`random_state` must be None, an integer in [0, 2**32 - 1] or a "
                f"numpy.random.RandomState. Received: random_state={state!r}"
            )
        return int(state)
    if isinstance(state, np.random.RandomState):
        return int(state.randint(2**31 - 1))
    raise ValueError(
        "`random_state` must be None, an integer in [0, 2**32 - 1] or a "
        f"numpy.random.RandomState. Received: random_state={state!r}"
    )


def as_frame(X) -> pd.DataFrame:
    """X as a DataFrame, after the checks scikit-learn users expect of any estimator.

    Example:
        >>> as_frame(np.zeros((2, 3))).shape
        (2, 3)
    """
    if sparse.issparse(X):
        raise TypeError(
            "sparse input is not supported: X holds group labels and numeric features; "
            "pass a dense array or DataFrame (X.toarray())"
        )
    if isinstance(X, pd.DataFrame):
        frame = X
    else:
        array = np.asarray(X)
        if array.ndim != 2:
            raise ValueError(
                f"Expected a 2D X, got shape {array.shape} instead. Reshape your data "
                "with X.reshape(-1, 1) if it has a single column."
            )
        frame = pd.DataFrame(array)
    if any(np.iscomplexobj(frame[c].to_numpy()) for c in frame.columns):
        raise ValueError("Complex data not supported")
    num_rows, num_columns = frame.shape
    if num_rows == 0:
        raise ValueError(
            f"Found array with 0 sample(s) (shape=({num_rows}, {num_columns})) while a "
            "minimum of 1 is required."
        )
    if num_columns == 0:
        raise ValueError(
            f"Found array with 0 feature(s) (shape=({num_rows}, 0)) while a minimum of 1 "
            "is required."
        )
    return frame


def align_columns(frame: pd.DataFrame, fitted_columns) -> pd.DataFrame:
    """The columns of `frame` in fit's order (`fitted_columns`), found by name as in fit.

    Group columns are found by name and the features are the other columns in order, so
    a DataFrame whose columns come in another order than in fit is put back in fit's
    order. (scikit-learn already rejects reordered string names; this covers other
    labels, such as integers.) A frame with default labels 0..n-1, as an ndarray gets,
    is taken by position; other labels must be the ones seen in fit.

    Example:
        >>> frame = pd.DataFrame({2: [1.0], 1: ["a"]})
        >>> list(align_columns(frame, fitted_columns=[1, 2]).columns)
        [1, 2]
    """
    labels = list(frame.columns)
    fitted = fitted_columns
    if fitted is None or labels == fitted or labels == list(range(len(labels))):
        return frame
    if fitted == list(range(len(fitted))) or len(set(fitted)) != len(fitted):
        return frame  # fitted on positions (an ndarray) or repeated names: by position
    if len(set(labels)) == len(labels) and set(labels) == set(fitted):
        return frame[fitted]
    missing = [c for c in fitted if c not in labels]
    unexpected = [c for c in labels if c not in fitted]
    raise ValueError(
        f"X's columns differ from those seen in fit: missing {missing}, unexpected "
        f"{unexpected}; pass the columns of fit ({fitted}), in any order"
    )


@dataclass
class SplitColumns:
    """X split into its parts, as `split_columns` checked them.

    Attributes:
        features: the feature columns (every non-group column), in order, as Series.
        groups: per grouping factor, its rows' labels.
        group_cols: the grouping factors as `group_cols` names them.
        feature_labels: the feature columns' names, as strings.
        subnetwork_features: positions in `features` of the subnetwork's columns, or None.
        random_slopes: per grouping factor, positions in `features` of its random slopes'
            columns, or None.
        random_intercepts: per grouping factor, whether it has a random intercept.
        correlated_slopes: per grouping factor, whether its terms are correlated.
        offset: the offset column's values (float64), or None without `offset_col`.
        num_rows: X's number of rows.
    """

    features: list
    groups: list
    group_cols: list
    feature_labels: list
    subnetwork_features: list | None
    random_slopes: list
    random_intercepts: list
    correlated_slopes: list
    offset: np.ndarray | None
    num_rows: int


def split_columns(
    frame,
    group_cols,
    subnetwork_cols=None,
    random_slopes=None,
    random_intercept=True,
    correlated_slopes=True,
    offset_col=None,
) -> SplitColumns:
    """Splits the DataFrame X into feature columns and checked group labels (see
    `SplitColumns`); `reffects.encoding.FeatureCoding` checks and codes the features.

    Example:
        >>> frame = pd.DataFrame({"g": [1, 2], "x": [0.5, 1.5], "z": [3.0, 4.0]})
        >>> columns = split_columns(frame, ["g"], ["z"], {"g": ["x"]}, {"g": False})
        >>> columns.subnetwork_features, columns.random_slopes, columns.random_intercepts
        ([1], [[0]], [False])
        >>> split_columns(frame, ["g"], None, {"g": ["x"]}, True, {"g": False}).correlated_slopes
        [False]
    """
    cols, positions = _group_positions(frame, group_cols)
    groups = [_group_labels(col, frame.iloc[:, pos]) for col, pos in zip(cols, positions)]
    names = [str(c) for c in frame.columns]
    offset_position, offset = _offset(frame, offset_col, positions)
    feature_positions = [
        i for i in range(frame.shape[1]) if i not in positions and i != offset_position
    ]
    subnetwork = _subnetwork_positions(frame, subnetwork_cols, positions, feature_positions)
    slopes = _slope_positions(frame, random_slopes, cols, positions, feature_positions)
    intercepts = _random_intercepts(random_intercept, cols, slopes)
    return SplitColumns(
        features=[frame.iloc[:, pos] for pos in feature_positions],
        groups=groups,
        group_cols=cols,
        feature_labels=[names[pos] for pos in feature_positions],
        subnetwork_features=subnetwork,
        random_slopes=slopes,
        random_intercepts=intercepts,
        correlated_slopes=_correlation_flags(correlated_slopes, cols),
        offset=offset,
        num_rows=frame.shape[0],
    )


_NUMBER_KINDS = ("integer", "floating", "mixed-integer-float", "decimal", "empty")
"""What `pandas.api.types.infer_dtype` calls an object column of numbers (or of missing
values only)."""
_CATEGORY_KINDS = ("string", "bytes", "boolean")
"""What it calls an object column of category labels: text, or True and False."""


def is_categorical(label, column: pd.Series) -> bool:
    """Whether a feature column is categorical: a `category` or string dtype, or objects
    that are text (unless every one reads as a number, as numbers written as text do) or
    True / False. Numbers of any dtype (numpy's bool and pandas's nullable ones included)
    and objects that are numbers are numeric; anything else is an error naming the column.

    Example:
        >>> is_categorical("x", pd.Series(["1.5", "2"])), is_categorical("x", pd.Series(["a"]))
        (False, True)
    """
    dtype = column.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        return True
    if dtype.kind in "iufb":
        return False
    if isinstance(dtype, pd.StringDtype) or dtype.kind == "O":
        kind = pd.api.types.infer_dtype(column, skipna=True)
        if kind in _NUMBER_KINDS:
            return False
        if kind == "string":
            return not _reads_as_numbers(column)
        if kind in _CATEGORY_KINDS:
            return True
        return _kind_of_objects(label, column) == "label"
    raise TypeError(
        f"feature column {label!r} is not numeric (dtype {dtype}): feature columns hold "
        "numbers or category labels (text, True/False or a category dtype); convert it, or "
        "list it in `group_cols` if it is a grouping factor"
    )


def numeric_values(label, column: pd.Series) -> np.ndarray:
    """A numeric feature column as float64, NaN where a value is missing (NaN, None, NA);
    infinity or a value that is not a number is an error naming the column. The array may
    be the column's own memory: read it, never write to it.

    Example:
        >>> numeric_values("x", pd.Series([1, None, pd.NA], dtype=object)).tolist()
        [1.0, nan, nan]
    """
    try:
        values = column.to_numpy(dtype="float64", na_value=np.nan)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"feature column {label!r} is numeric in fit but holds a value that is not a "
            f"number now ({error}); pass the column's numbers"
        ) from None
    if np.isfinite(values).all():
        return values
    infinite = np.isinf(values)
    if infinite.any():
        raise ValueError(
            f"feature column {label!r} contains infinity (first at row "
            f"{int(np.argmax(infinite))}); a missing value may be NaN, None or NA"
        )
    return values


def first_unhashable(values):
    """`(row, value)` of the first value that cannot be hashed (a list, a dict, ...), or
    None: what makes pandas' factorize raise a bare TypeError.

    Example:
        >>> first_unhashable(["a", ["b"], "c"])
        (1, ['b'])
    """
    for row, value in enumerate(values):
        try:
            hash(value)
        except TypeError:
            return row, value
    return None


def category_labels(label, column: pd.Series):
    """A categorical feature column as `(codes, labels)`: each row's position in `labels`
    (its distinct values, in order of appearance), -1 where it is missing.

    Example:
        >>> codes, labels = category_labels("c", pd.Series(["b", None, "a", "b"]))
        >>> codes.tolist(), labels.tolist()
        ([0, -1, 1, 0], ['b', 'a'])
    """
    try:
        codes, labels = pd.factorize(column, use_na_sentinel=True)
    except TypeError:
        found = first_unhashable(column)
        if found is None:
            raise
        row, value = found
        raise ValueError(
            f"feature column {label!r} holds an unhashable value at row {row} "
            f"({type(value).__name__} {value!r}); category labels must be scalars such as "
            "strings"
        ) from None
    return np.asarray(codes, dtype="int64"), pd.Index(np.asarray(labels, dtype=object))


def _reads_as_numbers(column: pd.Series) -> bool:
    try:
        column.to_numpy(dtype="float64", na_value=np.nan)
    except (ValueError, TypeError):
        return False
    return True


def _kind_of_objects(label, column) -> str:
    """ "number" or "label" for an object column that infer_dtype does not name; an error
    for one that mixes numbers with labels or holds anything else."""
    values = column.to_numpy(dtype=object)
    rows = np.flatnonzero(~np.asarray(pd.isna(values), dtype=bool))
    kinds = [_value_kind(values[row]) for row in rows]
    if "other" in kinds:
        row = int(rows[kinds.index("other")])
        raise TypeError(
            f"feature column {label!r} holds a {type(values[row]).__name__} at row {row} "
            f"({values[row]!r}): feature columns hold numbers or category labels; list it in "
            "`group_cols` if it is a grouping factor"
        )
    if len(set(kinds)) <= 1:
        return kinds[0] if kinds else "number"
    other = next(i for i, kind in enumerate(kinds) if kind != kinds[0])
    row = int(rows[other])
    raise ValueError(
        f"feature column {label!r} mixes numbers and category labels: {values[rows[0]]!r} "
        f"at row {int(rows[0])} and {values[row]!r} at row {row}; make it all numbers, or all "
        "labels (`.astype(str)`) to treat it as categorical"
    )


def _value_kind(value) -> str:
    if isinstance(value, (str, bytes, bool, np.bool_)):
        return "label"
    if isinstance(value, numbers.Number) and not isinstance(value, complex):
        return "number"
    return "other"


def check_sample_weight(sample_weight, num_rows):
    """`sample_weight` as float64 frequency weights of shape `(num_rows,)`, or None.

    Example:
        >>> check_sample_weight([1, 2], num_rows=2)
        array([1., 2.])
    """
    if sample_weight is None:
        return None
    given = np.asarray(sample_weight)
    try:
        weights = given.astype("float64")
    except (ValueError, TypeError):
        missing = np.asarray(pd.isna(given))
        if missing.any():
            raise ValueError(
                f"`sample_weight` has a missing value at row {int(np.argmax(missing.reshape(-1)))}"
            ) from None
        raise ValueError(
            "`sample_weight` must hold numbers (frequency weights, >= 0). Received "
            f"dtype {given.dtype}: sample_weight[:3]={given.reshape(-1)[:3].tolist()!r}"
        ) from None
    if weights.ndim != 1 or len(weights) != num_rows:
        raise ValueError(f"sample_weight must have shape ({num_rows},); got shape {weights.shape}")
    bad = ~np.isfinite(weights) | (weights < 0)
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(
            "sample_weight must hold finite, non-negative values; got "
            f"sample_weight={weights[row]:g} at row {row}"
        )
    if weights.max() > FLOAT32_MAX:
        raise ValueError(
            f"sample_weight reaches {weights.max():g}, beyond the largest float32 "
            f"({FLOAT32_MAX:.4g}) the model computes in; rescale the weights"
        )
    if not weights.any():
        raise ValueError("sample_weight is zero for every row; nothing to fit")
    return weights


def _group_positions(X, group_cols):
    if group_cols is None:
        raise ValueError(
            "`group_cols` must name the grouping columns (names for a DataFrame, "
            "positions for an ndarray; () fits a Bayesian linear regression). "
            "Received: group_cols=None"
        )
    cols = _as_column_list(group_cols)
    return cols, _column_positions(X, cols, "group")


def _group_labels(col, column: pd.Series) -> np.ndarray:
    """A group column's labels: its own array when numeric (fast to hash), else objects;
    a missing or infinite label is an error."""
    values = column.to_numpy()
    if values.dtype.kind not in "iufb":
        values = column.to_numpy(dtype=object)
    # Missing values first: comparing pd.NA with anything is an error of its own.
    missing = pd.isna(values)
    if missing.any():
        raise ValueError(
            f"group column {col!r} has a missing value at row {int(np.argmax(missing))} "
            "(NaN, None or NA); every row needs a group label"
        )
    infinite = np.isin(values, [np.inf, -np.inf])
    if infinite.any():
        raise ValueError(
            f"group column {col!r} holds infinity at row {int(np.argmax(infinite))}; "
            "every row needs a finite group label"
        )
    return values


def _subnetwork_positions(X, subnetwork_cols, group_positions, feature_positions):
    """Positions in the feature matrix of `subnetwork_cols` (None: every feature)."""
    if subnetwork_cols is None:
        return None
    cols = _as_column_list(subnetwork_cols)
    if not cols:
        raise ValueError(
            "`subnetwork_cols` must list at least one feature column, or be None for "
            f"all of them. Received: subnetwork_cols={subnetwork_cols!r}"
        )
    positions = _column_positions(X, cols, "subnetwork")
    for col, pos in zip(cols, positions):
        if pos in group_positions:
            raise ValueError(
                f"subnetwork column {col!r} is a group column; `subnetwork_cols` lists "
                "numeric feature columns, which must not be in `group_cols`"
            )
        _check_not_offset("subnetwork", col, pos, feature_positions)
    return [feature_positions.index(pos) for pos in positions]


def _slope_positions(X, random_slopes, cols, group_positions, feature_positions):
    """Per grouping factor, the positions in the feature matrix of its random slopes'
    columns (None for a random intercept alone)."""
    slopes = random_slopes
    if slopes is None:
        return [None] * len(cols)
    if not isinstance(slopes, dict):
        raise ValueError(
            "`random_slopes` must be a dict mapping group columns to lists of feature "
            f"columns, e.g. {{'Subject': ['Days']}}. Received: random_slopes={slopes!r}"
        )
    _check_group_keys("random_slopes", slopes, cols)
    result = []
    for col in cols:
        slope_cols = _as_column_list(slopes.get(col, []))
        if not slope_cols:
            result.append(None)
            continue
        if len(set(map(str, slope_cols))) != len(slope_cols):
            raise ValueError(f"`random_slopes[{col!r}]` lists a column twice: {slope_cols}")
        positions = _column_positions(X, slope_cols, "random slope")
        for slope_col, pos in zip(slope_cols, positions):
            if pos in group_positions:
                raise ValueError(
                    f"random slope column {slope_col!r} of {col!r} is a group column; "
                    "slopes vary on numeric feature columns"
                )
            _check_not_offset("random slope", slope_col, pos, feature_positions)
        result.append([feature_positions.index(pos) for pos in positions])
    return result


def _offset(frame, offset_col, group_positions):
    """`(position, values)` of the offset column (float64, finite), or `(None, None)`."""
    if offset_col is None:
        return None, None
    if not isinstance(offset_col, (str, numbers.Integral)) or isinstance(offset_col, bool):
        raise ValueError(
            "`offset_col` must name one column of X (a name, or a position for an ndarray). "
            f"Received: offset_col={offset_col!r}"
        )
    (position,) = _column_positions(frame, [offset_col], "offset")
    if position in group_positions:
        raise ValueError(f"offset column {offset_col!r} is a group column")
    column = frame.iloc[:, position]
    try:
        categorical = is_categorical(offset_col, column)
    except TypeError:  # neither numbers nor labels (dates, ...)
        categorical = True
    if categorical:
        raise ValueError(
            f"offset column {offset_col!r} must be numeric (the offset on the link scale, "
            f"e.g. log exposure for a Poisson rate). Received dtype {column.dtype}"
        )
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(
            f"offset column {offset_col!r} has a missing or infinite value at row {row} "
            f"({column.iloc[row]!r}); every row needs a finite offset"
        )
    return position, values


def _check_not_offset(kind, col, position, feature_positions):
    if position not in feature_positions:  # not a group column: the offset
        raise ValueError(
            f"{kind} column {col!r} is the offset column (`offset_col`), which enters the "
            "predictor with coefficient 1 and is not a feature"
        )


def _check_group_keys(name, mapping, cols):
    """Raises when a key of the dict parameter `name` is not a grouping column."""
    unknown = [key for key in mapping if key not in cols]
    if unknown:
        raise ValueError(
            f"`{name}` names {unknown[0]!r}, which is not in `group_cols` ({cols}); its keys "
            "are grouping columns"
        )


def _flags_per_factor(name, value, cols, example) -> list:
    """Per grouping factor in `cols`, the bool the parameter `name` gives it: `value` is a
    bool for every factor or a dict group column -> bool (True where a factor is left
    out); anything else is an error showing `example`."""
    flags = value
    if isinstance(flags, (bool, np.bool_)):
        flags = {col: flags for col in cols}
    if not isinstance(flags, dict) or not all(
        isinstance(flag, (bool, np.bool_)) for flag in flags.values()
    ):
        raise ValueError(
            f"`{name}` must be True, False or a dict mapping group columns to True or False, "
            f"e.g. {example}. Received: {name}={value!r}"
        )
    _check_group_keys(name, flags, cols)
    return [bool(flags.get(col, True)) for col in cols]


def _random_intercepts(random_intercept, cols, slopes) -> list:
    """Per grouping factor, whether it has a random intercept; a factor without one must
    have random slopes."""
    result = _flags_per_factor("random_intercept", random_intercept, cols, "{'Subject': False}")
    for col, intercept, positions in zip(cols, result, slopes):
        if not intercept and not positions:
            raise ValueError(
                f"the grouping factor {col!r} has neither a random intercept nor random "
                f"slopes: give it slopes in `random_slopes` (lme4's `(0 + x | {col})`) or "
                f"leave its random intercept on. Received: random_intercept={random_intercept!r}"
            )
    return result


def _correlation_flags(correlated_slopes, cols) -> list:
    """Per grouping factor in `cols`, whether its terms are correlated."""
    example = "{'Subject': True, 'Item': False}"
    return _flags_per_factor("correlated_slopes", correlated_slopes, cols, example)


def _is_positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _as_column_list(cols) -> list:
    return [cols] if isinstance(cols, (str, numbers.Integral)) else list(cols)


def _column_positions(X, cols, kind) -> list:
    """Positions in the DataFrame X of `cols`: names, or integer positions if not names."""
    names = list(X.columns)
    positions = []
    for col in cols:
        if col in names:
            positions.append(names.index(col))
        elif isinstance(col, numbers.Integral) and not isinstance(col, bool):
            if not 0 <= col < X.shape[1]:
                raise ValueError(
                    f"{kind} column position {col} is out of range for X with {X.shape[1]} columns"
                )
            positions.append(int(col))
        else:
            raise ValueError(f"{kind} column {col!r} is not in X; its columns are {names}")
    if len(set(positions)) != len(positions):
        raise ValueError(f"`{kind}_cols` repeats a column: {cols!r}")
    return positions
