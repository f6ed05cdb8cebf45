"""safeport: safeport."""
