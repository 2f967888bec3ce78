"""Data loaders and the canonical tables they produce."""
