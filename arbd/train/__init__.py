"""Training loops and their helpers."""
