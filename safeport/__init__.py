"""safeport: an activation-cache pipeline for cross-model safety steering."""

__version__ = "0.1.0"
