"""mtrank: multi-objective ranking for e-commerce, built around ESMM.

From Python (see the README section "From Python")::

    import mtrank

    result = mtrank.run("configs/hillstrom.yaml")      # or a mtrank.RunConfig
    result.metrics["test"]["auc_ctcvr"]
    result.bundle.save("runs/model")
    scores = mtrank.Bundle.load("runs/model").predict(frame)   # polars or pandas frame

ESMM: Ma et al., "Entire Space Multi-Task Model: An Effective Approach for Estimating
Post-Click Conversion Rate", SIGIR 2018.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mtrank.version import __version__

if TYPE_CHECKING:
    from mtrank.bundle import Bundle
    from mtrank.config import RunConfig, load_config
    from mtrank.workflow import FitOutput, run


def __getattr__(name: str) -> Any:
    """The Python API, imported on first use (``import mtrank`` stays light for the CLI)."""
    if name == "run":
        from mtrank.workflow import run

        return run
    if name == "FitOutput":
        from mtrank.workflow import FitOutput

        return FitOutput
    if name == "Bundle":
        from mtrank.bundle import Bundle

        return Bundle
    if name == "RunConfig":
        from mtrank.config import RunConfig

        return RunConfig
    if name == "load_config":
        from mtrank.config import load_config

        return load_config
    raise AttributeError(f"module 'mtrank' has no attribute {name!r}")


__all__ = ["Bundle", "FitOutput", "RunConfig", "__version__", "load_config", "run"]
