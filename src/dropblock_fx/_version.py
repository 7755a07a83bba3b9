"""The package version (one place; the command line reads it without importing the package)."""

__version__ = "0.1.0"
