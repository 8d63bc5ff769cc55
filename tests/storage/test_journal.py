"""Two runs of one partition at once (a manual materialization during an automation run) share the
table's journal folder: neither loses nor overwrites the other's rows, and a run with another key
never mixes its rows in."""

from storage.journal import Journal


def explained(*latents):
    return [{"latent": latent, "explanation": f"latent {latent}"} for latent in latents]


def test_a_run_that_finishes_first_leaves_the_other_runs_rows(tmp_path):
    table = tmp_path / "00.parquet"
    automation, manual = Journal(table, "v1|settings"), Journal(table, "v1|settings")
    for latent in (0, 1, 2):
        automation.add(explained(latent))
    for latent in (3, 4):
        manual.add(explained(latent))
    automation.flush()
    manual.flush()  # the same flush number as the other run's
    assert set(manual.kept(range(5))) == set(automation.kept(range(5))) == {0, 1, 2, 3, 4}
    automation.discard()  # its table is written
    assert manual.kept(range(5))[3]["explanation"] == "latent 3" and set(manual.kept(range(5))) == {
        0,
        1,
        2,
        3,
        4,
    }
    assert table.with_name("00.parquet.partial").exists()
    manual.discard()
    assert not table.with_name(
        "00.parquet.partial"
    ).exists()  # the last run's table replaces the folder


def test_a_run_resumed_from_another_runs_rows_keeps_them_when_that_run_finishes(tmp_path):
    table = tmp_path / "00.parquet"
    automation = Journal(table, "k")
    automation.add(explained(0, 1))
    automation.flush()
    manual = Journal(table, "k")
    assert set(manual.kept(range(4))) == {0, 1}  # resumes: asks only for 2 and 3
    automation.discard()
    manual.add(explained(2, 3))
    manual.flush()
    assert set(manual.kept(range(4))) == {0, 1, 2, 3}


def test_a_latent_both_runs_kept_has_the_rows_of_one_flush(tmp_path):
    table = tmp_path / "detection.parquet"
    runs = [Journal(table, "k", parts=("examples", "scores")) for _ in range(2)]
    for run in runs:
        run.add(
            examples=[{"latent": 5, "example": i} for i in range(3)],
            scores=[{"latent": 5, "balanced_accuracy": 1.0}],
        )
        run.flush()
    later = Journal(table, "k", parts=("examples", "scores"))
    assert sorted(later.finished("examples")["example"]) == [0, 1, 2]
    assert len(later.finished("scores")) == 1 and list(later.kept([5], "scores")) == [5]


def test_another_key_deletes_a_dead_runs_rows_and_never_mixes_with_a_live_ones(tmp_path):
    table = tmp_path / "00.parquet"
    killed = Journal(table, "v1")
    killed.add(explained(0))
    killed.flush()
    killed.close()  # its process died: the kernel dropped its lock
    live = Journal(table, "v1")
    live.add(explained(1))
    live.flush()
    other = Journal(table, "v2")  # other settings: rows made for v1 are not valid for it
    assert other.finished().empty
    other.add(explained(2))
    other.flush()
    assert set(live.kept(range(3))) == {
        1
    }  # the killed run's v1 rows went; the live run's stayed, and v2's never mix in
    assert set(other.kept(range(3))) == {2}
    other.discard()
    assert set(live.kept(range(3))) == {1}
    live.discard()
    assert not table.with_name("00.parquet.partial").exists()


def test_a_killed_runs_rows_are_resumed_and_deleted_by_the_run_that_finishes(tmp_path):
    table = tmp_path / "00.parquet"
    killed = Journal(table, "k")
    killed.add(explained(0))
    killed.flush()
    killed.close()  # its process died: the kernel dropped its lock
    resumed = Journal(table, "k")
    assert set(resumed.kept(range(2))) == {0}
    resumed.add(explained(1))
    resumed.discard()  # no live writer is left: its table replaces the folder
    assert not table.with_name("00.parquet.partial").exists()
