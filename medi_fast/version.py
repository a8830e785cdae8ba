"""The package version.  A module of its own so that the modules ``medi_fast.load`` reaches (generate
records the version in run.json) can read it without importing the package that imports them."""
__version__ = "0.1.0"
