"""The latent browser: `autointerp view` serves it; these helpers give its URLs to other code.

Kept free of heavy imports so that assets can put links to it in their Dagster metadata.
"""
from __future__ import annotations

import os
from urllib.parse import quote

DEFAULT_VIEWER_URL = "http://127.0.0.1:8080"
DEFAULT_DAGSTER_URL = "http://127.0.0.1:3000"


def viewer_base_url() -> str:
    """`$AUTOINTERP_VIEWER_URL`, else where `autointerp view` listens by default."""
    return os.environ.get("AUTOINTERP_VIEWER_URL", DEFAULT_VIEWER_URL).rstrip("/")


def coder_url(coder: str, base: str | None = None) -> str:
    """The page listing one coder's latents."""
    return f"{base if base is not None else viewer_base_url()}/coder?coder={quote(coder, safe='')}"


def latent_url(coder: str, latent: int, base: str | None = None) -> str:
    """One latent's page."""
    return f"{base if base is not None else viewer_base_url()}/latent?coder={quote(coder, safe='')}&latent={int(latent)}"


def dagster_partition_url(asset: str, coder: str, shard: str | None = None) -> str:
    """The Dagster UI page of an asset partition (`coder|shard`, or `coder` for per-coder assets);
    base URL from `$AUTOINTERP_DAGSTER_URL`."""
    base = os.environ.get("AUTOINTERP_DAGSTER_URL", DEFAULT_DAGSTER_URL).rstrip("/")
    partition = f"{coder}|{shard}" if shard is not None else coder
    return f"{base}/assets/{asset}?view=partitions&partition={quote(partition, safe='')}"
