"""safeport: eval."""
