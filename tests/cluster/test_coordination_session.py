"""A long-lived process's coordination session (`storage/coordination.Session`) outlives an outage of
its database: the queries made while it is gone fail once their patience runs out, naming why, and
the first query after it is back reconnects, so one outage does not fail every later step."""
import psycopg
import pytest

from storage.coordination import Session


def test_queries_fail_while_the_database_is_gone_and_reconnect_once_it_is_back(postgres_server, coordination_url):
    connects = []
    session = Session(coordination_url, on_connect=connects.append, patience_s=1.0)
    name = session.run(lambda db: db.execute("SELECT current_database()").fetchone()[0])
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')  # ends the session, and no new one can start
        with pytest.raises(ConnectionError, match="could not reconnect within 1 s"):
            session.run(lambda db: db.execute("SELECT 1"))
        admin.execute(f'CREATE DATABASE "{name}"')
    assert session.run(lambda db: db.execute("SELECT 1").fetchone()[0]) == 1
    assert len(connects) == 2  # set up again on the new connection, before the query ran
    session.close()
