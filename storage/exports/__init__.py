"""Exports of a data root to the formats other interpretability tools read, and imports from them."""
