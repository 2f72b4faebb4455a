"""Reusable test helpers (fixtures and factories), importable as ``helpers.<name>``."""
