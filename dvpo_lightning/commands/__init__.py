"""The commands of ``python -m dvpo_lightning`` (the package's top layer: nothing in the package
imports them). Each module has ``main(args)``; :mod:`dvpo_lightning.__main__` holds the table."""
