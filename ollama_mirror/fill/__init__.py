"""Getting bytes from upstream into the cache: one Fill per blob, and whole models."""
