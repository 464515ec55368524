"""Small data files shipped inside the package."""

from importlib import resources

import pandas as pd


def load_reedfrogs() -> pd.DataFrame:
    """The reedfrogs data: 48 tanks of tadpoles (Vonesh and Bolker 2005).

    Columns: `density` (10, 25 or 35 tadpoles at the start), `pred` ("no" / "pred"),
    `size` ("big" / "small"), `surv` (survivors) and `propsurv` (surv / density).

    Example:
        >>> load_reedfrogs().shape
        (48, 5)
    """
    with resources.files("reffects.datasets").joinpath("reedfrogs.csv").open() as handle:
        return pd.read_csv(handle)
