"""A lock is a lease: its session can end while its holder still runs (a server restart, a terminated
backend, a partition), and another node then takes it. The holder checks its lease right before it
commits, so a commit under a lost lock is refused and the table keeps the next holder's rows."""

import pandas as pd
import pytest

from storage.layout import DataRoot
from storage.store import TableStore
from storage.tables import TABLES


def explained(latents: list[int], text: str) -> pd.DataFrame:
    """An explanations table of `latents`, each explained as `text`."""
    return pd.DataFrame(
        [
            {
                "latent": latent,
                "explainer": "default",
                "explanation": text,
                "status": "ok",
                "error": "",
                "prompt_tokens": 1,
                "completion_tokens": 1,
                "model": "m",
                "candidates": [text],
                "candidate_scores": [1.0],
                "examples_dropped": 0,
                "exemplars_fingerprint": "f",
            }
            for latent in latents
        ]
    )[TABLES["explanations"].columns]


def terminate_holders(url: str) -> None:
    """What a server restart or a partition longer than the keepalives does to every holder: end its
    session, from another connection."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:
        ended = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks"
            " WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()"
        ).fetchall()
    assert ended == [(True,)]


def test_a_commit_under_a_lost_lock_is_refused_and_the_table_holds_the_next_holders_rows(
    tmp_path, coordination_url
):
    node_a, node_b = (
        TableStore(DataRoot.at(tmp_path), coordination_url=coordination_url) for _ in range(2)
    )
    table = node_a.explanations("c/h", "00")
    with node_a.writing(table, lock="Explaining c/h shard 00") as first:
        terminate_holders(coordination_url)
        with node_b.writing(
            node_b.explanations("c/h", "00"), lock="Importing delphi's explanations"
        ) as second:  # waits until the session is gone
            second.commit(explained([0, 1], "the second holder's"))
        with pytest.raises(
            RuntimeError,
            match=r"The lock 'table explanations explanations of c/h shard 00' was lost while held: "
            r"its session ended .* Nothing was committed",
        ):
            first.commit(explained([0, 1, 2], "the first holder's"))
    pd.testing.assert_frame_equal(table.read(), explained([0, 1], "the second holder's"))
    assert table.lease_record() == {
        "lock": "table explanations explanations of c/h shard 00",
        "generation": 2,
    }  # the commit records who made it


def test_a_holder_whose_lock_was_taken_over_is_refused_though_its_session_lives(
    tmp_path, coordination_url
):
    """The generation alone decides when the session still answers: a later holder took the lock."""
    import psycopg

    from storage.coordination import LeaseLost, exclusive

    with exclusive(coordination_url, "activations c/h", tmp_path / "a.lock", "Caching") as lease:
        lease.check()
        with psycopg.connect(coordination_url, autocommit=True) as other:
            other.execute(
                "UPDATE autointerp_leases SET generation = generation + 1 WHERE name = 'activations c/h'"
            )
        with pytest.raises(
            LeaseLost,
            match=r"'activations c/h' was lost while held: its generation 1 was taken over by generation 2",
        ):
            lease.check()
