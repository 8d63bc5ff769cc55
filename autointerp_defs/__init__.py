"""The Dagster `Definitions` of autointerp: `dagster dev -m autointerp_defs`."""

from autointerp_defs.definitions import defs

__all__ = ["defs"]
