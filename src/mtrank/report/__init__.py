"""The experiment report: one self-contained HTML page (plots embedded as base64 PNG) built
from run directories (quickstart runs, bundles, benchmark JSON, quadrants and fuse outputs).

Entry points: :func:`mtrank.report.build.write_report` and the ``mtrank report`` command
(:mod:`mtrank.report.commands`).
"""
