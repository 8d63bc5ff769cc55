"""The cluster's services for its tests (`tests/cluster/services.py`): a throwaway PostgreSQL server
(coordination, the Dagster instance) and Redis (the celery broker), each started once per session
and stopped by its process id at the end; each test gets a database of its own. Without them, or
without the `cluster` extra, the tests fail with the command that installs them: they never skip."""

from __future__ import annotations

import contextlib

import pytest

from tests.cluster.services import (
    ServiceMissing,
    dagster_postgres_url,
    fresh_database,
    redis_server,
)
from tests.cluster.services import (
    postgres_server as postgres,
)


@contextlib.contextmanager
def failing_where_missing(service):
    """`service`, failing the test (not erroring) with the fix where its program is not installed."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(service)
        except ServiceMissing as missing:
            pytest.fail(str(missing), pytrace=False)
        yield url


@pytest.fixture(scope="session")
def postgres_server():
    """The URL of the session's server on 127.0.0.1, as the superuser `postgres` with its password."""
    with failing_where_missing(postgres()) as server:
        yield server.url


@pytest.fixture()
def coordination_url(postgres_server):
    """A fresh database on the session's server: what `[settings] coordination_url` names."""
    return fresh_database(postgres_server)


@pytest.fixture()
def postgres_url(postgres_server):
    """A fresh database for a Dagster instance, in the scheme dagster-postgres' SQLAlchemy needs (psycopg2)."""
    return dagster_postgres_url(fresh_database(postgres_server))


def needs_the_cluster_extra() -> None:
    """Fail the calling test module, naming the fix, where the `cluster` extra is not installed."""
    import importlib.util

    missing = [
        module
        for module in ("dagster_celery", "dagster_postgres")
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        pytest.fail(
            f"the cluster tests need the `cluster` extra ({', '.join(missing)} missing). "
            "Fix: pip install -e '.[test,cluster]' (make test does)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def redis_url():
    """A Redis server of its own, nothing saved to disk; its URL."""
    with failing_where_missing(redis_server()) as server:
        yield server.url
