"""Exports to Neuronpedia and delphi, and delphi's explanations imported back and re-scored with controls,
on a materialized partition."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from dagster import DagsterInstance, materialize

from storage.layout import DataRoot
from tests.conftest import add_coders, make_resources
from tests.materialized_partition import build

DELPHI_SAMPLE = {"str_tokens", "activations", "distance", "activating", "prediction", "probability", "correct"}  # delphi's ClassifierOutput


@pytest.fixture(scope="session")
def partition(tmp_path_factory, tiny_sae):
    return build(tmp_path_factory.mktemp("materialized"), tiny_sae)


def test_neuronpedia_importer_accepts_the_export_and_reads_back_every_row(partition, tmp_path):
    """Neuronpedia's own import (replayed from its code on its schema, `tests/defs/neuronpedia_import.py`) takes every
    feature, activation and explanation, each with what our tables hold; a re-export with an edited explanation adds it."""
    import psycopg
    from psycopg.rows import dict_row

    from assets.corpus import EMBEDDED_CORPUS
    from autointerp_defs.cli import main
    from autointerp_defs.readside.neuronpedia import content_id, read_neuronpedia
    from storage.activations import LATENT_STATS_FILE, load_latent_stats, read_shard
    from tests.cluster.services import fresh_database, postgres_server
    from tests.conftest import TINY_EXEMPLARS_CONFIG
    from tests.defs.neuronpedia_import import create_schema, import_folder

    root = DataRoot.at(partition.root)
    main(["--data", str(partition.root), "export", "neuronpedia", partition.coder, str(tmp_path / "np")])
    folder = tmp_path / "np" / "smollm2-135m-instruct" / "3-tiny-topk"
    exported = read_neuronpedia(folder)
    stats = load_latent_stats(root.activations_dir(partition.coder) / LATENT_STATS_FILE)
    width = len(stats["count"])
    vocab = json.loads((root.corpus_dir / "vocab.json").read_text())  # the tokenizer's text of each token, special ones too
    exemplars = pd.read_parquet(root.exemplars_path(partition.coder, "00"))
    activating = exemplars[exemplars.kind == "activating"]
    explained = pd.read_parquet(root.explanations_path(partition.coder, "00"))
    ok = explained[explained.status == "ok"]

    with postgres_server() as server:
        url = fresh_database(server)
        create_schema(url)
        assert import_folder(url, folder) == []  # nothing logged: the release went in too
        with psycopg.connect(url, row_factory=dict_row) as db:
            read = lambda sql: db.execute(sql).fetchall()
            [model] = read('SELECT * FROM "Model"')
            assert (model["layers"], model["neuronsPerLayer"], model["dimension"], model["owner"], model["visibility"]) == (30, 1536, 576, "HuggingFaceTB", "PUBLIC")
            [source] = read('SELECT * FROM "Source"')
            window = TINY_EXEMPLARS_CONFIG["example_ctx_len"]
            assert (source["dataset"], source["num_tokens_in_prompt"], source["num_prompts"], source["visibility"]) == (EMBEDDED_CORPUS, window, 64 * 48 // window, "PUBLIC")
            assert [r["visibility"] for r in read('SELECT visibility FROM "SourceSet" UNION ALL SELECT visibility FROM "SourceRelease"')] == ["PUBLIC", "PUBLIC"]

            neurons = {int(r["index"]): r for r in read('SELECT * FROM "Neuron"')}
            assert sorted(neurons) == list(range(width))  # every latent of the coder, with exemplars or not
            for latent, n in neurons.items():
                assert (n["modelId"], n["layer"], n["sourceSetName"]) == ("smollm2-135m-instruct", "3-tiny-topk", "tiny-topk")
                assert n["maxActApprox"] == pytest.approx(float(stats["max"][latent])) and sum(n["freq_hist_data_bar_heights"]) == stats["count"][latent]
                assert len(n["pos_str"]) == len(n["neg_str"]) == 10 and len(n["topkCosSimIndices"]) == 10
                assert set(n["pos_str"] + n["neg_str"]) <= set(vocab)

            rows = read('SELECT * FROM "Activation"')
            assert len(rows) == len(activating) and {r["id"] for r in rows} == {content_id(r) for r in exported["activations"]}
            shard = read_shard(root.activations_dir(partition.coder), "00")
            n_tokens = int(stats["tokens"][0])
            for r in rows:
                latent = int(r["index"])
                windows = activating[(activating.latent == latent) & (activating.sequence == int(r["dataIndex"]))]
                [w] = [w for w in windows.itertuples() if list(w.activations) == pytest.approx(r["values"])]
                assert r["tokens"] == [vocab[t] for t in w.tokens] and r["maxValue"] == pytest.approx(w.max_activation)
                if w.split == "train":  # the strongest windows (the `top` sampler's): Neuronpedia's top activations
                    assert (r["binMin"], r["binContains"]) == (-1, -1) and r["binMax"] == pytest.approx(float(stats["max"][latent]))
                else:  # held out: in the interval holding its peak, with the share of the corpus's tokens in that interval
                    assert r["binMin"] <= r["maxValue"] <= r["binMax"] and r["binMin"] > 0
                    values = shard.activations[shard.locations[:, 2] == latent]
                    assert r["binContains"] == pytest.approx(((values >= r["binMin"]) & (values <= r["binMax"])).sum() / n_tokens)
            assert any("<|im_end|>" in r["tokens"] for r in rows)  # special tokens as the tokenizer writes them

            explanations = {int(r["index"]): r for r in read('SELECT * FROM "Explanation"')}
            assert {k: v["description"] for k, v in explanations.items()} == dict(zip(ok.latent.astype(int), ok.explanation))
            assert {(r["typeName"], r["explanationModelName"]) for r in explanations.values()} == {("eleuther_acts_top20", None)}  # highlighted = delphi's default
            assert all("scripted-judge" in r["notes"] for r in explanations.values())  # a model Neuronpedia does not define is named in the notes

        # an edited explanation, and one by a model and method Neuronpedia defines: a re-export adds both and nothing else
        copy = tmp_path / "copy"
        shutil.copytree(partition.root, copy)
        edited = ok.copy()
        edited.loc[edited.index[0], "explanation"] = "an edited explanation"
        edited.loc[edited.index[1], ["explainer", "model"]] = ["token_table", "openai:gpt-4o-mini"]
        edited.to_parquet(DataRoot.at(copy).explanations_path(partition.coder, "00"), index=False)
        main(["--data", str(copy), "export", "neuronpedia", partition.coder, str(tmp_path / "again")])
        import_folder(url, tmp_path / "again" / "smollm2-135m-instruct" / "3-tiny-topk")
        with psycopg.connect(url, row_factory=dict_row) as db:
            counts = {t: db.execute(f'SELECT count(*) AS n FROM "{t}"').fetchone()["n"] for t in ("Neuron", "Activation", "Explanation")}
            assert counts == {"Neuron": width, "Activation": len(activating), "Explanation": len(ok) + 2}
            added = db.execute('SELECT * FROM "Explanation" WHERE "createdAt" > %s', [explanations[int(ok.latent.iloc[0])]["createdAt"]]).fetchall()
            assert {(r["description"], r["typeName"], r["explanationModelName"]) for r in added} == {
                ("an edited explanation", "eleuther_acts_top20", None), (ok.explanation.iloc[1], "oai_token-act-pair", "gpt-4o-mini")}

        # the replay is no rubber stamp: a model row without its layers stops the import before any feature
        (folder / "model.jsonl").write_text(json.dumps({k: v for k, v in exported["model"][0].items() if k != "layers"}) + "\n")
        strict = fresh_database(server)
        create_schema(strict)
        with pytest.raises(psycopg.errors.NotNullViolation, match="layers"):
            import_folder(strict, folder)
        with psycopg.connect(strict) as db:
            assert db.execute('SELECT count(*) FROM "Neuron"').fetchone()[0] == 0


def test_delphi_export_then_import_rescored_with_controls(partition, tmp_path):
    from autointerp_defs.cli import main
    from autointerp_defs.definitions import build_definitions

    out = tmp_path / "delphi"
    main(["--data", str(partition.root), "export", "delphi", partition.coder, str(out)])
    root = DataRoot.at(partition.root)
    explained = pd.read_parquet(root.explanations_path(partition.coder, "00"))
    ok = explained[explained.status == "ok"]
    files = sorted(p.name for p in (out / "explanations").iterdir())
    assert files == sorted(f"model.layers.3_latent{l}.txt" for l in ok.latent)
    for latent, text in zip(ok.latent, ok.explanation):
        assert json.loads((out / "explanations" / f"model.layers.3_latent{latent}.txt").read_text()) == text
    detection = pd.read_parquet(root.scored_examples_path(partition.coder, "00", "detection"))
    for name, ours in (("detection", detection), ("fuzz", pd.read_parquet(root.scored_examples_path(partition.coder, "00", "fuzzing")))):
        latent = int(ok.latent.iloc[0])
        samples = json.loads((out / "scores" / name / f"model.layers.3_latent{latent}.txt").read_text())
        mine = ours[(ours.latent == latent) & (ours.source == "explanation")].sort_values("example")
        assert all(DELPHI_SAMPLE == set(s) for s in samples) and len(samples) == len(mine)
        assert [s["activating"] for s in samples] == [bool(x) for x in mine.label]
        assert [s["prediction"] for s in samples] == [bool(x) for x in mine.predicted]
        assert all(s["correct"] == (s["prediction"] == s["activating"]) for s in samples)

    # import into a copy whose explanations are gone: the same texts come back, re-scorable with controls
    copy = tmp_path / "copy"
    shutil.copytree(partition.root, copy, ignore=shutil.ignore_patterns("viewer"))
    croot = DataRoot.at(copy)
    croot.explanations_path(partition.coder, "00").unlink()
    main(["--data", str(copy), "import", "delphi", partition.coder, str(out), "--model", "delphi-run"])
    imported = pd.read_parquet(croot.explanations_path(partition.coder, "00"))
    assert dict(zip(imported.latent, imported.explanation)) == dict(zip(ok.latent, ok.explanation))
    assert set(imported.explainer) == {"delphi"} and set(imported.model) == {"delphi-run"} and set(imported.status) == {"ok"}

    instance = DagsterInstance.ephemeral()
    add_coders(instance, copy, partition.coder)
    result = materialize(list(build_definitions("local").assets), selection=["scores/embedding"], partition_key=f"{partition.coder}|00",
                         resources=make_resources(copy, max_latents=4), instance=instance)
    assert result.success
    scored = pd.read_parquet(croot.scores_path(partition.coder, "00", "embedding"))
    assert dict(zip(scored.latent, scored.explanation)) == dict(zip(ok.latent, ok.explanation))
    assert (scored.control_explanation != scored.explanation).all() and scored.control_roc_auc.notna().all()


def test_import_names_the_fix_for_a_folder_without_delphi_explanations(partition, tmp_path):
    from autointerp_defs.cli import main

    (tmp_path / "explanations").mkdir()
    (tmp_path / "explanations" / "notes.txt").write_text("hello")
    with pytest.raises(SystemExit, match=r"No delphi explanation .*Fix"):
        main(["--data", str(partition.root), "import", "delphi", partition.coder, str(tmp_path)])
    (tmp_path / "explanations" / "model.layers.3_latent99999.txt").write_text(json.dumps("a word"))
    with pytest.raises(SystemExit, match=r"latents \[99999\] do not exist in tiny-topk/model.layers.3 .*Fix"):
        main(["--data", str(partition.root), "import", "delphi", partition.coder, str(tmp_path)])


def test_import_refuses_while_the_explanations_are_being_written(partition, tmp_path):
    from autointerp_defs.cli import main
    from storage.tables import table_lock

    out = tmp_path / "delphi"
    main(["--data", str(partition.root), "export", "delphi", partition.coder, str(out)])
    copy = tmp_path / "copy"
    shutil.copytree(partition.root, copy, ignore=shutil.ignore_patterns("viewer"))
    path = DataRoot.at(copy).explanations_path(partition.coder, "00")
    before = path.read_bytes()
    with table_lock(path, "the explanations asset"):  # what an explanations run holds for its shard
        with pytest.raises(SystemExit, match=rf"Writing the explanations of {partition.coder} shard 00 .* is already running in process \d+\. Fix: wait"):
            main(["--data", str(copy), "import", "delphi", partition.coder, str(out)])
    assert path.read_bytes() == before
    main(["--data", str(copy), "import", "delphi", partition.coder, str(out)])  # once it is free, the import goes through
    assert path.read_bytes() != before
