"""lme4 model formulas for the estimators: `from_formula`, `parse_formula`, `design_frame`.

    y ~ x1 + C(x2) + (1 + x1 | g) + (1 | a/b)

is read as lme4 reads it and mapped onto `RandomEffectsRegressor` (families "gaussian",
"poisson", "binomial") or `RandomEffectsClassifier` ("bernoulli"):

    (1 | g)                              group_cols=["g"]
    (x | g), (1 + x | g)                 random_slopes={"g": ["x"]}, correlated_slopes=True
    (x || g), (1 | g) + (0 + x | g)      random_slopes={"g": ["x"]}, correlated_slopes=False
    (0 + x | g), (0 + x + z | g)         random_slopes={"g": ["x", ...]},
                                         random_intercept={"g": False}: slopes alone, about
                                         x's own origin, as lme4 has them
    (0 + x + z || g)                     the same, with correlated_slopes=False
    (x | a) + (x || b)                   correlated_slopes={"a": True, "b": False}: one
                                         choice per factor
    (1 | g) + (0 + x + z | g)            as lme4: two factors, g (the intercept) and g.1
                                         (x and z correlated, no intercept), group column
                                         g.1 a copy of g; so whenever a factor's term
                                         correlates several effects and it has other terms
    (1 | a/b)                            (1 | a) + (1 | a:b)
    (1 | a:b)                            a group column "a:b": a's and b's labels as strings,
                                         joined by ":"
    (1 | a) + (1 | b)                    crossed factors: group_cols=["a", "b"]
    cbind(s, f) ~ ...  (binomial)        y = s / (s + f), sample_weight = s + f
    p ~ ..., weights="n"                 sample_weight = column n (binomial: the trials)
    y ~ x + offset(np.log(t)) + ...      offset_col="offset(np.log(t))", a column of X holding
                                         the expression's value (several offsets: their sum)
    y ~ x  (no random term)              group_cols=[]: a Bayesian GLM

The fixed part (everything but the random-effect terms) is materialised by formulaic:
string and category columns and `C(x)` become treatment-coded dummy columns named
`x[T.level]` (reference: the first level, sorted, or a category's first), boolean columns
enter as 0/1, and `np.log(x)`, `I(x ** 2)`, `center(x)`,
interactions `x:z` and `x * z` work as formulaic has them. Each column is a feature of the
estimator, so the names are those of `feature_names_in_` and of `inspection.fixed_effects`.

What reffects cannot express is an error, not a silent change of model:

- a random slope is always a fixed effect too: `y ~ (x | g)` is an error (lme4 would fix
  the slope's mean at 0); write `y ~ x + (x | g)`;
- a factor's intercept in two terms, categorical slopes in
  a term with `||` or without an intercept (lme4 codes them with every level there),
  `offset()` inside another term, and a fixed part without its intercept (`0 +`, `- 1`:
  the estimators always fit one) are errors.

Formula library: formulaic (`formulaic>=1.2`; written against 1.2.2). Its `ModelSpec`
remembers the training levels of every categorical variable and the state of stateful
transforms, rebuilds the same columns for new data and pickles (so a fitted estimator that
holds it still pickles), and it names dummies `x[T.level]` as R and patsy do. formulae
(bambi's, 0.9.0; it installs as cleanly) parses `(x | g)` and `/` itself, but it flattens
`(1 + x | g)` and `(1 | g) + (0 + x | g)` into the same terms, losing the correlation
structure this module must map, has neither `||` nor `cbind`, and keeps the caller's
namespace in its design objects, which cannot be pickled. So the lme4 pieces are this
module's own: splitting off the `( | )` terms, `||`, the `/` and `:` of grouping factors,
`cbind`; formulaic reads each term's left side and the whole fixed part.

Example:
    >>> import numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> data = pd.DataFrame({
    ...     "school": rng.choice(["a", "b", "c", "d"], 300),
    ...     "sector": rng.choice(["private", "public"], 300),
    ...     "x": rng.normal(size=300),
    ... })
    >>> effect = data["school"].map({"a": -1.0, "b": 0.0, "c": 1.0, "d": 0.5})
    >>> data["y"] = effect + 2 * data["x"] + rng.normal(size=300)
    >>> est = from_formula("y ~ x + sector + (1 | school)", data, random_state=0)
    >>> list(est.feature_names_in_), str(est.formula_)
    (['school', 'x', 'sector[T.public]'], 'y ~ x + sector + (1 | school)')
    >>> new = pd.DataFrame({"school": ["a", "e"], "sector": ["public", "public"], "x": [0.0, 1.0]})
    >>> design_frame(est, new).columns.tolist()
    ['school', 'x', 'sector[T.public]']
    >>> est.predict(design_frame(est, new)).shape
    (2,)
"""

from __future__ import annotations

import collections
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from formulaic import Formula, ModelSpec, model_matrix
from formulaic.errors import DataMismatchWarning, FormulaicError
from formulaic.utils.context import capture_context

from reffects.estimators import RandomEffectsClassifier, RandomEffectsRegressor

__all__ = ["LmeFormula", "RandomTerm", "design_frame", "from_formula", "parse_formula", "response"]

FAMILIES = ("gaussian", "poisson", "binomial", "bernoulli")
# Set by the formula, so not accepted among `**params`.
_FORMULA_PARAMS = (
    "group_cols",
    "random_slopes",
    "random_intercept",
    "correlated_slopes",
    "offset_col",
)
_OFFSET = re.compile(r"\s*offset\s*\((.*)\)\s*", re.DOTALL)
_NAME = r"(?:[A-Za-z_.][A-Za-z0-9_.]*|`[^`]+`)"  # a column name, bare or in backticks
_ANSI = re.compile(r"\x1b\[[0-9;]*m|[⧛⧚]")


@dataclass(frozen=True)
class RandomTerm:
    """One random-effect term as written, e.g. `(1 + Days | Subject)`.

    Attributes:
        text: the term as written.
        intercept: whether its left side has an intercept.
        slopes: the slope terms of its left side, as formulaic prints them (`"x"`,
            `"np.log(x)"`, `"x:z"`).
        factors: its grouping factors after `/` is expanded: `("a", "a:b")` for `a/b`.
        independent: written with `||`.
        factor_columns: the data columns of each factor: `(("a",), ("a", "b"))` for `a/b`.
        slope_factors: the factors of each slope term (`{"x", "z"}` for `x:z`), by which it
            is found among the fixed part's terms.
    """

    text: str
    intercept: bool
    slopes: tuple[str, ...]
    factors: tuple[str, ...]
    independent: bool
    factor_columns: tuple[tuple[str, ...], ...]
    slope_factors: tuple[frozenset, ...] = field(repr=False, default=())


@dataclass(frozen=True)
class LmeFormula:
    """A parsed lme4 formula: the estimator's parameters and how to build its X and y.

    Attributes:
        formula: the formula as given.
        response: the left side (None for `cbind`).
        cbind: `(successes, failures)`, the two expressions of `cbind(...)`, or None.
        fixed: the fixed part handed to formulaic (`"1"` when there is none).
        random_terms: the `RandomTerm`s, in the order written.
        group_cols: the estimator's grouping factors, in order of appearance.
        group_factors: group column -> the data columns it is made of (`"a:b"` -> a, b).
        random_slopes: group column -> its slope feature columns (empty: intercepts only).
        correlated_slopes: False when the slopes are independent of the intercepts (and of
            each other); a dict group column -> bool when that differs by factor.
        random_intercept: group column -> whether it has a random intercept (False for a
            factor with `(0 + x | g)` terms alone).
        feature_names: the fixed-effect columns, the intercept left out.
        offsets: the expressions of the fixed part's `offset(...)` terms (summed).
        model_spec: formulaic's `ModelSpec` of the fixed part on the training data: it holds
            the training levels of each categorical variable.
    """

    formula: str
    response: str | None
    cbind: tuple[str, str] | None
    fixed: str
    random_terms: tuple[RandomTerm, ...]
    group_cols: tuple[str, ...]
    group_factors: dict[str, tuple[str, ...]]
    random_slopes: dict[str, tuple[str, ...]]
    correlated_slopes: bool | dict[str, bool]
    random_intercept: dict[str, bool]
    feature_names: tuple[str, ...]
    offsets: tuple[str, ...]
    model_spec: ModelSpec = field(repr=False, compare=False)

    def __str__(self):
        return self.formula

    @property
    def offset_column(self) -> str | None:
        """The name of X's offset column (`offset(...)` as written), or None."""
        return " + ".join(f"offset({e})" for e in self.offsets) if self.offsets else None

    def estimator_params(self) -> dict:
        """`group_cols`, and `random_slopes` and `correlated_slopes` when there are slopes,
        `random_intercept` (the factors without one) when a factor has none, and
        `offset_col` with an `offset(...)` term."""
        params = {"group_cols": list(self.group_cols)}
        if self.random_slopes:
            params["random_slopes"] = {g: list(s) for g, s in self.random_slopes.items()}
            params["correlated_slopes"] = (
                dict(self.correlated_slopes)
                if isinstance(self.correlated_slopes, dict)
                else self.correlated_slopes
            )
        without = {g: False for g, has in self.random_intercept.items() if not has}
        if without:
            params["random_intercept"] = without
        if self.offsets:
            params["offset_col"] = self.offset_column
        return params


# --------------------------------------------------------------------------- public API
def from_formula(
    formula: str,
    data: pd.DataFrame,
    family: str = "gaussian",
    *,
    weights=None,
    context: int | Mapping = 0,
    **params,
):
    """Fits a `RandomEffectsRegressor` or `RandomEffectsClassifier` from an lme4 formula.

    Args:
        formula: an lme4 formula, e.g. `"y ~ x + (x | g) + (1 | a/b)"`; see the module
            docstring for what is supported.
        data: a DataFrame holding every column the formula names.
        family: "gaussian", "poisson" or "binomial" (a `RandomEffectsRegressor`), or
            "bernoulli" (a `RandomEffectsClassifier`, y any two labels). "binomial" takes
            `cbind(successes, failures) ~ ...`, or a proportion with `weights` the trials.
        weights: None, the name of a column of `data` or an array: `sample_weight` (for
            "binomial" with a proportion response, the trials; not with `cbind`).
        context: where functions the formula calls (`np`, your own) are looked up: a
            mapping, or the frame depth above the caller (0: the caller's variables, as in
            formulaic). `np` is always available.
        **params: any other parameter of the estimator (`random_state`, `hidden_units`,
            `reml`, ...). `group_cols`, `random_slopes`, `random_intercept`,
            `correlated_slopes` and `offset_col` come from the formula.

    Returns:
        The fitted estimator, with `formula_` (the `LmeFormula`) set:
        `design_frame(est, new_data)` builds X for new data with the training levels, for
        `predict`, `predict_interval` and the `inspection` functions. `formula_` describes the
        fit made here: `clone` drops it, and a later `fit` of the estimator leaves it as it is.

    Raises:
        ValueError: the formula is malformed, names a column that is not in `data`, or asks
            for something reffects does not fit (the message says what and how to write it).
    """
    context = _context(context)
    if family not in FAMILIES:
        raise ValueError(
            f"`family` must be one of {', '.join(map(repr, FAMILIES))}. Received: family={family!r}"
        )
    fixed_by_formula = [name for name in _FORMULA_PARAMS if name in params]
    if fixed_by_formula:
        raise ValueError(
            f"{', '.join(f'`{n}`' for n in fixed_by_formula)} come from the formula; "
            f"do not pass them to from_formula (an offset is a term `+ offset(expr)`). "
            f"Received: {fixed_by_formula}"
        )
    spec = parse_formula(formula, data, context=context)
    if spec.cbind is not None and family != "binomial":
        raise ValueError(
            f"`cbind(...)` responses need family='binomial'. Received: family={family!r} "
            f"for {formula!r}"
        )
    estimator_class = RandomEffectsClassifier if family == "bernoulli" else RandomEffectsRegressor
    estimator_params = spec.estimator_params()
    if family != "bernoulli":
        estimator_params["family"] = family
    estimator = estimator_class(**estimator_params, **params)
    X = design_frame(spec, data, context=context)
    y, sample_weight = response(spec, data, weights=weights, context=context)
    estimator.fit(X, y, sample_weight=sample_weight)
    estimator.formula_ = spec
    return estimator


def parse_formula(formula: str, data: pd.DataFrame, *, context: int | Mapping = 0) -> LmeFormula:
    """Reads an lme4 formula against `data`, without fitting anything.

    Args:
        formula: an lme4 formula (see the module docstring).
        data: the training data: the fixed part's dummy columns follow its levels.
        context: as in `from_formula`.

    Returns:
        An `LmeFormula`.

    Raises:
        ValueError: naming the offending term.

    Example:
        >>> data = pd.DataFrame({"y": [1.0, 2.0, 3.0, 4.0], "x": [0.0, 1.0, 0.5, 2.0],
        ...                      "a": ["p", "p", "q", "q"], "b": ["u", "v", "u", "v"]})
        >>> spec = parse_formula("y ~ x + (x || a) + (1 | a:b)", data)
        >>> spec.group_cols, spec.random_slopes, spec.correlated_slopes
        (('a', 'a:b'), {'a': ('x',)}, False)
    """
    context = _context(context)
    if not isinstance(formula, str):
        raise ValueError(f"`formula` must be a string. Received: formula={formula!r}")
    if not isinstance(data, pd.DataFrame):
        raise ValueError(f"`data` must be a pandas DataFrame. Received: {type(data).__name__}")
    lhs, rhs = _split_tilde(formula)
    cbind = _cbind_arguments(lhs, formula)
    fixed_chunks, random_terms, offsets = [], [], []
    for chunk in _top_level_split(rhs, "+", formula):
        if _find_bars(chunk) is not None:
            random_terms.append(_random_term(chunk, formula, data))
        elif (offset := _OFFSET.fullmatch(chunk)) and _balanced(offset.group(1)):
            offsets.append(offset.group(1).strip())
            _evaluate(offsets[-1], data, context, formula, "offset")  # an error names it
        else:
            fixed_chunks.append(chunk)
    fixed = " + ".join(fixed_chunks) if fixed_chunks else "1"
    if re.search(r"(?<![\w.])offset\s*\(", fixed):
        raise ValueError(
            f"an offset must be a term of its own in the fixed part, `+ offset(expression)`; "
            f"the fixed part of {formula!r} has offset() inside another term"
        )
    design = _materialise(fixed, data, context, formula)
    if "Intercept" not in design.columns:
        raise ValueError(
            f"the fixed part `{fixed}` of {formula!r} has no intercept; reffects always fits a "
            "global intercept: remove `0 +` / `- 1`"
        )
    feature_names = tuple(str(c) for c in design.columns if c != "Intercept")
    columns_of_term = {
        _factors(part.term): [str(c) for c in part.columns] for part in design.model_spec.structure
    }
    group_cols, group_factors, random_slopes, correlated, random_intercept = _random_structure(
        random_terms, columns_of_term, formula
    )
    clash = sorted(set(group_cols) & set(feature_names))
    # lme4's g.1 of a split factor: one data column of another name
    split = [n for n in clash if len(group_factors[n]) == 1 and group_factors[n] != (n,)]
    if split:
        raise ValueError(
            f"{split} in {formula!r} is a fixed-effect column and also lme4's name for a "
            "further term on a grouping factor; rename that column"
        )
    if clash:
        raise ValueError(
            f"{clash} in {formula!r} is both a grouping factor and a fixed-effect column; a "
            "numeric grouping factor cannot be a fixed effect too (use C(...) for its levels)"
        )
    return LmeFormula(
        formula=formula,
        response=None if cbind else lhs,
        cbind=cbind,
        fixed=fixed,
        random_terms=tuple(random_terms),
        group_cols=tuple(group_cols),
        group_factors=group_factors,
        random_slopes=random_slopes,
        correlated_slopes=correlated,
        random_intercept=random_intercept,
        feature_names=feature_names,
        offsets=tuple(offsets),
        model_spec=design.model_spec,
    )


def design_frame(fitted, data: pd.DataFrame, *, context: int | Mapping = 0) -> pd.DataFrame:
    """X for the estimator: the group columns, then the fixed-effect columns, from `data`.

    Categorical variables are coded with their training levels; a level not seen in
    training is an error (as in lme4's `predict`). Unseen groups are fine: they are the
    estimator's business (offset 0 in `predict`).

    Args:
        fitted: an estimator returned by `from_formula`, or an `LmeFormula`.
        data: a DataFrame with the columns the formula's right side names (the response
            may be absent).
        context: as in `from_formula`.

    Returns:
        A DataFrame with `data`'s index and the columns `fitted` was trained on.
    """
    context = _context(context)
    spec = fitted if isinstance(fitted, LmeFormula) else getattr(fitted, "formula_", None)
    if not isinstance(spec, LmeFormula):
        raise ValueError(
            "`fitted` must be an estimator returned by from_formula (with `formula_`) or an "
            f"LmeFormula. Received: {type(fitted).__name__}"
        )
    if not isinstance(data, pd.DataFrame):
        raise ValueError(f"`data` must be a pandas DataFrame. Received: {type(data).__name__}")
    groups = {}
    for col in spec.group_cols:
        parts = spec.group_factors[col]
        missing = [p for p in parts if p not in data.columns]
        if missing:
            raise ValueError(f"data has no column {missing[0]!r} (grouping factor {col!r})")
        if len(parts) == 1:
            groups[col] = data[parts[0]]
            continue
        for part in parts:
            absent = np.asarray(pd.isna(data[part]))
            if absent.any():
                raise ValueError(
                    f"column {part!r} of the grouping factor {col!r} has a missing value at row "
                    f"{int(np.argmax(absent))}; every row needs a group label"
                )
        labels = data[parts[0]].astype(str)
        for part in parts[1:]:
            labels = labels + ":" + data[part].astype(str)
        groups[col] = labels
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataMismatchWarning)
        try:
            features = spec.model_spec.get_model_matrix(data, context=context)
        except DataMismatchWarning as warning:
            raise ValueError(
                f"data has a level of a categorical variable not seen in training: "
                f"{_clean(warning)} The fixed part {spec.fixed!r} can only code training levels"
            ) from None
        except (FormulaicError, ValueError) as error:
            raise ValueError(
                f"cannot evaluate the fixed part {spec.fixed!r} on data: {_clean(error)}"
            ) from None
    frame = pd.DataFrame(groups, index=data.index)
    for name in spec.feature_names:
        frame[name] = np.asarray(features[name], dtype="float64")
    if spec.offsets:
        frame[spec.offset_column] = sum(
            _evaluate(expr, data, context, spec.formula, "offset") for expr in spec.offsets
        )
    return frame


def response(
    spec: LmeFormula, data: pd.DataFrame, *, weights=None, context: int | Mapping = 0
) -> tuple:
    """y and `sample_weight` for the estimator's `fit`, from the formula's left side.

    `cbind(s, f)`: y = s / (s + f) (0 where there are no trials) and `sample_weight` =
    s + f. Otherwise y is the column (kept as it is, so labels of any type work for
    "bernoulli") or the expression's value, and `sample_weight` is `weights`.

    Args:
        spec: an `LmeFormula`.
        data: the training data.
        weights: None, a column name of `data` or an array of `len(data)`.
        context: as in `from_formula`.

    Returns:
        `(y, sample_weight)`, numpy arrays (`sample_weight` may be None).
    """
    context = _context(context)
    if spec.cbind is not None:
        if weights is not None:
            raise ValueError(
                f"`weights` cannot be combined with a cbind(...) response: the trials of "
                f"{spec.formula!r} are successes + failures. Received: weights={weights!r}"
            )
        successes, failures = (
            _evaluate(expr, data, context, spec.formula, "cbind") for expr in spec.cbind
        )
        for expr, values in zip(spec.cbind, (successes, failures)):
            bad = ~(values >= 0)
            if bad.any():
                raise ValueError(
                    f"cbind(...) counts must be non-negative; `{expr}` is {values[bad][0]:g} at "
                    f"row {int(np.argmax(bad))}"
                )
        trials = successes + failures
        y = np.divide(successes, trials, out=np.zeros_like(trials), where=trials > 0)
        return y, trials
    if spec.response in data.columns:
        y = data[spec.response].to_numpy()
    else:
        y = _evaluate(spec.response, data, context, spec.formula, "response")
    if isinstance(weights, str):
        if weights not in data.columns:
            raise ValueError(f"`weights` names no column of data. Received: weights={weights!r}")
        weights = data[weights]
    return y, None if weights is None else np.asarray(weights, dtype="float64")


# --------------------------------------------------------------------------- parsing
def _context(context):
    """The formulaic context as a mapping, with numpy as `np` behind it."""
    if isinstance(context, collections.ChainMap) and context.maps[-1].get("np") is np:
        return context  # already made by a public function that called this one
    if isinstance(context, int):
        # frames: capture_context, _context, the public function, its caller (depth 0)
        context = capture_context(context + 2)
    return collections.ChainMap(context or {}, {"np": np})


def _scan(text):
    """(index, character, depth) of each character outside quotes and backticks."""
    depth, quote = 0, None
    for index, char in enumerate(text):
        if quote:
            if char == quote:
                quote = None
            continue
        if char in "`'\"":
            quote = char
            continue
        if char == ")":
            depth -= 1
        yield index, char, depth
        if char == "(":
            depth += 1


def _top_level_split(text, separator, formula):
    """`text` split at `separator` outside any parentheses, each piece stripped."""
    pieces, start = [], 0
    for index, char, depth in _scan(text):
        if char == separator and depth == 0:
            pieces.append(text[start:index].strip())
            start = index + 1
    pieces.append(text[start:].strip())
    if any(not piece for piece in pieces):
        raise ValueError(f"{formula!r} has an empty term (a stray {separator!r})")
    return pieces


def _final_depth(text):
    """The depth of parentheses at the end of `text`, or -1 where a `)` closes nothing."""
    depth = 0
    for _, char, _ in _scan(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return -1
    return depth


def _split_tilde(formula):
    if _final_depth(formula) != 0:
        raise ValueError(f"unbalanced parentheses in {formula!r}")
    tildes = [i for i, char, depth in _scan(formula) if char == "~" and depth == 0]
    if len(tildes) != 1:
        raise ValueError(
            f"a formula has one `~` between the response and the terms, e.g. "
            f"'y ~ x + (1 | g)'. Received: {formula!r}"
        )
    lhs, rhs = formula[: tildes[0]].strip(), formula[tildes[0] + 1 :].strip()
    if not lhs:
        raise ValueError(f"{formula!r} has no response left of `~`")
    if not rhs:
        raise ValueError(f"{formula!r} has no terms right of `~` (write `y ~ 1 + (1 | g)`)")
    if _find_bars(lhs) is not None:
        raise ValueError(f"`|` in the response {lhs!r} of {formula!r}")
    return lhs, rhs


def _cbind_arguments(lhs, formula):
    match = re.fullmatch(r"cbind\s*\((.*)\)", lhs, flags=re.DOTALL)
    if not match or _final_depth(match.group(1)) != 0:
        return None
    arguments = _top_level_split(match.group(1), ",", formula)
    if len(arguments) != 2:
        raise ValueError(
            f"cbind(...) takes two arguments, successes and failures, as in "
            f"'cbind(incidence, size - incidence) ~ ...'. Received: {lhs!r}"
        )
    return tuple(arguments)


def _balanced(text) -> bool:
    """Whether every parenthesis in `text` closes one opened before it in `text`."""
    depth = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def _find_bars(text):
    """(index, depth, width) of each `|` or `||` outside quotes; None when there is none."""
    bars, skip = [], False
    scanned = list(_scan(text))
    for k, (index, char, depth) in enumerate(scanned):
        if skip:
            skip = False
            continue
        if char == "|":
            double = k + 1 < len(scanned) and scanned[k + 1][:2] == (index + 1, "|")
            bars.append((index, depth, 2 if double else 1))
            skip = double
    return bars or None


def _random_term(chunk, formula, data):
    """A `RandomTerm` from one `+`-separated piece of the right side holding a `|`."""
    bars = _find_bars(chunk)
    if any(depth == 0 for _, depth, _ in bars):
        raise ValueError(
            f"`|` outside parentheses in the term {chunk!r} of {formula!r}: write a "
            "random-effect term in parentheses, as `(x | g)`"
        )
    closing = [i for i, char, depth in _scan(chunk) if char == ")" and depth == 0]
    if not (chunk.startswith("(") and closing and closing[0] == len(chunk) - 1):
        raise ValueError(
            f"the random-effect term in {chunk!r} of {formula!r} must be added on its own, "
            "as `... + (x | g)`"
        )
    if len(bars) != 1 or bars[0][1] != 1:
        raise ValueError(
            f"the random-effect term {chunk!r} of {formula!r} needs exactly one `|` (or `||`), "
            "between the effects and the grouping factor, as `(1 + x | g)`"
        )
    index, _, width = bars[0]
    lhs, rhs = chunk[1:index].strip(), chunk[index + width : -1].strip()
    if not lhs:
        raise ValueError(
            f"the random-effect term {chunk!r} of {formula!r} has nothing left of `|`; "
            "write (1 | g) for a random intercept"
        )
    if not rhs:
        raise ValueError(
            f"the random-effect term {chunk!r} of {formula!r} has no grouping factor right of "
            "`|`, as in (1 | g)"
        )
    try:
        parsed = list(Formula(lhs))
        terms = [term for term in parsed if str(term) != "1"]
        intercept = len(terms) < len(parsed)
    except FormulaicError as error:
        raise ValueError(
            f"cannot read the left side {lhs!r} of {chunk!r} in {formula!r}: {_clean(error)}"
        ) from None
    factor_columns = _grouping_factors(rhs, chunk, formula, data)
    return RandomTerm(
        text=chunk,
        intercept=intercept,
        slopes=tuple(str(term) for term in terms),
        factors=tuple(":".join(columns) for columns in factor_columns),
        independent=width == 2,
        factor_columns=factor_columns,
        slope_factors=tuple(_factors(term) for term in terms),
    )


def _grouping_factors(rhs, chunk, formula, data):
    """`a/b:c` -> (("a",), ("a", "b", "c")) after checking every name is a column of data."""
    if not re.fullmatch(rf"\s*{_NAME}(?:\s*[/:]\s*{_NAME})*\s*", rhs):
        raise ValueError(
            f"the grouping factor {rhs!r} of {chunk!r} in {formula!r} must be column names "
            "joined by `:` (interaction) or `/` (nesting), as in (1 | g), (1 | a:b), (1 | a/b)"
        )
    factors, names = [], []
    for nested in rhs.split("/"):
        names = names + [name.strip().strip("`") for name in nested.split(":")]
        factors.append(names)
    for name in names:
        if name not in data.columns:
            raise ValueError(
                f"the grouping factor {name!r} of {chunk!r} in {formula!r} is not a column of data"
            )
    return tuple(tuple(names) for names in factors)


def _random_structure(random_terms, columns_of_term, formula):
    """(group_cols, group_factors, random_slopes, correlated_slopes, random_intercept) of
    the random terms; `random_intercept` maps each factor to whether it has one;
    `correlated_slopes` is one bool when every factor with several effects has them
    correlated (`|`) or every one independent (`||`), else a dict factor -> bool.

    A grouping factor in several terms is one factor with independent effects, unless one
    of its terms correlates several effects (`(1 | g) + (0 + x + z | g)`): then, as in
    lme4, each term is a factor of its own, `g`, `g.1`, ... (a copy of g's labels), whose
    effects are independent of the other terms'.
    """
    terms_of, intercept_term, seen, own_columns = {}, {}, {}, {}
    for term in random_terms:
        if not term.intercept and not term.slopes:
            raise ValueError(
                f"the random-effect term {term.text!r} of {formula!r} has no effects left of "
                "`|`; write (1 | g) for a random intercept or (0 + x | g) for a slope"
            )
        for factor in term.factors:
            terms_of.setdefault(factor, []).append(term)
            if term.intercept:
                if factor in intercept_term:
                    raise ValueError(
                        f"the grouping factor {factor!r} has a random intercept in both "
                        f"{intercept_term[factor]!r} and {term.text!r} of {formula!r}; give it "
                        "one (write its slopes in one term, or use `0 + x`)"
                    )
                intercept_term[factor] = term.text
            columns = own_columns.setdefault((term.text, factor), [])
            # lme4 codes a categorical slope with every level in a term without an intercept
            # or with `||`; reffects codes it as the fixed part does, so only in `(1 + c | g)`.
            full_rank = term.independent or not term.intercept
            for slope, key in zip(term.slopes, term.slope_factors):
                columns_of_slope = columns_of_term.get(key)
                for column in _slope_columns(slope, columns_of_slope, term, full_rank, formula):
                    if column in seen.setdefault(factor, []):
                        raise ValueError(
                            f"the random slope of {column!r} on {factor!r} appears twice in "
                            f"{formula!r}"
                        )
                    seen[factor].append(column)
                    columns.append(column)
    source = {}
    for term in random_terms:
        for factor, columns in zip(term.factors, term.factor_columns):
            source.setdefault(factor, columns)
    group_cols, group_factors, random_slopes, random_intercept = [], {}, {}, {}
    correlated = {}  # factor -> whether its effects are correlated, where it has several
    owner = {}  # estimator factor -> the formula's factor it comes from

    def add(name, factor, terms, flag):
        if name in owner:  # a column named as lme4 names a further term on a factor
            split = owner[name] if owner[name] != name else factor
            raise ValueError(
                f"{formula!r} groups by a column {name!r}, which is also lme4's name for a "
                f"further term on {split!r}; rename that column"
            )
        owner[name] = factor
        group_cols.append(name)
        group_factors[name] = source[factor]
        columns = [c for term in terms for c in own_columns[(term.text, factor)]]
        if columns:
            random_slopes[name] = tuple(columns)
        random_intercept[name] = any(term.intercept for term in terms)
        if int(random_intercept[name]) + len(columns) > 1:
            correlated[name] = flag

    for factor, terms in terms_of.items():
        joint = [t for t in terms if not t.independent and int(t.intercept) + len(t.slopes) > 1]
        if len(terms) == 1:  # one term: `|` correlates its effects, `||` does not
            add(factor, factor, terms, not terms[0].independent)
        elif not joint:  # several terms, none correlating its effects: independent
            add(factor, factor, terms, False)
        else:  # each term its own factor, as lme4's g, g.1, ...
            for index, term in enumerate(terms):
                add(f"{factor}.{index}" if index else factor, factor, [term], not term.independent)
    flags = set(correlated.values())
    if len(flags) > 1:  # `|` on one factor, `||` on another: one flag per factor
        correlated_slopes = dict(correlated)
    else:
        correlated_slopes = flags.pop() if flags else True
    return group_cols, group_factors, random_slopes, correlated_slopes, random_intercept


def _factors(term):
    """A formulaic term's factors as strings: `x:z` and `z:x` are the same term."""
    return frozenset(str(factor) for factor in term.factors)


def _slope_columns(slope, columns, term, full_rank, formula):
    """The fixed-effect columns of one slope term; an error if it is not in the fixed part."""
    if columns is None:
        raise ValueError(
            f"the random slope {slope!r} of {term.text!r} is not a fixed effect of {formula!r}; "
            "reffects estimates each random slope's mean as a fixed effect (lme4 would fix it "
            f"at 0): add {slope!r} to the fixed part, e.g. 'y ~ {slope} + {term.text}'"
        )
    if full_rank and columns != [slope]:
        raise ValueError(
            f"the random slope {slope!r} of {term.text!r} in {formula!r} is categorical "
            f"({columns}); categorical slopes in a term with `||` or without an intercept are "
            "not supported (lme4 codes them with every level there): use `(1 + x | g)` or "
            "numeric dummy columns"
        )
    return columns


# ------------------------------------------------------------------------ evaluation
def _materialise(fixed, data, context, formula):
    try:
        return model_matrix(fixed, data, context=context, na_action="raise")
    except FormulaicError as error:
        raise ValueError(
            f"cannot build the fixed part {fixed!r} of {formula!r}: {_clean(error)}"
        ) from None
    except ValueError as error:  # formulaic's missing-value check
        raise ValueError(f"the fixed part {fixed!r} of {formula!r}: {_clean(error)}") from None


def _evaluate(expr, data, context, formula, what):
    """A numeric expression of data's columns (`size - incidence`), as float64."""
    try:
        values = model_matrix(f"0 + I({expr})", data, context=context, na_action="raise")
    except (FormulaicError, ValueError) as error:
        raise ValueError(
            f"cannot evaluate the {what} {expr!r} of {formula!r}: {_clean(error)}"
        ) from None
    if values.shape[1] != 1:
        raise ValueError(f"the {what} {expr!r} of {formula!r} must be numeric")
    return values.iloc[:, 0].to_numpy(dtype="float64")


def _clean(error):
    """formulaic's message without its terminal colours, on one line."""
    return " ".join(_ANSI.sub("", str(error)).split())
