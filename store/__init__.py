"""safeport: store."""
