"""safeport: flows."""
