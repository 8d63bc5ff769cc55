"""Exports to Neuronpedia and delphi, and delphi's explanations imported back and re-scored with controls,
on a materialized partition."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from dagster import AssetKey, DagsterInstance, materialize

from storage.layout import DataRoot
from tests.conftest import TINY_EXEMPLARS_CONFIG, add_coders, make_resources
from tests.defs.conftest import tiny_deployment
from tests.materialized_partition import built_once

DELPHI_SAMPLE = {
    "str_tokens",
    "activations",
    "distance",
    "activating",
    "prediction",
    "probability",
    "correct",
}  # delphi's ClassifierOutput
DELPHI_SCORERS = {"detection": "detection", "fuzz": "fuzzing"}  # delphi's name → ours
DELPHI_RUN = "smollm2-135m-instruct/tiny-topk"  # the subject model's id and the coder's name


def export_delphi(data, coder: str, into: Path) -> Path:
    """`autointerp export delphi` of `coder` on the data root `data` into `into`: the run folder it writes,
    `<into>/<model>/<coder name>`."""
    from autointerp_defs.cli import main

    main(["--data", str(data), "export", "delphi", coder, str(into)])
    return into / DELPHI_RUN


@pytest.fixture(scope="session")
def partition(request, tmp_path_factory, tiny_sae):
    return built_once(request.config, tmp_path_factory, tiny_sae)


def test_neuronpedia_importer_accepts_the_export_and_reads_back_every_row(
    partition, tmp_path, capsys
):
    """Neuronpedia's own import (replayed from its code on its schema,
    `tests/defs/neuronpedia_import.py`) takes every feature, activation and explanation, each with
    what our tables hold, from batch files of bounded size (a bound small enough for several here);
    a re-export with an edited explanation adds it."""
    import gzip

    import psycopg
    from psycopg.rows import dict_row

    from assets.corpus import EMBEDDED_CORPUS
    from autointerp_defs.cli import main
    from autointerp_defs.readside.neuronpedia import content_id
    from storage.activations import LATENT_STATS_FILE, load_latent_stats, read_shard
    from tests.cluster.services import fresh_database, postgres_server
    from tests.conftest import TINY_EXEMPLARS_CONFIG
    from tests.defs.neuronpedia_import import create_schema, import_folder, read_neuronpedia

    root = DataRoot.at(partition.root)
    bound = 0.25  # MiB
    exporting = ["--data", str(partition.root), "export", "neuronpedia", partition.coder]
    main([*exporting, str(tmp_path / "np"), "--batch-mb", str(bound)])
    folder = tmp_path / "np" / "smollm2-135m-instruct" / "3-tiny-topk"
    exported = read_neuronpedia(folder)
    batches = {
        table: sorted((folder / table).glob("*.jsonl.gz"))
        for table in ("features", "activations", "explanations")
    }
    sizes = {
        table: [len(gzip.open(path).read()) for path in paths] for table, paths in batches.items()
    }
    assert len(sizes["features"]) > 1 and len(sizes["activations"]) > 1, sizes
    assert max(max(s) for s in sizes.values()) <= bound * 2**20
    said = capsys.readouterr().out
    stats = load_latent_stats(root.activations_dir(partition.coder) / LATENT_STATS_FILE)
    width = len(stats["count"])
    vocab = json.loads(
        (root.corpus_dir / "vocab.json").read_text()
    )  # the tokenizer's text of each token, special ones too
    exemplars = pd.read_parquet(root.exemplars_path(partition.coder, "00"))
    activating = exemplars[exemplars.kind == "activating"]
    explained = pd.read_parquet(root.explanations_path(partition.coder, "00"))
    ok = explained[explained.status == "ok"]
    without = width - activating.latent.nunique()
    assert f"features: {width} rows in {len(sizes['features'])} batch files" in said
    assert f"activations: {len(activating)} rows in {len(sizes['activations'])} batch files" in said
    assert f"warning: {without} of {width} features have no activation windows" in said
    assert (
        f"wrote {folder}" in said
        and "as v1/smollm2-135m-instruct/3-tiny-topk/ of the dataset bucket" in said
        and "/api/admin/import?modelId=smollm2-135m-instruct&sourceId=3-tiny-topk" in said
    )

    with postgres_server() as server:
        url = fresh_database(server.url)
        create_schema(url)
        assert import_folder(url, folder) == []  # nothing logged: the release went in too
        with psycopg.connect(url, row_factory=dict_row) as db:

            def read(sql):
                return db.execute(sql).fetchall()

            [model] = read('SELECT * FROM "Model"')
            assert (
                model["layers"],
                model["neuronsPerLayer"],
                model["dimension"],
                model["owner"],
                model["visibility"],
            ) == (30, 1536, 576, "HuggingFaceTB", "PUBLIC")
            [source] = read('SELECT * FROM "Source"')
            window = TINY_EXEMPLARS_CONFIG["example_ctx_len"]
            assert (
                source["dataset"],
                source["num_tokens_in_prompt"],
                source["num_prompts"],
                source["visibility"],
            ) == (EMBEDDED_CORPUS, window, 64 * 48 // window, "PUBLIC")
            assert [
                r["visibility"]
                for r in read(
                    'SELECT visibility FROM "SourceSet" UNION ALL SELECT visibility FROM "SourceRelease"'
                )
            ] == ["PUBLIC", "PUBLIC"]

            neurons = {int(r["index"]): r for r in read('SELECT * FROM "Neuron"')}
            assert sorted(neurons) == list(
                range(width)
            )  # every latent of the coder, with exemplars or not
            for latent, n in neurons.items():
                assert (n["modelId"], n["layer"], n["sourceSetName"]) == (
                    "smollm2-135m-instruct",
                    "3-tiny-topk",
                    "tiny-topk",
                )
                assert (
                    n["maxActApprox"] == pytest.approx(float(stats["max"][latent]))
                    and sum(n["freq_hist_data_bar_heights"]) == stats["count"][latent]
                )
                assert (
                    len(n["pos_str"]) == len(n["neg_str"]) == 10
                    and len(n["topkCosSimIndices"]) == 10
                )
                assert set(n["pos_str"] + n["neg_str"]) <= set(vocab)
                assert sum(n["logits_hist_data_bar_heights"]) == len(vocab) and len(
                    n["logits_hist_data_bar_values"]
                ) == len(n["logits_hist_data_bar_heights"])  # every token's logit, binned

            rows = read('SELECT * FROM "Activation"')
            assert len(rows) == len(activating) and {r["id"] for r in rows} == {
                content_id(r) for r in exported["activations"]
            }
            shard = read_shard(root.activations_dir(partition.coder), "00")
            n_tokens = int(stats["tokens"][0])
            for r in rows:
                latent = int(r["index"])
                windows = activating[
                    (activating.latent == latent) & (activating.sequence == int(r["dataIndex"]))
                ]
                [w] = [
                    w
                    for w in windows.itertuples()
                    if list(w.activations) == pytest.approx(r["values"])
                ]
                assert r["tokens"] == [vocab[t] for t in w.tokens] and r[
                    "maxValue"
                ] == pytest.approx(w.max_activation)
                if w.split == "train":
                    # the strongest windows (the `top` sampler's): Neuronpedia's top activations
                    assert (r["binMin"], r["binContains"]) == (-1, -1) and r[
                        "binMax"
                    ] == pytest.approx(float(stats["max"][latent]))
                else:
                    # held out: in the interval holding its peak, with the share of the corpus's
                    # tokens in that interval
                    assert r["binMin"] <= r["maxValue"] <= r["binMax"] and r["binMin"] > 0
                    values = shard.activations[shard.locations[:, 2] == latent]
                    assert r["binContains"] == pytest.approx(
                        ((values >= r["binMin"]) & (values <= r["binMax"])).sum() / n_tokens
                    )
            assert any(
                "<|im_end|>" in r["tokens"] for r in rows
            )  # special tokens as the tokenizer writes them

            explanations = {int(r["index"]): r for r in read('SELECT * FROM "Explanation"')}
            assert {k: v["description"] for k, v in explanations.items()} == dict(
                zip(ok.latent.astype(int), ok.explanation, strict=False)
            )
            assert {(r["typeName"], r["explanationModelName"]) for r in explanations.values()} == {
                ("eleuther_acts_top20", None)
            }  # highlighted = delphi's default
            assert all(
                "scripted-judge" in r["notes"] for r in explanations.values()
            )  # a model Neuronpedia does not define is named in the notes

        # an edited explanation, and one by a model and method Neuronpedia defines: a re-export adds
        # both and nothing else
        copy = tmp_path / "copy"
        shutil.copytree(partition.root, copy)
        edited = ok.copy()
        edited.loc[edited.index[0], "explanation"] = "an edited explanation"
        edited.loc[edited.index[1], ["explainer", "model"]] = ["token_table", "openai:gpt-4o-mini"]
        edited.to_parquet(DataRoot.at(copy).explanations_path(partition.coder, "00"), index=False)
        main(
            ["--data", str(copy), "export", "neuronpedia", partition.coder, str(tmp_path / "again")]
        )
        import_folder(url, tmp_path / "again" / "smollm2-135m-instruct" / "3-tiny-topk")
        with psycopg.connect(url, row_factory=dict_row) as db:
            counts = {
                t: db.execute(f'SELECT count(*) AS n FROM "{t}"').fetchone()["n"]
                for t in ("Neuron", "Activation", "Explanation")
            }
            assert counts == {
                "Neuron": width,
                "Activation": len(activating),
                "Explanation": len(ok) + 2,
            }
            added = db.execute(
                'SELECT * FROM "Explanation" WHERE "createdAt" > %s',
                [explanations[int(ok.latent.iloc[0])]["createdAt"]],
            ).fetchall()
            assert {
                (r["description"], r["typeName"], r["explanationModelName"]) for r in added
            } == {
                ("an edited explanation", "eleuther_acts_top20", None),
                (ok.explanation.iloc[1], "oai_token-act-pair", "gpt-4o-mini"),
            }

        # the replay is no rubber stamp: a model row without its layers stops the import before any feature
        (folder / "model.jsonl").write_text(
            json.dumps({k: v for k, v in exported["model"][0].items() if k != "layers"}) + "\n"
        )
        strict = fresh_database(server.url)
        create_schema(strict)
        with pytest.raises(psycopg.errors.NotNullViolation, match="layers"):
            import_folder(strict, folder)
        with psycopg.connect(strict) as db:
            assert db.execute('SELECT count(*) FROM "Neuron"').fetchone()[0] == 0

    # a re-export into the same folder, with the default bound: one batch a table, no earlier one left
    # (the import reads every file there)
    main([*exporting, str(tmp_path / "np")])
    assert {table: [p.name for p in (folder / table).iterdir()] for table in batches} == {
        table: ["batch-0.jsonl.gz"] for table in batches
    }
    assert len(read_neuronpedia(folder)["activations"]) == len(activating)


def test_delphi_export_then_import_rescored_with_controls(partition, tmp_path, instance_home):
    from autointerp_defs.cli import main
    from autointerp_defs.definitions import build_definitions
    from resources.sparse_coders import load_registered

    out = export_delphi(partition.root, partition.coder, tmp_path / "delphi")
    root = DataRoot.at(partition.root)
    explained = pd.read_parquet(root.explanations_path(partition.coder, "00"))
    ok = explained[explained.status == "ok"]
    files = sorted(p.name for p in (out / "explanations").iterdir())
    assert files == sorted(f"model.layers.3_latent{latent}.txt" for latent in ok.latent)
    for latent, text in zip(ok.latent, ok.explanation, strict=False):
        assert (
            json.loads((out / "explanations" / f"model.layers.3_latent{latent}.txt").read_text())
            == text
        )
    detection = pd.read_parquet(root.scored_examples_path(partition.coder, "00", "detection"))
    exemplars = pd.read_parquet(root.exemplars_path(partition.coder, "00"))
    profiles = pd.read_parquet(root.latent_profiles_path(partition.coder, "00")).set_index("latent")
    decoder = torch.nn.functional.normalize(
        load_registered(root.registry_dir, partition.coder).decoder_weight.float(), dim=1
    ).numpy()
    for name, ours in (
        ("detection", detection),
        ("fuzz", pd.read_parquet(root.scored_examples_path(partition.coder, "00", "fuzzing"))),
    ):
        latent = int(ok.latent.iloc[0])
        samples = json.loads(
            (out / "scores" / name / f"model.layers.3_latent{latent}.txt").read_text()
        )
        mine = ours[(ours.latent == latent) & (ours.source == "explanation")].sort_values("example")
        assert all(DELPHI_SAMPLE == set(s) for s in samples) and len(samples) == len(mine)
        assert [s["activating"] for s in samples] == [bool(x) for x in mine.label]
        assert [s["prediction"] for s in samples] == [bool(x) for x in mine.predicted]
        assert all(s["correct"] == (s["prediction"] == s["activating"]) for s in samples)
        # delphi's distance: quantile 0..n-1 (ours 1..n), minus the firing neighbour's decoder cosine, else -1
        assert [s["distance"] for s in samples if s["activating"]] == [
            int(q) - 1 for q in mine["quantile"][mine.label == 1]
        ]
        test = exemplars[(exemplars.latent == latent) & (exemplars.split == "test")].reset_index(
            drop=True
        )
        neighbour_cosines = decoder[list(profiles.loc[latent, "neighbours"])] @ decoder[latent]
        for s, example in zip(samples, mine.example, strict=False):
            if s["activating"]:
                continue
            if test.kind[example] == "neighbour":
                assert np.isclose(-s["distance"], neighbour_cosines, atol=1e-6).any()
            else:
                assert s["distance"] == -1

    # import into a copy whose explanations are gone: the same texts come back, re-scorable with controls
    copy = tmp_path / "copy"
    shutil.copytree(partition.root, copy, ignore=shutil.ignore_patterns("viewer"))
    croot = DataRoot.at(copy)
    croot.explanations_path(partition.coder, "00").unlink()
    with DagsterInstance.from_config(str(instance_home)) as home:
        add_coders(home, copy, partition.coder)
    main(
        [
            "--deployment",
            tiny_deployment(tmp_path),
            "--data",
            str(copy),
            "import",
            "delphi",
            partition.coder,
            str(out),
            "--model",
            "delphi-run",
        ]
    )
    imported = pd.read_parquet(croot.explanations_path(partition.coder, "00"))
    texts = dict(zip(ok.latent, ok.explanation, strict=False))
    assert dict(zip(imported.latent, imported.explanation, strict=False)) == texts
    assert (
        set(imported.explainer) == {"delphi"}
        and set(imported.model) == {"delphi-run"}
        and set(imported.status) == {"ok"}
    )

    instance = DagsterInstance.ephemeral()
    add_coders(instance, copy, partition.coder)
    result = materialize(
        list(build_definitions("local").assets),
        selection=["scores/embedding"],
        partition_key=f"{partition.coder}|00",
        resources=make_resources(copy, max_latents=4),
        instance=instance,
    )
    assert result.success
    scored = pd.read_parquet(croot.scores_path(partition.coder, "00", "embedding"))
    assert dict(zip(scored.latent, scored.explanation, strict=False)) == texts
    assert (
        scored.control_explanation != scored.explanation
    ).all() and scored.control_roc_auc.notna().all()


def test_delphi_reads_the_export_with_its_own_code_and_gets_our_metrics(
    partition, tmp_path, subject, monkeypatch, capsys
):
    """eai-delphi's `LatentDataset` reads the latent cache (the same pairs as ours, the same windows as our
    exemplars) with the run's settings and its own tokenizer load, and its `result_analysis` the scores,
    with metrics equal to ours."""
    from delphi.config import RunConfig
    from delphi.latents import LatentDataset
    from delphi.log import result_analysis

    from storage.activations import (
        LATENT_STATS_FILE,
        load_latent_stats,
        read_cache_meta,
        read_shard,
        shard_keys,
    )
    from tests.scripted_hub_server import ScriptedHub, hub_environment

    out = export_delphi(partition.root, partition.coder, tmp_path / "delphi")
    root = DataRoot.at(partition.root)
    module = "model.layers.3"
    profiles = pd.read_parquet(root.latent_profiles_path(partition.coder, "00")).set_index("latent")
    said = capsys.readouterr().out
    width = len(
        load_latent_stats(root.activations_dir(partition.coder) / LATENT_STATS_FILE)["count"]
    )
    assert f"wrote {out}: 5 latent splits, " in said and "latent cache: latents 0.." in said
    assert f"warning: {width - len(profiles)} of {width} latents have no exemplar windows" in said
    assert (
        f"`autointerp import delphi {partition.coder} {out}` brings its explanations back" in said
    )
    config = RunConfig.load_json(out / "run_config.json")
    assert (
        config.hookpoints == [module]
        and config.scorers == ["detection", "fuzz"]
        and config.sparse_model == "tiny-topk"
    )
    assert (config.constructor_cfg.example_ctx_len, config.sampler_cfg.n_quantiles) == (
        TINY_EXEMPLARS_CONFIG["example_ctx_len"],
        5,
    )
    # the hub model the embedded GGUF quantizes, which delphi loads its tokenizer by (not the GGUF's folder)
    cache_config = json.loads((out / "latents" / module / "config.json").read_text())
    assert config.model == cache_config["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # the fewest activating windows of a latent with exemplars: delphi keeps what min_activating_windows kept
    min_examples = int(profiles.activating_windows.min())
    assert config.constructor_cfg.min_examples == min_examples
    assert min_examples >= TINY_EXEMPLARS_CONFIG["min_activating_windows"]

    def dataset(
        latents=None,
    ):  # delphi's defaults: its tokenizer is loaded from the hub by model_name
        return LatentDataset(
            out / "latents",
            config.sampler_cfg,
            config.constructor_cfg,
            modules=[module],
            latents=latents,
        )

    explained = pd.read_parquet(root.explanations_path(partition.coder, "00"))
    subject.tokenizer().save_pretrained(tmp_path / "tokenizer")
    with ScriptedHub() as hub, hub_environment(hub.url, tmp_path / "hf_home"):
        hub.add_folder(config.model, tmp_path / "tokenizer")
        everything = dataset()
        records = list(dataset({module: torch.tensor(sorted(explained.latent))}))
    assert everything.tokenizer.get_vocab() == subject.tokenizer().get_vocab()
    assert any(path.endswith("/tokenizer.json") for _, path, _ in hub.requests)

    cache = root.activations_dir(partition.coder)
    cached = [read_shard(cache, shard) for shard in shard_keys(read_cache_meta(cache)["n_shards"])]
    ours = {
        latent: (locations, values)
        for shard in cached
        for latent, locations, values in shard.by_latent()
    }
    read = {
        data.latent.latent_index: data.activation_data
        for buffer in everything.buffers
        for data in buffer
    }
    assert sorted(read) == sorted(ours)
    for latent, (locations, values) in ours.items():
        assert np.array_equal(read[latent].locations.numpy(), locations) and np.array_equal(
            read[latent].activations.numpy(), values
        ), latent

    exemplars = pd.read_parquet(root.exemplars_path(partition.coder, "00"))
    assert sorted(r.latent.latent_index for r in records) == sorted(explained.latent)
    for record in (
        records
    ):  # delphi's windows of the cache are our exemplars' (block placement is delphi's grid)
        latent = record.latent.latent_index
        theirs = {tuple(e.tokens.tolist()): e.activations.numpy() for e in record.examples}
        assert len(theirs) == profiles.loc[
            latent, "activating_windows"
        ] and record.max_activation == pytest.approx(profiles.loc[latent, "max_activation"])
        for window in exemplars[
            (exemplars.latent == latent) & (exemplars.kind == "activating")
        ].itertuples():
            assert np.allclose(theirs[tuple(window.tokens)], window.activations)

    counts = torch.load(out / "log" / "hookpoint_firing_counts.pt", weights_only=True)
    assert np.array_equal(
        counts[module].numpy(), load_latent_stats(cache / LATENT_STATS_FILE)["count"]
    )

    frame, counts = result_analysis.load_data(out / "scores", [module])
    pooled = {}
    for (theirs, latent), rows in frame.groupby(["score_type", "latent_idx"]):
        metrics = result_analysis.compute_classification_metrics(
            result_analysis.compute_confusion(rows)
        )
        mine = (
            pd.read_parquet(root.scores_path(partition.coder, "00", DELPHI_SCORERS[theirs]))
            .set_index("latent")
            .loc[latent]
        )
        for delphi_name, our_name in (
            ("accuracy", "balanced_accuracy"),
            ("precision", "precision"),
            ("recall", "recall"),
            ("f1_score", "f1"),
        ):
            assert metrics[delphi_name] == pytest.approx(mine[our_name], abs=1e-12), (
                theirs,
                latent,
                delphi_name,
            )
        auc = result_analysis.compute_auc(rows)  # None without probabilities, where ours is NaN
        assert (auc is None and np.isnan(mine["roc_auc"])) or auc == pytest.approx(
            mine["roc_auc"], abs=1e-12
        )
        total = pooled.setdefault(theirs, {"tp": 0, "fp": 0, "tn": 0, "fn": 0})
        for k in total:
            total[k] += int(mine[k])
    assert sorted(pooled) == ["detection", "fuzz"]

    # log_results itself, without its plots (images need kaleido; they are not what an export is checked by)
    for plot in ("import_plotly", "plot_firing_vs_f1", "plot_roc_curve", "plot_accuracy_hist"):
        monkeypatch.setattr(result_analysis, plot, lambda *args, **kwargs: None)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result_analysis.log_results(
            out / "scores", out / "visualize", config.hookpoints, config.scorers
        )
    for theirs, t in pooled.items():
        balanced = (t["tp"] / (t["tp"] + t["fn"]) + t["tn"] / (t["tn"] + t["fp"])) / 2
        section = printed.getvalue().split(f"--- {theirs.title()} Metrics ---")[1]
        assert (
            f"Class-Balanced Accuracy: {balanced:.3f}" in section
            and f"Total: {sum(t.values())}" in section
        )
    assert f"Number of dead features: {int((counts[module] == 0).sum())}" in printed.getvalue()
    assert f"min examples {min_examples}\n" in printed.getvalue()  # not None: the run's own


def test_reexport_after_an_import_writes_no_score_of_the_earlier_text(
    partition, tmp_path, instance_home
):
    from autointerp_defs.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(partition.root, copy, ignore=shutil.ignore_patterns("viewer"))
    with DagsterInstance.from_config(str(instance_home)) as home:
        add_coders(home, copy, partition.coder)
    out = export_delphi(copy, partition.coder, tmp_path / "delphi")
    explained = pd.read_parquet(DataRoot.at(copy).explanations_path(partition.coder, "00"))
    latent, *others = sorted(explained[explained.status == "ok"].latent)
    name = f"model.layers.3_latent{latent}.txt"
    assert all((out / "scores" / scorer / name).exists() for scorer in DELPHI_SCORERS)

    new = tmp_path / "new" / "explanations"
    # the others' texts as they were, so their scores stay current
    shutil.copytree(out / "explanations", new)
    (new / name).write_text(json.dumps("a text no scorer has judged"))
    importing = ["--deployment", tiny_deployment(tmp_path), "--data", str(copy), "import", "delphi"]
    main([*importing, partition.coder, str(new.parent)])
    export_delphi(copy, partition.coder, tmp_path / "delphi")  # into the same folder
    assert json.loads((out / "explanations" / name).read_text()) == "a text no scorer has judged"
    for scorer in DELPHI_SCORERS:
        assert not (out / "scores" / scorer / name).exists()
        assert all(
            (out / "scores" / scorer / f"model.layers.3_latent{other}.txt").exists()
            for other in others
        )


def test_import_names_the_fix_for_a_folder_without_delphi_explanations(partition, tmp_path):
    from autointerp_defs.cli import main

    (tmp_path / "explanations").mkdir()
    (tmp_path / "explanations" / "notes.txt").write_text("hello")
    with pytest.raises(SystemExit, match=r"No delphi explanation .*Fix"):
        main(["--data", str(partition.root), "import", "delphi", partition.coder, str(tmp_path)])
    (tmp_path / "explanations" / "model.layers.3_latent99999.txt").write_text(json.dumps("a word"))
    with pytest.raises(
        SystemExit, match=r"latents \[99999\] do not exist in tiny-topk/model.layers.3 .*Fix"
    ):
        main(["--data", str(partition.root), "import", "delphi", partition.coder, str(tmp_path)])


def test_import_refuses_while_the_explanations_are_being_written(
    partition, tmp_path, instance_home
):
    """The import is a run of the explanations asset, so it takes the same lock: while another run holds the
    shard it is refused at once, naming the holder."""
    from autointerp_defs.cli import main
    from storage.tables import table_lock

    out = export_delphi(partition.root, partition.coder, tmp_path / "delphi")
    copy = tmp_path / "copy"
    shutil.copytree(partition.root, copy, ignore=shutil.ignore_patterns("viewer"))
    with DagsterInstance.from_config(str(instance_home)) as home:
        add_coders(home, copy, partition.coder)
    path = DataRoot.at(copy).explanations_path(partition.coder, "00")
    before = path.read_bytes()
    importing = ["--deployment", tiny_deployment(tmp_path), "--data", str(copy), "import", "delphi"]
    with table_lock(path, "the explanations asset"):  # what an explanations run holds for its shard
        with pytest.raises(
            SystemExit,
            match=rf"Writing the explanations of {partition.coder} shard 00 .* is already running in "
            rf"process \d+\. Fix: wait",
        ):
            main([*importing, partition.coder, str(out)])
    assert path.read_bytes() == before
    main([*importing, partition.coder, str(out)])  # once it is free, the import goes through
    assert path.read_bytes() != before


def test_an_import_is_a_run_of_the_explanations_asset_and_a_changed_text_runs_it_again(
    partition, tmp_path, instance_home, capsys
):
    """`autointerp import delphi` materializes `explanations` with the delphi explainer: the folder's texts are its
    rows (the shard's other latents fail, saying why), the run is recorded for the partition, a scorer scores
    them, and a changed text is a run of another code version, so the scores of the old text are stale."""
    from autointerp_defs.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(partition.root, copy, ignore=shutil.ignore_patterns("viewer"))
    root = DataRoot.at(copy)
    with DagsterInstance.from_config(str(instance_home)) as home:
        add_coders(home, copy, partition.coder)
    shard_latents = sorted(pd.read_parquet(root.explanations_path(partition.coder, "00")).latent)
    first, second, *rest = shard_latents
    folder = tmp_path / "delphi-run"
    (folder / "explanations").mkdir(parents=True)

    def write(latent: int, text: str) -> None:
        path = folder / "explanations" / f"model.layers.3_latent{latent}.txt"
        path.write_text(json.dumps(text))

    texts = {first: "commas between two clauses", second: "the first word of a sentence"}
    for latent, text in texts.items():
        write(latent, text)
    cli = ["--deployment", tiny_deployment(tmp_path), "--data", str(copy)]
    importing = [*cli, "import", "delphi", partition.coder, str(folder)]
    main(importing)
    assert (
        "shard 00: imported 2 of the folder's 2 explanations; score them" in capsys.readouterr().out
    )
    table = pd.read_parquet(root.explanations_path(partition.coder, "00")).set_index("latent")
    assert sorted(table.index) == shard_latents and set(table.explainer) == {"delphi"}
    assert table.loc[list(texts), "explanation"].to_dict() == texts
    assert set(table.loc[list(texts), "status"]) == {"ok"} and set(table.model) == {"delphi"}
    missing = table.loc[rest]
    assert set(missing.status) == {"failed"} and (missing.explanation == "").all()
    assert missing.error.str.startswith("not in the delphi folder: no model.layers.3_latent").all()

    main([*cli, "materialize", "scores/embedding", "--coder", partition.coder, "--shard", "0"])
    scored = pd.read_parquet(root.scores_path(partition.coder, "00", "embedding"))
    assert dict(zip(scored.latent, scored.explanation, strict=True)) == texts
    assert scored.control_roc_auc.notna().all()

    write(first, "commas before a conjunction")
    main(importing)
    table = pd.read_parquet(root.explanations_path(partition.coder, "00")).set_index("latent")
    assert table.loc[first, "explanation"] == "commas before a conjunction"
    with DagsterInstance.from_config(str(instance_home)) as home:
        records = home.fetch_materializations(AssetKey("explanations"), limit=5).records
        [scoring] = home.fetch_materializations(AssetKey(["scores", "embedding"]), limit=5).records
    latest, earlier = (r.asset_materialization for r in records)  # newest first
    assert latest.partition == earlier.partition == f"{partition.coder}|00"
    settings = latest.metadata["settings"].value
    assert settings["explainer"] == "delphi"
    assert settings["explainer_settings"]["folder"] == str(folder.resolve())
    assert latest.metadata["explainer_model"].value == "delphi"
    assert latest.metadata["explained"].value == 2
    assert not [name for name in latest.metadata if name.startswith("llm_")]  # no LLM was asked
    # the scores read the first import; the second is of another code version, so of another data version
    read = scoring.asset_materialization.tags["dagster/input_event_pointer/explanations"]
    assert int(read) == records[1].storage_id
    assert latest.tags["dagster/code_version"] != earlier.tags["dagster/code_version"]
    assert latest.tags["dagster/data_version"] != earlier.tags["dagster/data_version"]


def test_neuronpedia_gets_one_explanation_per_sense_of_a_latent_with_several(partition, tmp_path):
    """A latent explained as several senses (`[explanations] senses`) is one Neuronpedia explanation per sense;
    senses of an explanation that was since replaced (an import) are not exported."""
    from autointerp_defs.cli import main
    from storage.tables import write_table
    from tests.defs.neuronpedia_import import read_neuronpedia

    copy = tmp_path / "copy"
    shutil.copytree(partition.root, copy)
    root = DataRoot.at(copy)
    explained = pd.read_parquet(root.explanations_path(partition.coder, "00"))
    ok = explained[explained.status == "ok"]
    several, replaced = int(ok.latent.iloc[0]), int(ok.latent.iloc[1])
    explained.loc[explained.latent == several, "explanation"] = (
        "digits inside parentheses or names inside quotation marks"
    )
    explained.to_parquet(root.explanations_path(partition.coder, "00"), index=False)
    senses = pd.DataFrame(
        [
            {
                "latent": several,
                "sense": 0,
                "explanation": "digits inside parentheses",
                "windows": 4,
                "clusters": [0],
                "test_windows": [0, 1],
            },
            {
                "latent": several,
                "sense": 1,
                "explanation": "names inside quotation marks",
                "windows": 4,
                "clusters": [1],
                "test_windows": [2],
            },
            {
                "latent": replaced,
                "sense": 0,
                "explanation": "an old sense",
                "windows": 4,
                "clusters": [0],
                "test_windows": [0],
            },
            {
                "latent": replaced,
                "sense": 1,
                "explanation": "another old sense",
                "windows": 4,
                "clusters": [1],
                "test_windows": [1],
            },
        ]
    )
    write_table(senses, root.explanation_senses_path(partition.coder, "00"), "explanation_senses")
    # the first sense's detection; the second's was made with a text it no longer has; the replaced latent's old sense's
    union = pd.read_parquet(root.scores_path(partition.coder, "00", "detection")).iloc[:1]
    scored = [
        ("digits inside parentheses", 0, several, 0.9),
        ("an older text", 1, several, 0.8),
        ("an old sense", 0, replaced, 0.7),
    ]
    write_table(
        pd.concat(
            [
                union.assign(
                    latent=latent,
                    sense=sense,
                    explanation=text,
                    balanced_accuracy=score,
                    balanced_accuracy_lo=score - 0.1,
                    balanced_accuracy_hi=score + 0.05,
                    control_balanced_accuracy=0.4,
                )
                for text, sense, latent, score in scored
            ]
        ),
        root.sense_scores_path(partition.coder, "00", "detection"),
        "sense_scores",
    )
    main(["--data", str(copy), "export", "neuronpedia", partition.coder, str(tmp_path / "np")])
    exported = read_neuronpedia(tmp_path / "np" / "smollm2-135m-instruct" / "3-tiny-topk")[
        "explanations"
    ]
    by_latent = {}
    for row in exported:
        by_latent.setdefault(int(row["index"]), []).append(row["description"])
    assert by_latent[several] == ["digits inside parentheses", "names inside quotation marks"]
    assert by_latent[replaced] == [ok.explanation.iloc[1]]
    assert len(exported) == len(ok) + 1
    notes = {row["description"]: row["notes"] for row in exported}
    assert notes["digits inside parentheses"].endswith(
        "; one of 2 senses; scored on its own windows: "
        "detection balanced_accuracy 0.900 [0.800, 0.950] vs control 0.400"
    )
    assert notes["names inside quotation marks"].endswith("; one of 2 senses")
    assert "own windows" not in notes[ok.explanation.iloc[1]]  # no sense of a replaced text

    # delphi's export holds the union and the union's scores only
    run = export_delphi(copy, partition.coder, tmp_path / "delphi")
    name = f"model.layers.3_latent{several}.txt"
    assert (
        json.loads((run / "explanations" / name).read_text())
        == "digits inside parentheses or names inside quotation marks"
    )
    assert not (
        run / "scores" / "detection" / name
    ).exists()  # its scores were made with the text before


def test_neuronpedia_notes_name_each_score_with_its_interval_beside_its_control(
    partition, tmp_path
):
    """Each explanation's notes hold every scorer's main metric with its 95 % interval beside its control; a
    scores table written before intervals were stored gives the score and control alone."""
    from autointerp_defs.cli import main
    from tests.defs.neuronpedia_import import read_neuronpedia

    def notes_of(root_dir, out) -> dict[int, str]:
        main(["--data", str(root_dir), "export", "neuronpedia", partition.coder, str(out)])
        exported = read_neuronpedia(out / "smollm2-135m-instruct" / "3-tiny-topk")["explanations"]
        return {int(r["index"]): r["notes"] for r in exported}

    root = DataRoot.at(partition.root)
    detection = pd.read_parquet(root.scores_path(partition.coder, "00", "detection"))
    notes = notes_of(partition.root, tmp_path / "np")
    row = detection[detection.balanced_accuracy_lo.notna()].iloc[0]
    said = (
        f"detection balanced_accuracy {row.balanced_accuracy:.3f} "
        f"[{row.balanced_accuracy_lo:.3f}, {row.balanced_accuracy_hi:.3f}] "
        f"vs control {row.control_balanced_accuracy:.3f}"
    )
    assert "; scored: " in notes[int(row.latent)] and said in notes[int(row.latent)]
    assert row.balanced_accuracy_lo < row.balanced_accuracy_hi

    copy = tmp_path / "copy"
    shutil.copytree(partition.root, copy)
    older = detection.drop(columns=["balanced_accuracy_lo", "balanced_accuracy_hi"])
    older.to_parquet(DataRoot.at(copy).scores_path(partition.coder, "00", "detection"), index=False)
    again = notes_of(copy, tmp_path / "again")[int(row.latent)]
    assert (
        f"detection balanced_accuracy {row.balanced_accuracy:.3f} vs control "
        f"{row.control_balanced_accuracy:.3f}" in again
    )


def test_export_refuses_an_option_of_the_other_format_in_one_line(tmp_path):
    """A flag that only the other format reads is refused before anything is read or written."""
    from autointerp_defs.cli import main

    for fmt, flag, owner in (
        ("delphi", ["--model-id", "x"], "neuronpedia"),
        ("delphi", ["--batch-mb", "1"], "neuronpedia"),
        ("neuronpedia", ["--module", "m"], "delphi"),
    ):
        exporting = ["--data", str(tmp_path), "export", fmt, "tiny-topk/model.layers.3"]
        with pytest.raises(SystemExit) as refused:
            main([*exporting, str(tmp_path / "out"), *flag])
        said = str(refused.value)
        assert f"{flag[0]} applies to `export {owner}` only, not `export {fmt}`. Fix:" in said
        assert "\n" not in said
    assert not (tmp_path / "out").exists()


def test_delphi_names_the_subject_model_as_delphi_loads_it(tmp_path):
    """delphi loads a tokenizer by a hub id or a folder: the embedded GGUF by the hub model it quantizes."""
    from autointerp_defs.readside.delphi import delphi_model_name

    assert delphi_model_name(None, None) == delphi_model_name("embedded", None)
    assert delphi_model_name("embedded", None) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert delphi_model_name("EleutherAI/pythia-70m", None) == "EleutherAI/pythia-70m"
    assert delphi_model_name(str(tmp_path), None) == str(tmp_path.resolve())
