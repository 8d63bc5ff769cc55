"""`autointerp label-graph` on a graph JSON written by circuit-tracer's own `create_graph_files`, read back by
its own pydantic `Model` and local server, and the latent page's link to the labelled graph.

The Graph is built directly (circuit-tracer's `Graph` class with a few features and a hand-made adjacency
matrix), not by attribution over a model: the serialization only reads the Graph and the tokenizer."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request
from urllib.parse import quote

import pandas as pd
import pytest

from storage.layout import DataRoot
from tests.conftest import TINY_CODER

pytest.importorskip(
    "circuit_tracer"
)  # the test extra: `make install-test` installs it with --no-deps


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The embedded subject model's tokenizer as a folder: circuit-tracer loads it by `cfg.tokenizer_name`."""
    from resources.subject_model import load_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture()
def root(partition, tmp_path):
    """A copy of the materialized partition's root: the command records graphs in it."""
    shutil.copytree(partition.root, tmp_path / "root")
    return tmp_path / "root"


def explained(root) -> dict[int, str]:
    rows = pd.read_parquet(DataRoot.at(root).explanations_path(TINY_CODER, "00"))
    ok = rows[rows.status == "ok"]
    return dict(zip(ok.latent.astype(int), ok.explanation, strict=True))


def write_graph(
    folder, tokenizer_dir, features: list[tuple[int, int, int]], scan: str, slug="tiny"
):
    """circuit-tracer's graph files for a two-token prompt: `features` (layer, position, index), the first
    read from token 0 and feeding the others, which feed the one logit; returns the `<slug>.json` path."""
    import torch
    from circuit_tracer.attribution.targets import LogitTarget
    from circuit_tracer.graph import Graph
    from circuit_tracer.utils import create_graph_files
    from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig

    n_layers, n_pos, n_features = 4, 2, len(features)
    size = n_features + n_layers * n_pos + n_pos + 1  # features, errors, tokens, logit
    first_token, second_token, logit = size - 3, size - 2, size - 1
    adjacency = torch.zeros(size, size)  # rows: targets, columns: sources
    adjacency[0, first_token] = 1.0
    for f in range(1, n_features):
        adjacency[f, 0], adjacency[f, second_token], adjacency[logit, f] = 1.0, 0.5, 1.0
    cfg = UnifiedConfig(
        n_layers=n_layers,
        d_model=8,
        d_head=2,
        n_heads=4,
        d_mlp=16,
        d_vocab=49152,
        tokenizer_name=str(tokenizer_dir),
        model_name="tiny",
        original_architecture="LlamaForCausalLM",
    )
    graph = Graph(
        input_string="The cat",
        input_tokens=torch.tensor([504, 2644]),
        active_features=torch.tensor(features),
        adjacency_matrix=adjacency,
        cfg=cfg,
        selected_features=torch.arange(n_features),
        activation_values=torch.ones(n_features),
        logit_targets=[LogitTarget(" sat", 3290)],
        logit_probabilities=torch.tensor([1.0]),
        scan=scan,
    )
    create_graph_files(graph, slug, folder)  # as circuit-tracer's users call it
    return folder / f"{slug}.json"


def label(capsys, root, *args: str) -> str:
    from autointerp_defs.cli import main

    main(["--data", str(root), "label-graph", *args])
    return capsys.readouterr().out.strip()


def refused(capsys, root, *args: str) -> str:
    with pytest.raises(SystemExit) as stopped:
        label(capsys, root, *args)
    message = str(stopped.value.code)
    assert "\n" not in message and "Traceback" not in message
    return message


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def test_labels_feature_nodes_read_back_by_circuit_tracer_and_linked_from_the_latent_page(
    root, tmp_path, tokenizer_dir, capsys
):
    from circuit_tracer.frontend import serve
    from circuit_tracer.frontend.graph_models import Model
    from playwright.sync_api import sync_playwright

    from autointerp_defs.readside.server import make_server
    from tests.defs.test_viewer_browser import chromium

    texts = explained(root)
    a, b = sorted(texts)[:2]
    unexplained = next(i for i in range(1152) if i not in texts)
    features = [(1, 0, a), (3, 1, a), (3, 1, b), (3, 1, unexplained)]  # layer 1: no coder reads it
    graph = write_graph(tmp_path / "ct", tokenizer_dir, features, scan="smollm2-135m-instruct")
    written = Model.model_validate_json(graph.read_text())
    assert {n.node_id for n in written.nodes if n.feature_type == "cross layer transcoder"} == {
        f"{layer}_{index}_{pos}" for layer, pos, index in features
    }

    out = tmp_path / "labelled.json"
    printed = label(capsys, root, str(graph), "--coder", "tiny-topk", "--out", str(out))
    assert printed == f"wrote {out}: 2 labelled, 2 without explanation, 3 non-feature"
    before = {n.node_id: n for n in written.nodes}
    back = Model.model_validate_json(out.read_text())  # circuit-tracer's own model of the file
    clerps = {n.node_id: n.clerp for n in back.nodes}
    assert clerps[f"3_{a}_1"] == texts[a] and clerps[f"3_{b}_1"] == texts[b]
    assert clerps[f"1_{a}_0"] == "" and clerps[f"3_{unexplained}_1"] == ""
    assert all(
        clerps[i] == n.clerp
        for i, n in before.items()
        if n.feature_type != "cross layer transcoder"
    )
    assert back.metadata == written.metadata and back.links == written.links
    assert json.loads(graph.read_text()) == json.loads(
        written.model_dump_json()
    )  # --out: input kept

    # one coder key labels its layer alike; without --out the graph itself is labelled
    again = label(capsys, root, str(graph), "--coder", TINY_CODER)
    assert again == f"wrote {graph}: 2 labelled, 2 without explanation, 3 non-feature"
    assert json.loads(graph.read_text()) == json.loads(out.read_text())

    # the copy under the data root, served by circuit-tracer's own local server
    server = serve(data_dir=str(DataRoot.at(root).graphs_dir), port=0)
    try:
        base = f"http://127.0.0.1:{server.httpd.server_address[1]}"
        served = Model.model_validate_json(get(f"{base}/graph_data/tiny.json"))
        assert {n.node_id: n.clerp for n in served.nodes} == clerps
        index = json.loads(get(f"{base}/data/graph-metadata.json"))
        assert [g["slug"] for g in index["graphs"]] == ["tiny"]
    finally:
        server.stop()

    # the latent page links the latent to the graph that carries its label
    httpd = make_server(str(root), port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_port}"
        page = json.loads(get(f"{base}/api/latent?coder={TINY_CODER}&latent={a}"))
        assert page["graphs"] == [
            {"slug": "tiny", "nodes": [f"3_{a}_1"], "url": "/graphs/tiny.json"}
        ]
        assert (
            json.loads(get(f"{base}/api/latent?coder={TINY_CODER}&latent={unexplained}"))["graphs"]
            == []
        )
        assert json.loads(get(base + page["graphs"][0]["url"])) == json.loads(out.read_text())
        with sync_playwright() as p:  # and the page shows the link
            browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
            tab = browser.new_page()
            tab.goto(f"{base}/latent?coder={quote(TINY_CODER, safe='')}&latent={a}")
            assert tab.wait_for_selector("#graphs a").get_attribute("href") == "/graphs/tiny.json"
            assert f"tiny (3_{a}_1)" in tab.inner_text("#graphs")
            browser.close()
        with pytest.raises(urllib.error.HTTPError) as missing:
            get(f"{base}/graphs/labels.json")  # only recorded graphs are served
        assert missing.value.code == 404
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_refuses_an_unknown_coder_another_models_graph_and_a_file_that_is_no_graph(
    root, tmp_path, tokenizer_dir, capsys
):
    graph = write_graph(tmp_path / "ct", tokenizer_dir, [(3, 0, 1), (3, 1, 2)], scan="gemma-2-2b")
    original = graph.read_text()
    assert "No coder 'nope'" in refused(capsys, root, str(graph), "--coder", "nope")
    other = refused(capsys, root, str(graph), "--coder", "tiny-topk")
    assert (
        "a graph of 'gemma-2-2b', not of tiny-topk's subject model 'smollm2-135m-instruct'" in other
    )
    assert graph.read_text() == original  # nothing written
    not_graph = tmp_path / "other.json"
    not_graph.write_text(json.dumps({"nodes": [1, 2]}))
    assert "is not an attribution graph JSON" in refused(
        capsys, root, str(not_graph), "--coder", "tiny-topk"
    )
    not_graph.write_text("not json")
    assert "is not a graph JSON" in refused(capsys, root, str(not_graph), "--coder", "tiny-topk")
    assert not DataRoot.at(root).graphs_dir.exists()
