"""Evaluation: models and their placement, tasks, the generation protocol, grading, metrics, fidelity, the run loop
and its preflight checks, summaries and the papers' tables."""
