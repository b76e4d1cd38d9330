"""mtrank: multi-objective ranking for e-commerce, built around ESMM.

ESMM: Ma et al., "Entire Space Multi-Task Model: An Effective Approach for Estimating
Post-Click Conversion Rate", SIGIR 2018.
"""

__version__ = "0.1.0"
