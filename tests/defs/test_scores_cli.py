"""`autointerp scores CODER [--json]`: a coder's summary in the terminal, each mean with its interval."""

import json

from assets.scorers import SCORERS
from assets.scores import summary_table
from autointerp_defs.cli import print_scores
from storage.store import TableStore
from storage.tables import write_table
from tests.conftest import two_shards_of_scores


def test_scores_prints_each_mean_with_its_interval_and_the_verdict(tmp_path, capsys):
    root = two_shards_of_scores(tmp_path)
    scorers = {"detection": SCORERS["detection"]}
    write_table(
        summary_table(TableStore(root), "c/h", scorers),
        root.score_summary_path("c/h"),
        "score_summary",
    )
    print_scores(TableStore(root), "c/h", scorers, as_json=True)
    said = json.loads(capsys.readouterr().out)["scorers"]["detection"]
    assert said["with_control"] == 2 and said["mean"] == 0.75 and said["control"] == 0.5
    lo, hi = said["gap_interval"]
    assert lo < said["gap"] < hi and said["verdict"].startswith("cannot tell: gap 0.250 [")
    print_scores(TableStore(root), "c/h", scorers)
    out = capsys.readouterr().out
    assert "detection (balanced_accuracy), over 2 latents with a control:" in out
    assert f"gap      0.250 [{lo:.3f}, {hi:.3f}]" in out
