"""The package version, in a module of its own so that every layer can read it without
importing the public API (``qwt_deploy/__init__.py`` imports the whole pipeline)."""

__version__ = "0.1.0"
