"""Data layer: schema → readers/validation → encoders → tensor batches."""

from mtrank.data.schema import Schema

__all__ = ["Schema"]
