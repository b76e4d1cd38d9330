"""``python -m mtrank``: the command line (:func:`mtrank.cli.main`)."""

from mtrank.cli import main

main()
