"""Links into the latent browser (`autointerp view`, `autointerp_defs/readside/`) and the Dagster UI.

Here, below both, so that assets can put links to the browser in their Dagster metadata and the
browser can link its pages to each other and to Dagster without any import running up. The base
URLs are the deployment's `[settings] viewer_url` and `dagster_url` (`resources/settings.py`), passed
in by the caller; `base=""` gives a path on the viewer's own server.
"""

from __future__ import annotations

from urllib.parse import quote

DEFAULT_VIEWER_URL = "http://127.0.0.1:8080"
DEFAULT_DAGSTER_URL = "http://127.0.0.1:3000"


def home_url(base: str = DEFAULT_VIEWER_URL) -> str:
    """The coders page."""
    return f"{base.rstrip('/')}/"


def coder_url(coder: str, base: str = DEFAULT_VIEWER_URL) -> str:
    """The page listing one coder's latents."""
    return f"{base.rstrip('/')}/coder?coder={quote(coder, safe='')}"


def latent_url(
    coder: str, latent: int, base: str = DEFAULT_VIEWER_URL, scorer: str | None = None
) -> str:
    """One latent's page; with `scorer`, its permalink that shows that scorer's score beside its control first."""
    url = f"{base.rstrip('/')}/latent?coder={quote(coder, safe='')}&latent={int(latent)}"
    return f"{url}&scorer={quote(scorer, safe='')}" if scorer else url


def dagster_asset_url(
    asset: str, partition: str | None = None, base: str = DEFAULT_DAGSTER_URL
) -> str:
    """The Dagster UI page of an asset, at one partition (`<coder>|<shard>`) when given; an unpartitioned
    asset (`score_summary`, `corpus`) has its plain asset page."""
    page = f"{base.rstrip('/')}/assets/{quote(asset, safe='/')}"
    return (
        f"{page}?view=partitions&partition={quote(partition, safe='')}"
        if partition is not None
        else page
    )
