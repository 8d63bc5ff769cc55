"""The command line's own output (the commands that run assets are tested with the assets)."""

import shutil
import socket

import pytest
from dagster import DagsterInstance

from assets.scorers import SCORERS
from autointerp_defs.cli import main, print_results
from tests.conftest import TINY_CODER, add_coders, two_shards_of_scores
from tests.defs.conftest import tiny_deployment


def test_the_demo_prints_a_score_without_a_control_and_compares_means_over_the_same_latents(
    tmp_path, capsys
):
    import pandas as pd

    from assets.scores import summary_table
    from storage.store import TableStore
    from storage.tables import write_table

    root = two_shards_of_scores(tmp_path)
    scorers = {"detection": SCORERS["detection"]}
    write_table(
        summary_table(TableStore(root), "c/h", scorers),
        root.score_summary_path("c/h"),
        "score_summary",
    )
    print_results(TableStore(root), "c/h", scorers)
    out = capsys.readouterr().out
    assert "0.90 / 0.50" in out and "0.80 / no control" in out and "n/a" not in out
    assert (
        "detection: mean 0.750 / 0.500 over the 2 latents with a control; cannot tell: gap" in out
    )
    assert (
        "explained by not recorded" in out and "detection scored by not recorded" in out
    )  # tables written before models were recorded say so
    assert "latents with several senses: 1" in out and "detection lowest sense" in out
    before = pd.read_parquet(root.score_summary_path("c/h"))
    before.drop(columns=["senses", "detection_min_sense"]).to_parquet(
        root.score_summary_path("c/h")
    )  # as written before senses were counted
    print_results(TableStore(root), "c/h", scorers)
    out = capsys.readouterr().out
    assert (
        "0.90 / 0.50" in out
        and "written before it counted each latent's senses: materialize `score_summary`" in out
    )


def test_the_demo_prints_each_latents_top_tokens_beside_its_explanation(tmp_path, capsys):
    import json

    import pandas as pd

    from assets.scores import summary_table
    from storage.store import TableStore
    from storage.tables import write_table

    root = two_shards_of_scores(tmp_path)
    scorers = {"detection": SCORERS["detection"]}
    root.corpus_dir.mkdir(parents=True)
    root.corpus_vocab_path.write_text(json.dumps(["<s>", " the", "Paris", "7", "\n"]))
    root.corpus_meta_path.write_text(json.dumps({"special_ids": [0]}))
    profiles = pd.DataFrame(
        {
            "latent": [1, 2],
            "frequency": 0.01,
            "max_activation": 3.0,
            "mean_activation": 1.0,
            "activating_windows": 20,
            "quantile_boundaries": [[0.0, 3.0]] * 2,
            "top_tokens": [[1, 2, 0], [3, 4]],
            "top_token_mean_activation": [[3.0, 2.0, 1.0], [2.0, 1.0]],
            "neighbours": [[2], [1]],
        }
    )
    write_table(profiles, root.latent_profiles_path("c/h", "00"), "latent_profiles")
    write_table(
        summary_table(TableStore(root), "c/h", scorers),
        root.score_summary_path("c/h"),
        "score_summary",
    )
    print_results(TableStore(root), "c/h", scorers)
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert '" the" "Paris" "‖"' in rows["1"] and rows["1"].index('"Paris"') < rows["1"].index("e1")
    assert '"7" "↵"' in rows["2"] and rows["2"].index('"↵"') < rows["2"].index("e2a or e2b")
    assert (
        '"' not in rows["700"]
    )  # shard 01 has no profiles: its latent is shown without top tokens


def test_the_demo_says_plainly_why_it_has_no_verdict_and_is_silent_when_it_has_one(tmp_path):
    import numpy as np
    import pandas as pd

    from assets.scores import summary_table
    from autointerp_defs.cli import no_verdict
    from storage.store import TableStore
    from storage.tables import write_table

    root = two_shards_of_scores(tmp_path)
    scorers = {"detection": SCORERS["detection"]}
    pd.DataFrame(
        {
            "latent": [700, 701, 702],
            "explanation": ["e700", "", ""],
            "status": ["ok", "failed", "failed"],
        }
    ).to_parquet(root.explanations_path("c/h", "01"))
    write_table(
        summary_table(TableStore(root), "c/h", scorers),
        root.score_summary_path("c/h"),
        "score_summary",
    )
    why = no_verdict(TableStore(root), "c/h", ("00", "01"), ["detection"])
    assert why.startswith(
        "2 latents have a score beside a control, and the demo needs 10 for a verdict worth reading"
    )
    assert (
        "asked for 5 explanations (2 of 2 shards wrote theirs); 2 of the answers could not be read"
        in why
    )

    latents = list(range(10, 22))
    pd.DataFrame(
        {
            "latent": latents,
            "explanation": [f"e{latent}" for latent in latents],
            "balanced_accuracy": np.linspace(0.6, 0.9, len(latents)),
            "control_balanced_accuracy": 0.5,
            "gap": np.linspace(0.1, 0.4, len(latents)),
        }
    ).to_parquet(root.scores_path("c/h", "00", "detection"))
    pd.DataFrame(
        {"latent": latents, "explanation": [f"e{latent}" for latent in latents], "status": "ok"}
    ).to_parquet(root.explanations_path("c/h", "00"))
    write_table(
        summary_table(TableStore(root), "c/h", scorers),
        root.score_summary_path("c/h"),
        "score_summary",
    )
    assert no_verdict(TableStore(root), "c/h", ("00", "01"), ["detection"]) is None


def test_the_demo_ends_with_the_latent_browser_on_its_coder(tmp_path):
    from autointerp_defs.cli import next_steps
    from autointerp_defs.deployments import load_deployment

    deployment = load_deployment("local", {"settings": {"data_dir": str(tmp_path / "d")}})
    steps = next_steps(
        deployment, tmp_path / "home", "smollm2-topk/model.layers.15", ["scores/detection"]
    )
    assert steps[0] == (
        "Open the latent browser: make view   "
        "(then http://127.0.0.1:8080/coder?coder=smollm2-topk%2Fmodel.layers.15)"
    )
    assert f"--data {tmp_path / 'd'} view" in steps[1] and "make ui" in steps[2]


# ---- every path a user takes from the README ends in one line naming the fix ----------------------


def test_materialize_without_an_instance_names_the_folder_it_looked_in_and_the_fix(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        SystemExit,
        match=rf"no Dagster instance at {tmp_path}/.dagster_home \(DAGSTER_HOME is not set.*Fix: run `make demo`",
    ):
        main(
            [
                "--data",
                str(tmp_path / "data"),
                "materialize",
                "scores/detection",
                "--coder",
                TINY_CODER,
                "--shard",
                "00",
            ]
        )


def test_materialize_names_the_assets_and_the_partitions_there_are(tmp_path, instance_home):
    run = ["--data", str(tmp_path / "data"), "materialize"]
    with pytest.raises(
        SystemExit,
        match=rf"the instance at {instance_home} \(\$DAGSTER_HOME\) knows no coder yet\. Fix: run `make demo`",
    ):
        main([*run, "scores/detection", "--coder", TINY_CODER, "--shard", "00"])
    with DagsterInstance.from_config(str(instance_home)) as instance:
        add_coders(
            instance, tmp_path, TINY_CODER
        )  # no registry here: its shard 00, and the seven others below, as the sensor adds them
        instance.add_dynamic_partitions("shard", [f"{TINY_CODER}|0{i}" for i in range(1, 8)])
    with pytest.raises(
        SystemExit,
        match=r"no asset named scores/detectoin\. Fix: name some of corpus, activations, "
        r".*scores/detection.*score_summary",
    ):
        main([*run, "scores/detectoin", "--coder", TINY_CODER, "--shard", "00"])
    with pytest.raises(
        SystemExit,
        match=r"partitioned by coder and shard\. Fix: add --coder C --shard S .*has tiny-topk/model.layers.3\|00…07$",
    ):
        main([*run, "exemplars,explanations"])
    with pytest.raises(
        SystemExit,
        match=r"has no coder 'tiny-topk/model.layers.4'\. Fix: use one of its coders: "
        r"tiny-topk/model.layers.3\|00…07",
    ):
        main([*run, "scores/*", "--partition", "tiny-topk/model.layers.4|00"])
    with pytest.raises(
        SystemExit,
        match=rf"{TINY_CODER} has no shard '8' in the instance at {instance_home}"
        r".*Fix: use one of tiny-topk/model.layers.3\|00…07",
    ):
        main([*run, "scores/*", "--coder", TINY_CODER, "--shard", "8"])
    with pytest.raises(
        SystemExit, match=r"corpus, score_summary are not partitioned\. Fix: drop --partition"
    ):
        main([*run, "corpus,score_summary", "--coder", TINY_CODER, "--shard", "0"])


def test_materialize_runs_one_partition_as_the_demo_does_and_says_why_a_run_failed(
    partition, tmp_path, instance_home, capsys
):
    from storage.layout import DataRoot

    data = tmp_path / "data"
    shutil.copytree(partition.root, data, ignore=shutil.ignore_patterns("viewer"))
    with DagsterInstance.from_config(str(instance_home)) as instance:
        add_coders(instance, data, partition.coder)
    scores = DataRoot.at(data).scores_path(partition.coder, "00", "embedding")
    scores.unlink()
    main(
        [
            "--deployment",
            tiny_deployment(tmp_path),
            "--data",
            str(data),
            "materialize",
            "scores/embedding",
            "--coder",
            partition.coder,
            "--shard",
            "0",
        ]
    )
    assert (
        scores.exists()
        and f"materialized scores/embedding {partition.coder}|00 in" in capsys.readouterr().out
    )
    with pytest.raises(
        SystemExit,
        match=rf"materializing scores/embedding {partition.coder}\|01 failed: .*exemplars",
    ):
        main(
            [
                "--deployment",
                tiny_deployment(tmp_path),
                "--data",
                str(data),
                "materialize",
                "scores/embedding",
                "--partition",
                f"{partition.coder}|01",
            ]
        )


@pytest.mark.parametrize("command, option", [(["view"], "VIEW_PORT=N"), (["ui"], "UI_PORT=N")])
def test_a_busy_port_names_the_option_that_moves_it(tmp_path, instance_home, command, option):
    (tmp_path / "data").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            SystemExit,
            match=rf"port {port} on 127.0.0.1 is in use .*Fix: stop that process, "
            rf"or pick another port with --port N \(make: {option}",
        ):
            main(["--data", str(tmp_path / "data"), *command, "--port", str(port)])


def test_view_without_a_data_root_names_the_fix(tmp_path):
    with pytest.raises(SystemExit, match=rf"No data root at {tmp_path}/nowhere\. Fix: pass --data"):
        main(["--data", str(tmp_path / "nowhere"), "view", "--port", "0"])


def test_search_before_anything_is_explained_says_so(tmp_path, capsys):
    main(["--data", str(tmp_path), "search", "closing a file"])
    assert "no explanation under" in capsys.readouterr().out


def test_a_mistake_prints_one_line_and_no_dagster_warning(tmp_path, instance_home):
    import subprocess
    import sys

    mistake = (
        "from autointerp_defs.cli import main; "
        f"main(['--data', {str(tmp_path)!r}, 'materialize', 'scores/detectoin', '--shard', '0'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", mistake], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1 and done.stdout == ""
    assert (
        done.stderr.count("\n") == 1
        and "no asset named scores/detectoin. Fix: name some of" in done.stderr
    ), done.stderr


def test_the_cluster_instance_without_its_database_url_names_the_variable(
    tmp_path, instance_home, monkeypatch
):
    monkeypatch.delenv("AUTOINTERP_POSTGRES_URL", raising=False)
    with pytest.raises(
        SystemExit,
        match=r"AUTOINTERP_POSTGRES_URL is not set\. Fix: export AUTOINTERP_POSTGRES_URL=postgresql",
    ):
        main(["--data", str(tmp_path), "instance", "--cluster"])
