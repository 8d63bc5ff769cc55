"""Software-defined assets, one module per stage: corpus → activations → exemplars → explanations → scores."""
