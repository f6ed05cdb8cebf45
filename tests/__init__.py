"""safeport: tests."""
