"""Train / validation / test splits: the dataset's own files, else by time, else seeded random."""

from __future__ import annotations

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from mtrank.data.datasets import LoadedData
from mtrank.data.io import ROW
from mtrank.errors import DataError


class SplitConfig(BaseModel):
    """How a single table is split. ``by_time`` = auto uses the schema's time column if any.

    By time, the latest ``test_fraction`` of rows is the test split and the latest
    ``val_fraction`` of the rest is validation (the past predicts the future). Otherwise rows
    are shuffled with ``seed``. When the dataset ships its own train/test files they are used
    as they are, and validation comes from the train file (its own val file if it has one).
    """

    model_config = ConfigDict(extra="forbid")

    test_fraction: float = Field(0.2, gt=0, lt=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    by_time: bool | None = None
    seed: int = 0


def _random_parts(df: pl.DataFrame, fractions: list[float], seed: int) -> list[pl.DataFrame]:
    order = np.random.default_rng(seed).permutation(df.height)
    cuts = np.cumsum([int(round(f * df.height)) for f in fractions])
    parts, start = [], 0
    for cut in [*cuts, df.height]:
        parts.append(df[np.sort(order[start:cut])])
        start = cut
    return parts


def split_data(data: LoadedData, cfg: SplitConfig) -> dict[str, pl.DataFrame]:
    """Return ``train``, ``val`` (possibly empty) and ``test`` tables.

    Raises:
        DataError: a split would be empty.
    """
    schema = data.schema
    if "train" in data.splits:
        train, test = data.splits["train"], data.splits["test"]
        if "val" in data.splits:
            val = data.splits["val"]
        elif cfg.val_fraction > 0:
            val, train = _random_parts(train, [cfg.val_fraction], cfg.seed)
        else:
            val = train.clear()
    else:
        df = data.splits["all"]
        by_time = cfg.by_time if cfg.by_time is not None else schema.time is not None
        if by_time:
            if schema.time is None:
                raise DataError("a time split needs a time column in the schema")
            df = df.sort([schema.time, ROW])
            n_test = int(round(cfg.test_fraction * df.height))
            rest, test = df.head(df.height - n_test), df.tail(n_test)
            n_val = int(round(cfg.val_fraction * rest.height))
            train, val = rest.head(rest.height - n_val), rest.tail(n_val)
        else:
            test, val, train = _random_parts(df, [cfg.test_fraction, cfg.val_fraction], cfg.seed)
    for name, part in (("train", train), ("test", test)):
        if part.height == 0:
            raise DataError(
                f"the {name} split is empty; the dataset has too few rows for these fractions"
            )
    return {"train": train, "val": val, "test": test}
