"""A long-lived process's coordination session (`storage/coordination.Session`) outlives an outage of
its database: the queries made while it is gone fail once their patience runs out, naming why, and
the first query after it is back reconnects, so one outage does not fail every later step."""

import time

import psycopg
import pytest

from storage.coordination import Session


def test_queries_fail_while_the_database_is_gone_and_reconnect_once_it_is_back(
    postgres_server, coordination_url
):
    connects = []
    session = Session(coordination_url, on_connect=connects.append, patience_s=1.0)
    name = session.run(lambda db: db.execute("SELECT current_database()").fetchone()[0])
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(
            f'DROP DATABASE "{name}" WITH (FORCE)'
        )  # ends the session, and no new one can start
        with pytest.raises(ConnectionError, match="could not reconnect within 1 s"):
            session.run(lambda db: db.execute("SELECT 1"))
        admin.execute(f'CREATE DATABASE "{name}"')
    assert session.run(lambda db: db.execute("SELECT 1").fetchone()[0]) == 1
    assert len(connects) == 2  # set up again on the new connection, before the query ran
    session.close()


def test_a_setup_that_fails_on_a_live_connection_is_raised_at_once_and_tried_again(
    coordination_url,
):
    """Only a lost connection is waited out: a setup the server rejects on a new, live connection is raised as
    it is, without the backoff, and the next query sets the connection up again."""
    setups = []

    def setup(db):
        setups.append(db)
        if len(setups) == 2:  # the first reconnect's
            db.execute("SELECT no_such_function()")

    session = Session(coordination_url, on_connect=setup, patience_s=30.0)
    with psycopg.connect(coordination_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(%s)", (session.run(lambda db: db.info.backend_pid),)
        )
    began = time.monotonic()
    with pytest.raises(psycopg.errors.UndefinedFunction):
        session.run(lambda db: db.execute("SELECT 1"))
    assert time.monotonic() - began < 5
    assert (
        session.run(lambda db: db.execute("SELECT 1").fetchone()[0]) == 1
        and len(setups) == 3
        and setups[2] is setups[1]
    )
    session.close()
