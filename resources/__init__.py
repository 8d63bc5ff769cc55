"""Dagster resources: the subject model, sparse coders, LLM clients, the embedder and settings."""
