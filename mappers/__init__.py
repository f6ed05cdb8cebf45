"""safeport: mappers."""
