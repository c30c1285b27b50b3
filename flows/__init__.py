"""Prefect flows: thin wrappers that run the ``pipeline`` stages as observable, retryable, cached tasks."""
