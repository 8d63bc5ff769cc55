"""The latent browser: `autointerp view` serves it (`server.py`); its URLs are built in `assets/links.py`."""
