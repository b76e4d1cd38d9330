"""Model bundles and serving."""

from mtrank.serve.bundle import Bundle

__all__ = ["Bundle"]
