"""Reading a data root for the latent browser and other tools (`reader.py`, and the cached per-coder
indexes of `index.py`), exports of it to the formats other interpretability tools read, and imports
from them. Here, not in `storage/`, because reading the tables needs the scorers and coders above it."""
