"""The command line's own output (the commands that run assets are tested with the assets)."""
from autointerp_defs.cli import print_results
from assets.scorers import SCORERS
from tests.conftest import two_shards_of_scores


def test_the_demo_prints_a_score_without_a_control_and_compares_means_over_the_same_latents(tmp_path, capsys):
    from assets.scores import summary_table
    from storage.store import TableStore
    from storage.tables import write_table

    root = two_shards_of_scores(tmp_path)
    scorers = {"detection": SCORERS["detection"]}
    write_table(summary_table(TableStore(root), "c/h", scorers), root.score_summary_path("c/h"), "score_summary")
    print_results(TableStore(root), "c/h", scorers)
    out = capsys.readouterr().out
    assert "0.90 / 0.50" in out and "0.80 / no control" in out and "n/a" not in out
    assert "detection: mean 0.750 / 0.500 over the 2 latents with a control; too few latents to tell (2 with a control" in out
    assert "explained by not recorded" in out and "detection scored by not recorded" in out  # tables written before models were recorded say so
