"""The latent browser's HTTP API on a materialized partition: what each page shows is what the tables hold."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
from urllib.parse import quote

import pandas as pd
import pytest
import torch

from assets.score_metrics import mean_interval
from storage.layout import DataRoot
from storage.store import TableStore


def get(server: str, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(server + path, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def latent_counts(partition):
    from storage.activations import LATENT_STATS_FILE, load_latent_stats

    return load_latent_stats(
        DataRoot.at(partition.root).activations_dir(partition.coder) / LATENT_STATS_FILE
    )


def tables(partition):
    root = DataRoot.at(partition.root)
    explained = pd.read_parquet(root.explanations_path(partition.coder, partition.shard))
    scores = {
        name: pd.read_parquet(root.scores_path(partition.coder, partition.shard, name))
        for name in ("detection", "fuzzing", "embedding", "simulation")
    }
    return root, explained, scores


def test_coders_page_compares_each_scorer_with_its_control(server, partition):
    root, explained, scores = tables(partition)
    status, data = get(server, "/api/coders")
    assert status == 200
    (row,) = data["coders"]
    meta = json.loads((root.activations_dir(partition.coder) / "meta.json").read_text())
    assert row["coder"] == partition.coder and row["width"] == 1152
    assert (
        row["dead_fraction"] == pytest.approx(meta["dead_fraction"])
        and row["mean_l0"] == pytest.approx(meta["mean_l0"])
        and row["fvu"] == pytest.approx(meta["fvu"])
    )
    assert row["explained"] == int((explained.status == "ok").sum()) >= 2
    assert set(row["scorers"]) == set(scores)
    for name, table in scores.items():
        main = {s["name"]: s["main_metric"] for s in data["scorers"]}[name]
        both = table[
            [main, f"control_{main}"]
        ].dropna()  # the mean and its control's over the same latents
        assert (
            row["scorers"][name]["mean"] == pytest.approx(both[main].mean())
            and row["scorers"][name]["with_control"] == len(both) > 0
        )
        assert row["scorers"][name]["control"] == pytest.approx(both[f"control_{main}"].mean())
        # each mean with its 95 % t interval over the same latents, and the mean gap with its own
        assert row["scorers"][name]["mean_interval"] == pytest.approx(
            list(mean_interval(both[main]))
        )
        assert row["scorers"][name]["gap"] == pytest.approx(table["gap"].mean())
        lo, hi = row["scorers"][name]["gap_interval"]
        assert [lo, hi] == pytest.approx(list(mean_interval(table["gap"])))
        assert lo <= row["scorers"][name]["gap"] <= hi
        assert row["scorers"][name]["verdict"].startswith(
            "cannot tell: "
        )  # a few latents: an interval too wide to tell
        # the judge's calibration card under an LLM scorer's verdict: this judge has none
        assert row["scorers"][name]["calibration"] == (
            "judged by openai:scripted-judge: no calibration card yet (autointerp calibrate)"
            if name != "embedding"
            else None
        )


def test_latent_list_sorts_filters_and_pages(server, partition):
    _, explained, scores = tables(partition)
    coder = quote(partition.coder, safe="")
    status, data = get(server, f"/api/latents?coder={coder}&per_page=100&page=2")
    assert (
        status == 200
        and data["total"] == 1152
        and data["pages"] == 12
        and [r["latent"] for r in data["rows"]] == list(range(100, 200))
    )

    _, by_freq = get(server, f"/api/latents?coder={coder}&sort=frequency&order=desc&per_page=500")
    freqs = [r["frequency"] for r in by_freq["rows"]]
    assert freqs == sorted(freqs, reverse=True) and freqs[0] > 0

    _, by_score = get(server, f"/api/latents?coder={coder}&sort=detection&order=asc")
    scored = [r["detection"] for r in by_score["rows"] if r["detection"] is not None]
    assert scored == sorted(scores["detection"]["balanced_accuracy"].tolist())
    assert all(
        r["detection"] is None for r in by_score["rows"][len(scored) :]
    )  # unscored latents last

    # each scorer's 95 % interval beside its score; sorted by the lower bound, highest first
    _, by_low = get(server, f"/api/latents?coder={coder}&sort=detection_lo&order=desc")
    lows = [r["detection_lo"] for r in by_low["rows"] if r["detection_lo"] is not None]
    detection = scores["detection"].set_index("latent")
    assert lows == sorted(detection["balanced_accuracy_lo"].dropna().tolist(), reverse=True)
    assert len(lows) == len(detection) > 1 and lows[0] > lows[-1]
    for r in by_low["rows"][: len(lows)]:
        assert r["detection_lo"] <= r["detection"] <= r["detection_hi"]
        assert r["detection_hi"] == pytest.approx(
            detection.loc[r["latent"], "balanced_accuracy_hi"]
        )

    _, ok = get(server, f"/api/latents?coder={coder}&status=ok")
    assert sorted(r["latent"] for r in ok["rows"]) == sorted(
        explained[explained.status == "ok"].latent.tolist()
    )
    assert {r["explanation"] for r in ok["rows"]} == set(
        explained[explained.status == "ok"].explanation
    )

    _, filtered = get(
        server, f"/api/latents?coder={coder}&min_embedding_gap=-10&max_embedding_gap=10"
    )
    assert filtered["total"] == scores["embedding"]["gap"].notna().sum()
    _, frequent = get(server, f"/api/latents?coder={coder}&min_frequency=0.01")
    counts = latent_counts(partition)
    assert frequent["total"] == int((counts["count"] / counts["tokens"][0] >= 0.01).sum()) > 0


def test_search_finds_a_latent_by_the_meaning_of_its_explanation(server, partition):
    _, explained, _ = tables(partition)
    row = explained[explained.status == "ok"].iloc[0]
    coder = quote(partition.coder, safe="")
    status, data = get(server, f"/api/search?coder={coder}&q={quote(row.explanation)}")
    assert (
        status == 200
        and data["hits"][0]["latent"] == row.latent
        and data["hits"][0]["explanation"] == row.explanation
    )
    _, listed = get(server, f"/api/latents?coder={coder}&q={quote(row.explanation)}")
    assert listed["rows"][0]["latent"] == row.latent and listed["sort"] == "distance"


def test_latent_page_shows_what_the_tables_and_the_decoder_say(server, partition, tiny_sae):
    from resources.subject_model import load_causal_lm
    from resources.unembedding import vocab_projection

    root, explained, scores = tables(partition)
    row = explained[explained.status == "ok"].iloc[0]
    latent = int(row.latent)
    status, page = get(
        server, f"/api/latent?coder={quote(partition.coder, safe='')}&latent={latent}"
    )
    assert status == 200

    # the explanation and both best-of-N candidates with their scores
    assert (
        page["explanation"]["text"] == row.explanation
        and page["explanation"]["model"] == "openai:scripted-judge"
    )
    assert [c["text"] for c in page["explanation"]["candidates"]] == list(row.candidates)
    assert [c["score"] for c in page["explanation"]["candidates"]] == pytest.approx(
        list(row.candidate_scores)
    )

    # each scorer beside its control
    for s in page["scorers"]:
        table = scores[s["name"]].set_index("latent")
        assert s["score"] == pytest.approx(table.loc[latent, s["main_metric"]], nan_ok=True)
        interval = [table.loc[latent, f"{s['main_metric']}_{end}"] for end in ("lo", "hi")]
        assert s["interval"] == pytest.approx([None if pd.isna(x) else x for x in interval])
        assert s["control_score"] == pytest.approx(
            table.loc[latent, f"control_{s['main_metric']}"], nan_ok=True
        )
        assert (
            s["control_explanation"] == table.loc[latent, "control_explanation"] != row.explanation
        )

    # the windows are the exemplars table's, token for token, grouped by quantile
    exemplars = pd.read_parquet(root.exemplars_path(partition.coder, partition.shard))
    mine = exemplars[exemplars.latent == latent]
    shown = [w for g in page["windows"]["activating"] for w in g["windows"]]
    assert len(shown) == (mine.kind == "activating").sum()
    groups = [g["group"] for g in page["windows"]["activating"]]
    assert groups[0].startswith("top") and [
        g for g in groups if g.startswith("quantile")
    ] == sorted(g for g in groups if g.startswith("quantile"))
    strongest = mine.loc[mine.max_activation.idxmax()]
    window = next(
        w for w in shown if w["sequence"] == strongest.sequence and w["start"] == strongest.start
    )
    assert window["activations"] == pytest.approx(list(strongest.activations), abs=1e-3)
    assert {g["source"] for g in page["windows"]["non_activating"]} == set(
        mine[mine.kind != "activating"].kind
    )

    # density: every cached activation of the latent falls in the histogram
    assert sum(page["density"]["counts"]) == latent_counts(partition)["count"][latent]

    # logit lens and neighbours, from the decoder itself
    projection = vocab_projection(
        tiny_sae.decoder_weight[latent : latent + 1], load_causal_lm(), 10
    )
    vocab = json.loads((root.corpus_dir / "vocab.json").read_text())
    assert [t["token"] for t in page["logit_lens"]["promoted"]] == [
        vocab[i] for i in projection.top_ids[0].tolist()
    ]
    assert [t["token"] for t in page["logit_lens"]["suppressed"]] == [
        vocab[i] for i in projection.bottom_ids[0].tolist()
    ]
    assert [t["logit"] for t in page["logit_lens"]["promoted"]] == pytest.approx(
        projection.top_values[0].tolist(), abs=1e-3
    )
    assert [t["logit"] for t in page["logit_lens"]["suppressed"]] == pytest.approx(
        projection.bottom_values[0].tolist(), abs=1e-3
    )
    histogram = page["logit_lens"][
        "histogram"
    ]  # every token of the vocabulary, between the most suppressed and the most promoted
    assert sum(histogram["counts"]) == len(vocab)
    assert histogram["edges"][0] == pytest.approx(projection.bottom_values[0, 0].item(), abs=1e-3)
    assert histogram["edges"][-1] == pytest.approx(projection.top_values[0, 0].item(), abs=1e-3)
    unit = torch.nn.functional.normalize(tiny_sae.decoder_weight.float(), dim=1)
    cosines = unit @ unit[latent]
    cosines[latent] = -2
    assert [n["latent"] for n in page["neighbours"]["latents"]] == cosines.topk(10).indices.tolist()

    # the simulation: the literal simulator predicted 10 exactly where the explained token stands
    word = row.explanation.split("'")[1]
    assert page["simulation"]["windows"]
    for w in page["simulation"]["windows"]:
        assert w["simulated"] == [10.0 if t.strip() == word else 0.0 for t in w["tokens"]]
        assert len(w["true"]) == len(w["tokens"])
    assert (
        "partition=" in page["links"]["dagster_explanations"]
        and quote(f"{partition.coder}|00", safe="") in page["links"]["dagster_explanations"]
    )
    # each scorer's permalink opens this page with that scorer shown first
    assert {s["name"]: s["permalink"] for s in page["scorers"]} == {
        s[
            "name"
        ]: f"/latent?coder={quote(partition.coder, safe='')}&latent={latent}&scorer={s['name']}"
        for s in page["scorers"]
    }


def test_the_default_latent_list_shows_explained_latents_first(server, partition):
    """At 4,608 latents with 6 explained, a list sorted by id showed pages of unexplained latents first."""
    _, explained, _ = tables(partition)
    by_status = explained.drop_duplicates("latent", keep="last").status.value_counts()
    _, data = get(server, f"/api/latents?coder={quote(partition.coder, safe='')}&per_page=500")
    statuses = [r["status"] for r in data["rows"]]
    order = {"ok": 0, "failed": 1, "none": 2}
    assert data["sort"] == "status" and statuses == sorted(statuses, key=order.get)
    assert statuses[: by_status.get("ok", 0)] == ["ok"] * by_status.get("ok", 0)
    ok = [r["latent"] for r in data["rows"] if r["status"] == "ok"]
    assert ok == sorted(ok)  # by latent within a status


def test_density_histograms_bin_as_numpy_does_latent_by_latent():
    import numpy as np

    from autointerp_defs.readside.index import DENSITY_BINS, density_histograms

    rng = np.random.default_rng(0)
    latents = np.sort(rng.integers(0, 50, 5000))
    values = rng.gamma(2.0, 2.0, 5000).astype(np.float32)
    values[latents == 7] = 0.0  # a latent whose every cached value is 0: binned over [0, 1]
    ids, counts, tops = density_histograms(latents, values)
    assert ids.tolist() == sorted(set(latents.tolist()))
    for i, latent in enumerate(ids):
        mine = values[latents == latent]
        expected, _ = np.histogram(
            mine, bins=DENSITY_BINS, range=(0.0, float(mine.max()) if mine.max() > 0 else 1.0)
        )
        assert counts[i].tolist() == expected.tolist() and tops[i] == pytest.approx(
            float(mine.max())
        )


def test_word_matches_rank_explanations_by_the_query_words_they_hold():
    from autointerp_defs.readside.app import word_matches

    explanations = pd.Series(
        ["closing a file", "the word file", "", "opening files", "File closing in Python"]
    )
    assert word_matches(explanations, "closing file", 10) == [(0, None), (4, None), (1, None)]
    assert word_matches(explanations, "?!", 10) == []


def test_the_steering_box_continues_a_prompt_with_and_without_the_latent(
    server, partition, subject
):
    """The first request starts loading the subject model and answers "loading" at once; later ones
    continue the prompt."""
    import time

    _, explained, _ = tables(partition)
    latent = int(explained[explained.status == "ok"].latent.iloc[0])
    ask = {
        "coder": partition.coder,
        "latent": latent,
        "prompt": "The file",
        "strength": 8,
        "tokens": 12,
    }
    deadline = time.monotonic() + 300
    status, answer, _ = steer_request(server, ask)
    while answer.get("state") == "loading" and time.monotonic() < deadline:
        time.sleep(1)
        status, answer, _ = steer_request(server, ask)
    assert status == 200 and answer["state"] == "done", answer
    # the unsteered text is the model's own greedy continuation
    tokenizer, lm = subject.tokenizer(), subject.causal_lm()
    ids = tokenizer(["The file"], return_tensors="pt")["input_ids"]
    greedy = lm.generate(
        ids,
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    assert answer["unsteered"] == tokenizer.decode(greedy[0, ids.shape[1] :])
    assert answer["kl"] > 0 and answer["steered"] != answer["unsteered"]
    assert answer["delta"] == pytest.approx(
        8 * float(latent_counts(partition)["max"][latent]), rel=1e-5
    )
    status, bad, _ = steer_request(server, {**ask, "tokens": 999})
    assert status == 400 and "Fix: give 1..64" in bad["error"]


def test_steering_is_off_with_the_reason_when_the_subject_model_is_not_here(partition, tmp_path):
    from autointerp_defs.readside.app import Viewer
    from resources.subject_model import SubjectModelResource

    viewer = Viewer(
        TableStore.at(partition.root),
        subject=SubjectModelResource(model="no-such-org/no-such-model"),
    )
    offered = viewer.steering.availability(
        viewer.index(partition.coder)
    )  # what the latent page shows in the box
    assert offered["available"] is False
    assert "no-such-org/no-such-model" in offered["message"] and "Fix:" in offered["message"]
    assert viewer.steer(partition.coder, {"latent": "0", "prompt": "The"})["state"] == "unavailable"


def test_bad_requests_name_the_input_and_the_fix(server, partition):
    status, data = get(server, "/api/latents?coder=nope/model.layers.0")
    assert status == 404 and partition.coder in data["error"] and "Fix" in data["error"]
    coder = quote(partition.coder, safe="")
    status, data = get(server, f"/api/latent?coder={coder}&latent=99999")
    assert status == 404 and "0..1151" in data["error"]
    status, data = get(server, f"/api/latents?coder={coder}&sort=nonsense")
    assert status == 400 and "frequency" in data["error"]
    status, data = get(server, f"/api/latents?coder={coder}&min_frequency=abc")
    assert status == 400 and "not a number" in data["error"]


def test_index_is_cached_on_disk_and_rebuilt_when_a_table_changes(partition, tmp_path):
    import shutil

    from autointerp_defs.readside.app import Viewer

    root = tmp_path / "copy"
    shutil.copytree(partition.root, root, ignore=shutil.ignore_patterns("viewer", "llm_cache"))
    first = Viewer(TableStore.at(root)).latent_list(partition.coder, {"status": "ok"})["total"]
    cached = DataRoot.at(root).viewer_latents_path(partition.coder)
    built = cached.stat().st_mtime_ns
    assert (
        Viewer(TableStore.at(root)).latent_list(partition.coder, {"status": "ok"})["total"] == first
    )
    assert cached.stat().st_mtime_ns == built  # a new server reads the cache instead of rebuilding
    path = DataRoot.at(root).explanations_path(partition.coder, partition.shard)
    table = pd.read_parquet(path)
    table.loc[table.status == "ok", "status"] = "failed"
    table.to_parquet(path, index=False)
    assert Viewer(TableStore.at(root)).latent_list(partition.coder, {"status": "ok"})["total"] == 0


def test_a_cached_latent_table_from_code_with_other_columns_is_built_again(partition, tmp_path):
    """No source table changed, but the cache was written by code whose table lacked a column (here `senses`,
    as before the senses count): a new server builds it again rather than serve the old columns."""
    import json
    import shutil

    from autointerp_defs.readside.app import Viewer
    from autointerp_defs.readside.index import LATENTS_VERSION

    root = tmp_path / "copy"
    shutil.copytree(partition.root, root, ignore=shutil.ignore_patterns("viewer", "llm_cache"))
    Viewer(TableStore.at(root)).latent_list(partition.coder, {})
    cached = DataRoot.at(root).viewer_latents_path(partition.coder)
    stamp = DataRoot.viewer_stamp_path(cached)
    pd.read_feather(cached).drop(columns=["senses"]).to_feather(cached)
    old = json.loads(stamp.read_text())["stamp"].removeprefix(f"{LATENTS_VERSION}|")
    stamp.write_text(json.dumps({"stamp": old}))  # as the code before the version was stamped it
    listed = Viewer(TableStore.at(root)).latent_list(partition.coder, {"sort": "senses"})
    assert "senses" in listed["columns"] and "senses" in pd.read_feather(cached).columns


def test_dagster_metadata_links_to_the_coder_and_latent_pages(partition):
    from assets.links import coder_url, latent_url
    from resources.settings import AutointerpSettings

    base = (
        AutointerpSettings().viewer_url
    )  # the [settings] viewer_url the partition ran with (the default)
    _, explained, _ = tables(partition)
    for node in ("explanations", "score_summary"):
        meta = partition.metadata[node]
        assert meta["viewer"] == coder_url(partition.coder, base)
        for latent in explained[explained.status == "ok"].latent:
            assert latent_url(partition.coder, int(latent), base) in meta["latent_pages"]


def test_the_links_follow_the_deployment_settings_and_summary_links_cover_every_coder(partition):
    from assets.scores import summary_links
    from autointerp_defs.deployments import load_deployment
    from autointerp_defs.readside.app import Viewer

    settings = load_deployment(
        "local",
        {
            "settings": {
                "viewer_url": "http://viewer.lab:9000/",
                "dagster_url": "http://dagster.lab:3333",
            }
        },
    ).resources()["settings"]
    assert (
        settings.viewer_url == "http://viewer.lab:9000/"
        and settings.dagster_url == "http://dagster.lab:3333"
    )

    page = Viewer(TableStore.at(partition.root), dagster_url=settings.dagster_url).latent(
        partition.coder, 0
    )
    assert (
        page["links"]["dagster_explanations"]
        == "http://dagster.lab:3333/assets/explanations?view=partitions"
        f"&partition={quote(partition.coder + '|00', safe='')}"
    )
    assert (
        page["links"]["dagster_summary"] == "http://dagster.lab:3333/assets/score_summary"
    )  # one asset over all coders: no partition

    one = summary_links(settings.viewer_url, {"a/h.1": [3, 1]})
    assert (
        one["viewer"].value == "http://viewer.lab:9000/coder?coder=a%2Fh.1"
        and "latent=3" in one["latent_pages"].value
    )
    several = summary_links(settings.viewer_url, {"a/h.1": [3, 1], "b/h.2": [7]})
    assert several["viewer"].value == "http://viewer.lab:9000/"
    assert (
        "latent?coder=a%2Fh.1&latent=3" in several["latent_pages"].value
        and "latent?coder=b%2Fh.2&latent=7" in several["latent_pages"].value
    )


def test_a_coder_name_never_leads_outside_the_data_root(server, partition, tmp_path):
    root = DataRoot.at(partition.root)
    elsewhere = tmp_path / "elsewhere" / "coder"
    shutil.copytree(
        root.activations_dir(partition.coder), elsewhere
    )  # a real cache, outside the root
    escapes = [
        str(elsewhere),
        f"../activations/{partition.coder}",
        "../../" + str(elsewhere.relative_to("/")),
    ]
    for coder in escapes:
        for path in (
            f"/api/latents?coder={quote(coder, safe='')}",
            f"/api/latent?coder={quote(coder, safe='')}&latent=0",
        ):
            status, data = get(server, path)
            assert status == 404 and partition.coder in data["error"], (coder, data)
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted(
        p.name for p in root.activations_dir(partition.coder).iterdir()
    )  # no cache written there
    assert not (root.activations_dir(partition.coder) / "latents.arrow").exists()


def raw_get(server: str, path: str, host: str) -> tuple[int, dict]:
    """GET with the Host header a browser would send for a page at `host`."""
    import http.client

    connection = http.client.HTTPConnection(*server.removeprefix("http://").split(":"), timeout=60)
    connection.request("GET", path, headers={"Host": host})
    response = connection.getresponse()
    return response.status, json.loads(response.read() or b"{}") if response.getheader(
        "Content-Type"
    ) == "application/json" else {}


def test_a_request_for_another_host_is_refused_against_dns_rebinding(server, partition):
    port = server.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert raw_get(server, "/api/coders", host)[0] == 200, host
    for host in (
        f"attacker.example:{port}",
        "attacker.example",
        f"localhost:{int(port) + 1}",
        "127.0.0.1:x",
        "",
    ):
        status, data = raw_get(server, "/api/coders", host)
        assert status == 403 and "Misdirected" in data["error"] and "viewer_url" in data["error"], (
            host
        )
    assert raw_get(server, "/", "attacker.example")[0] == 403  # the pages too, not only the API


def test_the_deployment_viewer_url_host_is_served_behind_a_proxy(partition):
    from autointerp_defs.readside.server import make_server

    httpd = make_server(str(partition.root), port=0, viewer_url="https://viewer.lab/")
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        server = f"http://127.0.0.1:{httpd.server_port}"
        assert raw_get(server, "/api/coders", "viewer.lab")[0] == 200
        assert raw_get(server, "/api/coders", "other.lab")[0] == 403
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_bad_whole_number_is_a_400_naming_the_parameter(server, partition):
    coder = quote(partition.coder, safe="")
    for path, name in (
        (f"/api/latents?coder={coder}&per_page=ten", "per_page"),
        (f"/api/latents?coder={coder}&page=2.5", "page"),
        (f"/api/latents?coder={coder}&q=file&limit=many", "limit"),
        (f"/api/search?coder={coder}&q=file&limit=x", "limit"),
    ):
        status, data = get(server, path)
        assert status == 400 and data["error"].startswith(f"{name}=") and "Fix" in data["error"], (
            path
        )


def test_a_plugin_scorer_table_is_shown_like_the_built_in_ones(partition, tmp_path, monkeypatch):
    from assets.scorers import scorer_classes
    from autointerp_defs.readside.app import Viewer
    from tests.defs.test_deployments import TOY_SCORER

    root = copy_root(partition, tmp_path)
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "viewer_toy_scorer.py").write_text(TOY_SCORER)
    monkeypatch.syspath_prepend(str(plugins))
    scorer_classes(("viewer_toy_scorer",))  # what loading a deployment that lists the plugin does
    toy = pd.read_parquet(root.scores_path(partition.coder, partition.shard, "detection"))
    toy["accuracy"] = toy["accuracy"] / 2  # its own numbers
    toy.to_parquet(root.scores_path(partition.coder, partition.shard, "word_match"), index=False)
    toy.to_parquet(
        root.scores_path(partition.coder, partition.shard, "unloaded_plugin"), index=False
    )  # a plugin this process never loaded

    viewer = Viewer(TableStore(root))
    (row,) = viewer.coders()["coders"]
    assert row["scorers"]["word_match"]["mean"] == pytest.approx(toy["accuracy"].mean())
    assert (
        row["scorers"]["unloaded_plugin"]["n"] == 0 and row["scorers"]["unloaded_plugin"]["verdict"]
    )
    latents = viewer.latent_list(partition.coder, {"status": "ok", "per_page": "500"})
    shown = {r["latent"]: r for r in latents["rows"]}
    for scored in toy.itertuples():
        assert shown[scored.latent]["word_match"] == pytest.approx(scored.accuracy)
        assert shown[scored.latent]["unloaded_plugin_gap"] == pytest.approx(scored.gap)
    page = viewer.latent(partition.coder, int(toy.latent.iloc[0]))
    scorers = {s["name"]: s for s in page["scorers"]}
    assert scorers["word_match"]["main_metric"] == "accuracy" and scorers["word_match"][
        "score"
    ] == pytest.approx(toy.accuracy.iloc[0])
    assert scorers["unloaded_plugin"]["main_metric"] is None and scorers["unloaded_plugin"][
        "gap"
    ] == pytest.approx(toy.gap.iloc[0])
    assert "not loaded" in scorers["unloaded_plugin"]["control"]


def copy_root(partition, tmp_path) -> DataRoot:
    root = tmp_path / "copy"
    shutil.copytree(partition.root, root, ignore=shutil.ignore_patterns("viewer", "llm_cache"))
    return DataRoot.at(root)


def test_a_score_of_an_earlier_explanation_is_marked_stale_not_shown_as_the_latents(
    partition, tmp_path
):
    from assets.score_metrics import STALE
    from autointerp_defs.readside import reader
    from autointerp_defs.readside.app import Viewer
    from autointerp_defs.readside.delphi import export_delphi

    root = copy_root(partition, tmp_path)
    coder, shard = partition.coder, partition.shard
    explained = pd.read_parquet(root.explanations_path(coder, shard))
    detection = pd.read_parquet(root.scores_path(coder, shard, "detection"))
    fuzzing = pd.read_parquet(root.scores_path(coder, shard, "fuzzing"))
    latent = int(
        sorted(
            set(detection.latent)
            & set(fuzzing.latent)
            & set(explained[explained.status == "ok"].latent)
        )[0]
    )
    explained.loc[explained.latent == latent, "explanation"] = "a newer explanation"
    explained.to_parquet(root.explanations_path(coder, shard), index=False)
    detection.loc[detection.latent == latent, "explanation"] = (
        "a newer explanation"  # detection scored the new text; fuzzing is behind
    )
    detection.to_parquet(root.scores_path(coder, shard, "detection"), index=False)

    viewer = Viewer(TableStore(root))
    page = viewer.latent(coder, latent)
    scorers = {s["name"]: s for s in page["scorers"]}
    assert page["explanation"]["text"] == "a newer explanation"
    assert scorers["detection"]["stale"] is None and scorers["detection"]["score"] == pytest.approx(
        detection[detection.latent == latent].balanced_accuracy.iat[0]
    )
    assert (
        scorers["fuzzing"]["stale"] == STALE
        and scorers["fuzzing"]["explanation"] != "a newer explanation"
    )
    for name in ("embedding", "simulation"):  # they too scored the earlier text
        assert scorers[name]["stale"] == (
            STALE
            if (pd.read_parquet(root.scores_path(coder, shard, name)).latent == latent).any()
            else None
        )
    (row,) = viewer.latent_list(coder, {"min_latent": str(latent), "max_latent": str(latent)})[
        "rows"
    ]
    assert (
        row["detection"] is not None and row["fuzzing"] is None and row["fuzzing_gap"] is None
    )  # a stale score is not the latent's
    others = viewer.latent_list(coder, {"status": "ok", "per_page": "500"})["rows"]
    main = reader.scorer_info("fuzzing")["main_metric"]
    assert sum(r["fuzzing"] is not None for r in others) == fuzzing[main].notna().sum() - 1

    out = export_delphi(str(root.root), coder, str(tmp_path / "delphi"))  # the run folder
    assert (out / "scores" / "detection" / f"model.layers.3_latent{latent}.txt").exists()
    assert not (
        out / "scores" / "fuzz" / f"model.layers.3_latent{latent}.txt"
    ).exists()  # fuzzing judged an older text
    assert len(list((out / "scores" / "fuzz").iterdir())) == len(fuzzing) - 1


def test_every_latent_page_of_a_coder_narrower_than_the_neighbour_count_answers(tmp_path, subject):
    """Width 8 < the 10 neighbours a page lists; and a coder registered anew serves its own decoder at once."""
    import os
    import time

    from dagster import DagsterInstance, materialize

    from assets.corpus import embedded_documents, tokenize_documents
    from autointerp_defs.demo_sae import train_topk_sae
    from autointerp_defs.readside.app import Viewer
    from resources.sparse_coders import save_sparsify
    from resources.subject_model import capture_hookpoints
    from tests.conftest import (
        TINY_CORPUS_CONFIG,
        TINY_EXEMPLARS_CONFIG,
        add_coders,
        all_assets,
        make_resources,
        random_coder,
    )

    hookpoint = "model.layers.1"
    tokens = tokenize_documents(
        embedded_documents(),
        subject.tokenizer(),
        ctx_len=64,
        n_tokens=64 * 16,
        add_bos=True,
        seed=7,
    )
    hidden = capture_hookpoints(
        subject.causal_lm(), torch.from_numpy(tokens).long(), {(hookpoint, "output")}
    )[(hookpoint, "output")]
    narrow = train_topk_sae(
        hidden[:, 1:].flatten(0, 1),
        width=8,
        k=2,
        name="narrow",
        hookpoint=hookpoint,
        epochs=2,
        batch_size=256,
    )
    coder, folder = f"narrow/{hookpoint}", tmp_path / "registry" / "narrow" / hookpoint
    save_sparsify(narrow, folder)
    instance = DagsterInstance.ephemeral()
    add_coders(instance, tmp_path, coder)
    resources = make_resources(tmp_path)
    assert materialize(
        all_assets(),
        selection=["corpus"],
        resources=resources,
        instance=instance,
        run_config={"ops": {"corpus": {"config": TINY_CORPUS_CONFIG}}},
    ).success
    for selection, config in (
        (["activations"], {}),
        (["exemplars"], {"ops": {"exemplars": {"config": TINY_EXEMPLARS_CONFIG}}}),
    ):
        assert materialize(
            all_assets(),
            selection=selection,
            partition_key=f"{coder}|00",
            resources=resources,
            instance=instance,
            run_config=config,
        ).success

    server = Viewer(TableStore.at(tmp_path))
    for latent in range(8):
        page = server.latent(coder, latent)
        assert sorted(n["latent"] for n in page["neighbours"]["latents"]) == sorted(
            set(range(8)) - {latent}
        )

    def cosines(weights, latent):
        unit = torch.nn.functional.normalize(weights, dim=1)
        return sorted(
            (unit @ unit[latent]).tolist()[:latent] + (unit @ unit[latent]).tolist()[latent + 1 :],
            reverse=True,
        )

    again = random_coder(width=8, d_in=576, k=2, seed=1)
    save_sparsify(again, folder)  # registered anew under the same name, while the server runs
    assert [n["cosine"] for n in server.latent(coder, 0)["neighbours"]["latents"]] == pytest.approx(
        cosines(again.decoder_weight, 0), abs=1e-4
    )

    times = {path.name: path.stat() for path in folder.iterdir()}
    time.sleep(0.05)
    third = random_coder(width=8, d_in=576, k=2, seed=2)
    save_sparsify(
        third, folder
    )  # and again, its files with the sizes and times of the last ones (`cp -p`, `rsync -t`)
    for path in folder.iterdir():
        assert path.stat().st_size == times[path.name].st_size
        os.utime(path, ns=(times[path.name].st_atime_ns, times[path.name].st_mtime_ns))
    assert [n["cosine"] for n in server.latent(coder, 0)["neighbours"]["latents"]] == pytest.approx(
        cosines(third.decoder_weight, 0), abs=1e-4
    )


def test_latent_page_shows_the_senses_of_a_latent_explained_as_several(partition, tmp_path):
    """Each sense with its scores on its own windows; a score of a sense text since replaced is not shown."""
    from autointerp_defs.readside.app import Viewer
    from tests.defs.conftest import with_two_senses

    root = tmp_path / "copy"
    several, other = with_two_senses(partition, root)
    viewer = Viewer(TableStore.at(root))
    assert viewer.latent(partition.coder, several)["explanation"]["senses"] == [
        {
            "text": "digits inside parentheses",
            "windows": 5,
            "test_windows": 2,
            "scores": {"detection": {"metric": "balanced_accuracy", "score": 0.9, "control": 0.4}},
        },
        {"text": "names inside quotation marks", "windows": 3, "test_windows": 1, "scores": {}},
    ]
    assert viewer.latent(partition.coder, other)["explanation"]["senses"] == []
    assert "detection.senses" not in TableStore.at(root).scorers_of(
        partition.coder, partition.shard
    )  # a table beside a scorer's is no scorer


def test_the_latent_list_counts_senses_sorts_and_filters_by_them_with_each_scorers_lowest_sense(
    partition, tmp_path
):
    """`senses`: 2 for the latent explained as two, 1 for one explained as one, 0 unexplained; `min_senses=2` lists the
    former alone. Its lowest detection sense is unknown while one sense has only a score of an older text."""
    from autointerp_defs.readside.app import Viewer
    from storage.tables import write_table
    from tests.defs.conftest import with_two_senses

    root, coder = tmp_path / "copy", partition.coder
    several, other = with_two_senses(partition, root)
    viewer = Viewer(TableStore.at(root))
    listed = viewer.latent_list(
        coder, {"per_page": "500"}
    )  # explained latents first, then unexplained ones
    rows = {r["latent"]: r for r in listed["rows"]}
    assert listed["several_senses"] == 1 and {r["status"] for r in rows.values()} >= {"ok", "none"}
    assert rows[several]["senses"] == 2 and rows[other]["senses"] == 1
    assert all(
        r["senses"] == int(r["status"] == "ok") for latent, r in rows.items() if latent != several
    )
    assert (
        rows[several]["detection_min_sense"] is None and rows[other]["detection_min_sense"] is None
    )
    assert [r["latent"] for r in viewer.latent_list(coder, {"min_senses": "2"})["rows"]] == [
        several
    ]
    assert (
        viewer.latent_list(coder, {"sort": "senses", "order": "desc"})["rows"][0]["latent"]
        == several
    )

    path = DataRoot.at(root).sense_scores_path(coder, partition.shard, "detection")
    scores = pd.read_parquet(path)
    scores.loc[scores.sense == 1, ["explanation", "balanced_accuracy"]] = [
        "names inside quotation marks",
        0.6,
    ]  # the second sense scored as it reads now
    write_table(scores, path, "sense_scores")
    (row,) = Viewer(TableStore.at(root)).latent_list(coder, {"min_senses": "2"})[
        "rows"
    ]  # the cached list is rebuilt: a senses table changed
    assert row["detection_min_sense"] == 0.6


def test_a_first_start_after_a_materialization_serves_a_latent_page_without_building_a_cache(
    partition, tmp_path, monkeypatch
):
    """What the first `autointerp view` after a materialization finds: the decoder directions the activations stage
    wrote with its cache (nothing to convert), and no per-shard copy yet. The page reads the latent's rows from the
    tables themselves, leaves the copies to the background, and is the page the built caches give."""
    import numpy as np

    from autointerp_defs.readside import index
    from autointerp_defs.readside.app import Viewer
    from resources.sparse_coders import load_registered
    from storage.activations import load_decoder_directions, read_cache_meta

    layout = copy_root(partition, tmp_path)
    acts = layout.activations_dir(partition.coder)
    assert read_cache_meta(acts)["decoder_directions"] is True
    assert np.array_equal(
        load_decoder_directions(acts),
        load_registered(layout.registry_dir, partition.coder).decoder_directions().numpy(),
    )
    monkeypatch.setattr(
        index, "lens_model", lambda *args, **kwargs: "not under test here"
    )  # no subject model loaded for the lens
    prepared = []
    monkeypatch.setattr(
        index.CoderIndex, "_prepare_in_background", lambda self, shard: prepared.append(shard)
    )
    first = Viewer(TableStore.at(layout.root))
    first.background = True
    latent = int(
        tables(partition)[2]["simulation"].latent.iloc[0]
    )  # explained, scored by every scorer, simulated
    page = first.latent(partition.coder, latent)

    def built_caches():
        return sorted(
            p.name
            for p in layout.viewer_dir(partition.coder).iterdir()
            if p.suffix in (".arrow", ".npz", ".npy") and p.stem != "latents"
        )

    assert built_caches() == [] and set(prepared) == {partition.shard}
    assert page == Viewer(TableStore.at(layout.root)).latent(
        partition.coder, latent
    )  # without a background, the request builds every cache
    assert f"{partition.shard}.exemplars.arrow" in built_caches() and not any(
        name.startswith("decoder") for name in built_caches()
    )


def test_background_work_waits_while_a_request_is_answered(partition):
    """On a first start the warm-up's steps (loading the embedder, copying a shard) wait for the requests in flight."""
    import time

    from autointerp_defs.readside.app import Viewer

    viewer = Viewer(TableStore.at(partition.root))
    paused = threading.Event()
    with viewer.answering():
        waiting = threading.Thread(target=lambda: (viewer.pause_for_requests(), paused.set()))
        waiting.start()
        time.sleep(0.5)
        assert not paused.is_set()
    waiting.join(timeout=10)
    assert paused.is_set()


def steer_request(
    server: str, body: dict | str, headers: dict | None = None
) -> tuple[int, dict, dict]:
    """POST /api/steer as the latent page's box sends it (JSON), with `headers` on top; (status, answer, headers)."""
    import http.client

    connection = http.client.HTTPConnection(*server.removeprefix("http://").split(":"), timeout=60)
    raw = body if isinstance(body, str) else json.dumps(body)
    connection.request(
        "POST", "/api/steer", raw.encode(), {"Content-Type": "application/json", **(headers or {})}
    )
    response = connection.getresponse()
    return response.status, json.loads(response.read()), dict(response.getheaders())


@pytest.fixture
def steering_server(partition, monkeypatch):
    """A server whose steering generates nothing: each steer waits until the test lets it finish."""
    from autointerp_defs.readside.app import Viewer
    from autointerp_defs.readside.server import make_server

    entered, release = threading.Event(), threading.Event()

    def generate(*args):
        entered.set()
        assert release.wait(60)
        return type(
            "Continued", (), {"delta": 1.0, "kl": 0.5, "unsteered": " a", "steered": " b"}
        )()

    monkeypatch.setattr("resources.steering.continue_side_by_side", generate)
    viewer = Viewer(TableStore.at(partition.root))
    viewer.steering._state, viewer.steering._steerer = (
        "ready",
        object(),
    )  # as if the subject model were loaded
    httpd = make_server(str(partition.root), port=0, viewer=viewer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", entered, release
    release.set()
    httpd.shutdown()
    httpd.server_close()


def test_steering_is_a_post_from_this_servers_pages_only(steering_server, partition):
    server, _, release = steering_server
    release.set()
    port = server.rsplit(":", 1)[1]
    asked = {"coder": partition.coder, "latent": 0, "prompt": "The", "strength": 2, "tokens": 4}
    status, answer = get(
        server, f"/api/steer?coder={quote(partition.coder, safe='')}&latent=0&prompt=The"
    )
    assert (
        status == 405 and "POST" in answer["error"]
    )  # a link or an <img> on any web page must not run the model
    for origin in (
        "http://attacker.example",
        f"http://attacker.example:{port}",
        "null",
        f"http://localhost:{int(port) + 1}",
    ):
        status, answer, _ = steer_request(server, asked, {"Origin": origin})
        assert status == 403 and "Origin" in answer["error"], origin
    assert (
        steer_request(server, asked, {"Host": "attacker.example"})[0] == 403
    )  # DNS rebinding, as for every route
    assert (
        steer_request(server, asked, {"Content-Type": "text/plain"})[0] == 415
    )  # what a cross-site form may send without a preflight
    assert steer_request(server, "not json")[0] == 400
    for origin in (
        f"http://127.0.0.1:{port}",
        f"http://localhost:{port}",
        None,
    ):  # this server's own pages; a client that is not a browser
        status, answer, _ = steer_request(server, asked, {"Origin": origin} if origin else {})
        assert status == 200 and answer["state"] == "done" and answer["steered"] == " b", origin


def test_one_steering_at_a_time_per_model_and_a_second_is_told_when_to_retry(
    steering_server, partition
):
    server, entered, release = steering_server
    asked = {"coder": partition.coder, "latent": 0, "prompt": "The"}
    first = []
    running = threading.Thread(target=lambda: first.append(steer_request(server, asked)))
    running.start()
    assert entered.wait(60)
    status, answer, headers = steer_request(server, asked)
    assert status == 429 and "one at a time" in answer["error"] and int(headers["Retry-After"]) > 0
    release.set()
    running.join(60)
    assert first[0][0] == 200 and first[0][1]["state"] == "done"
    assert steer_request(server, asked)[0] == 200  # the model is free again


def test_search_leaves_out_a_vector_of_an_explanation_the_latent_no_longer_holds(
    partition, tmp_path
):
    """A crash between a shard's explanations and their sync to LanceDB leaves the vector of the old
    text: the latent must not be found by words its explanation no longer has (as
    `search_explanations` guards)."""
    from autointerp_defs.readside.app import Viewer

    root = copy_root(partition, tmp_path)
    path = root.explanations_path(partition.coder, partition.shard)
    explained = pd.read_parquet(path)
    row = explained[explained.status == "ok"].iloc[0]
    assert (
        Viewer(TableStore.at(root.root)).search(partition.coder, row.explanation)["hits"][0][
            "latent"
        ]
        == row.latent
    )
    explained.loc[explained.latent == row.latent, "explanation"] = (
        "an explanation written after the vectors"
    )
    explained.to_parquet(path, index=False)  # the table changed, LanceDB not (yet)
    hits = Viewer(TableStore.at(root.root)).search(partition.coder, row.explanation)["hits"]
    assert hits and row.latent not in [hit["latent"] for hit in hits]
    others = explained[(explained.status == "ok") & (explained.latent != row.latent)]
    assert {hit["latent"] for hit in hits} <= set(others.latent) and {
        hit["explanation"] for hit in hits
    } <= set(others.explanation)


def test_the_browser_reads_a_coders_cache_again_when_it_is_cached_anew(partition, tmp_path):
    """A running browser holds a coder's width and shards from its cache's meta.json: caching the coder again with
    another shard size must not leave it serving the old layout."""
    from autointerp_defs.readside.app import Viewer
    from storage.activations import read_cache_meta, write_cache_meta

    root = copy_root(partition, tmp_path)
    viewer = Viewer(TableStore.at(root.root))
    assert (
        viewer.index(partition.coder).shards == [f"{i:02d}" for i in range(8)]
        and viewer.latent(partition.coder, 600)["shard"] == "04"
    )
    meta = read_cache_meta(root.activations_dir(partition.coder))
    write_cache_meta(
        root.activations_dir(partition.coder),
        {**meta, "latents_per_shard": 576, "n_shards": 2, "cached_again": True},
    )
    assert (
        viewer.index(partition.coder).shards == ["00", "01"]
        and viewer.latent(partition.coder, 600)["shard"] == "01"
    )
    assert (
        viewer.latent_list(partition.coder, {"sort": "latent", "order": "desc", "per_page": "1"})[
            "rows"
        ][0]["shard"]
        == "01"
    )


def test_the_logit_lens_reads_the_unembedding_of_the_models_current_weights(
    partition, tmp_path, monkeypatch
):
    """The unembedding file is named by the model's identity (its content): weights changed in place, even with the
    old size and times, are never read through the earlier weights' file."""
    import os
    import time

    from safetensors.torch import save_file

    from autointerp_defs.readside import index
    from resources.subject_model import model_identity

    root = copy_root(partition, tmp_path)
    model = tmp_path / "checkpoint"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"a" * 4096)
    unembedding, before = torch.randn(8, 4), model_identity(str(model))
    save_file(
        {"unembedding": unembedding}, str(root.unembedding_path(before))
    )  # what the activations stage wrote
    lens = index.lens_model(TableStore.at(root.root), str(model))
    assert torch.equal(lens.get_output_embeddings().weight, unembedding)

    stat = (model / "model.safetensors").stat()
    time.sleep(0.05)
    (model / "model.safetensors").write_bytes(
        b"b" * 4096
    )  # other weights, same size, their times put back
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    started = []
    monkeypatch.setattr(
        index, "_build_lens", lambda path, *args: started.append(path)
    )  # loads no model here
    assert "loading the subject model" in index.lens_model(
        TableStore.at(root.root), str(model), wait=False
    )  # not the earlier weights' lens
    for build in list(index._LENS_BUILDS.values()):
        build.join(10)
    assert model_identity(str(model)) != before and [path.name for path in started] == [
        root.unembedding_path(model_identity(str(model))).name
    ]
