"""Ranking on top of the model outputs: score fusion, offline replay and tuning, four-quadrant
analysis."""
