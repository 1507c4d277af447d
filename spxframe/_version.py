"""The package version (moves with CHANGELOG.md)."""

__version__ = "0.2.0.dev0"
