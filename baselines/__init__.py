"""Baseline KV-cache methods, one per file, on the shared cache framework."""
