import json

import numpy as np
import pandas as pd
import pytest

from assets.corpus import (
    CorpusConfig,
    EmptyCorpusError,
    build_corpus,
    embedded_documents,
    read_documents,
    tokenize_documents,
)
from storage.corpus import load_corpus
from storage.layout import DataRoot


def test_embedded_corpus_is_english_prose_without_code():
    docs = embedded_documents()
    assert len(docs) > 500
    words = " ".join(docs).split()
    assert len(words) > 100_000
    assert sum(w.lower() in {"the", "a", "of", "is", "and"} for w in words) / len(words) > 0.1
    assert not any(d.lstrip().startswith(">>>") for d in docs)


def test_sequences_have_fixed_length_bos_and_are_seeded(subject):
    tok = subject.tokenizer()
    docs = embedded_documents()
    a = tokenize_documents(docs, tok, ctx_len=32, n_tokens=320, add_bos=True, seed=3)
    b = tokenize_documents(docs, tok, ctx_len=32, n_tokens=320, add_bos=True, seed=3)
    c = tokenize_documents(docs, tok, ctx_len=32, n_tokens=320, add_bos=True, seed=4)
    assert a.shape == (10, 32) and a.dtype == np.int32
    assert (a[:, 0] == tok.bos_token_id).all()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    no_bos = tokenize_documents(docs, tok, ctx_len=32, n_tokens=320, add_bos=False, seed=3)
    assert np.array_equal(no_bos[0, :31], a[0, 1:])


def test_build_corpus_stores_tokens_vocab_and_content_hash(tmp_path, subject):
    root = DataRoot.at(tmp_path)
    meta = build_corpus(CorpusConfig(ctx_len=64, n_tokens=640), subject.tokenizer(), root)
    again = build_corpus(CorpusConfig(ctx_len=64, n_tokens=640), subject.tokenizer(), root)
    other = build_corpus(
        CorpusConfig(ctx_len=64, n_tokens=640, seed=1),
        subject.tokenizer(),
        DataRoot.at(tmp_path / "b"),
    )
    assert meta["hash"] == again["hash"] != other["hash"]
    corpus = load_corpus(root)
    assert corpus.tokens.shape == (10, 64)
    assert corpus.vocab[corpus.tokens[0, 5]] in subject.tokenizer().decode(corpus.tokens[0])


def test_local_txt_jsonl_parquet_sources(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph here.\n\nSecond one.\n")
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"body": t}) for t in ["one text", "two text"])
    )
    pd.DataFrame({"body": ["x y z", "u v"]}).to_parquet(tmp_path / "a.parquet")
    assert read_documents(str(tmp_path / "a.txt")) == ["First paragraph here.", "Second one.\n"]
    assert read_documents(str(tmp_path / "a.jsonl"), text_field="body") == ["one text", "two text"]
    assert read_documents(str(tmp_path / "a.parquet"), text_field="body") == ["x y z", "u v"]
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        read_documents(str(tmp_path / "missing.txt"))


def test_empty_corpus_names_the_source_and_the_fix(tmp_path, subject):
    (tmp_path / "empty.txt").write_text("\n\n")
    config = CorpusConfig(source=str(tmp_path / "empty.txt"), ctx_len=64, n_tokens=640)
    with pytest.raises(EmptyCorpusError, match=r"empty\.txt.*Fix: point corpus.source"):
        build_corpus(config, subject.tokenizer(), DataRoot.at(tmp_path / "d"))


def test_a_hugging_face_dataset_that_cannot_load_offline_says_to_use_a_local_file(monkeypatch):
    """The datasets library offline retries, then raises ConnectionError; a stand-in for it raises the same."""
    import sys
    import types

    from assets.corpus import read_documents

    def load_dataset(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(
        RuntimeError,
        match=r"'HuggingFaceFW/fineweb' was read as a Hugging Face dataset id.*Fix: without network, "
        r"point corpus\.source at a local \.txt, \.jsonl or \.parquet file",
    ):
        read_documents("HuggingFaceFW/fineweb")


def word_files(tmp_path, n: int = 200) -> tuple[str, str]:
    """A .txt of 'alpha' paragraphs and a .jsonl of 'beta' rows: each sequence of the corpus names its source."""
    (tmp_path / "alpha.txt").write_text("\n\n".join(f"alpha apple avocado {i}" for i in range(n)))
    (tmp_path / "beta.jsonl").write_text(
        "\n".join(json.dumps({"body": f"beta banana berry {i}"}) for i in range(n))
    )
    return str(tmp_path / "alpha.txt"), str(tmp_path / "beta.jsonl")


def mixture(alpha: str, beta: str, a: float = 0.75, b: float = 0.25) -> list[dict]:
    return [
        {"source": alpha, "weight": a},
        {"source": beta, "weight": b, "text_field": "body"},
    ]


def origins(corpus, tokenizer) -> list[str]:
    """Which source each stored sequence came from, read off its text."""
    texts = [tokenizer.decode(row) for row in corpus.tokens]
    assert all(("alpha" in t) != ("beta" in t) for t in texts)
    return ["alpha" if "alpha" in t else "beta" for t in texts]


def test_a_mixture_fills_each_source_s_share_of_the_sequences_and_counts_its_tokens(
    tmp_path, subject
):
    alpha, beta = word_files(tmp_path)
    tok = subject.tokenizer()
    config = CorpusConfig(ctx_len=16, n_tokens=16 * 8, sources=mixture(alpha, beta))
    meta = build_corpus(config, tok, DataRoot.at(tmp_path / "a"))
    corpus = load_corpus(DataRoot.at(tmp_path / "a"))
    seen = origins(corpus, tok)
    assert seen.count("alpha") == 6 and seen.count("beta") == 2
    assert [(s["source"], s["weight"], s["sequences"], s["tokens"]) for s in meta["sources"]] == [
        (alpha, 0.75, 6, 96),
        (beta, 0.25, 2, 32),
    ]
    assert corpus.meta["sources"] == meta["sources"] and meta["n_tokens"] == 128
    assert meta["source"] == f"{alpha} (0.75) + {beta} (0.25)"

    reordered = CorpusConfig(ctx_len=16, n_tokens=16 * 8, sources=mixture(alpha, beta)[::-1])
    again = build_corpus(reordered, tok, DataRoot.at(tmp_path / "b"))
    assert again["hash"] == meta["hash"]
    half = CorpusConfig(ctx_len=16, n_tokens=16 * 8, sources=mixture(alpha, beta, 1, 1))
    halves = build_corpus(half, tok, DataRoot.at(tmp_path / "c"))
    assert halves["hash"] != meta["hash"]
    assert origins(load_corpus(DataRoot.at(tmp_path / "c")), tok).count("beta") == 4


def test_shares_are_whole_sequences_in_proportion_to_the_weights():
    from assets.corpus import shares

    assert shares(10, [0.5, 0.5]) == [5, 5]
    assert shares(10, [1, 2]) == [3, 7]
    assert shares(7, [1, 1, 1]) == [3, 2, 2]
    assert shares(0, [0.3, 0.7]) == [0, 0]
    assert sum(shares(1001, [0.1, 0.2, 0.3, 0.4])) == 1001


def test_sources_are_spread_over_the_corpus_each_in_its_own_order():
    from assets.corpus import interleave

    pools = [np.arange(30).reshape(30, 1), np.arange(100, 110).reshape(10, 1)]
    mixed = interleave(pools, seed=0)[:, 0]
    assert np.array_equal(interleave(pools, seed=0)[:, 0], mixed)
    assert not np.array_equal(interleave(pools, seed=1)[:, 0], mixed)
    assert list(mixed[mixed < 100]) == list(range(30))
    assert list(mixed[mixed >= 100]) == list(range(100, 110))
    assert (mixed[:20] >= 100).any() and (mixed[20:] < 100).any()  # not one block per source


def test_one_source_in_sources_gives_the_single_source_s_tokens(tmp_path, subject):
    alpha, _ = word_files(tmp_path)
    tok = subject.tokenizer()
    single = build_corpus(
        CorpusConfig(source=alpha, ctx_len=16, n_tokens=160), tok, DataRoot.at(tmp_path / "a")
    )
    listed = build_corpus(
        CorpusConfig(sources=[{"source": alpha}], ctx_len=16, n_tokens=160),
        tok,
        DataRoot.at(tmp_path / "b"),
    )
    assert single["hash"] == listed["hash"] and "sources" not in single


def corpus_code_version(defaults: dict) -> str:
    from dagster import AssetKey

    from assets.corpus import corpus_asset

    return corpus_asset(defaults).code_versions_by_key[AssetKey("corpus")]


def test_the_single_source_form_keeps_its_code_version_and_a_mixture_is_identified_by_its_weights():
    """Pinned: the code versions of the deployments' [corpus] tables before mixtures existed, so upgrading
    re-runs no corpus. A mixture's identity is its set of (source, weight), not the order written."""
    assert corpus_code_version({}) == "1-11b25cbbaa"
    assert corpus_code_version({"n_tokens": 65536}) == "1-11b25cbbaa"
    assert corpus_code_version({"n_tokens": 1048576}) == "1-18f82f0c1a"
    assert corpus_code_version({"sources": []}) == "1-11b25cbbaa"
    fineweb = {"source": "HuggingFaceFW/fineweb", "weight": 0.5}
    chat = {"source": "lmsys/lmsys-chat-1m", "weight": 0.5}
    half = corpus_code_version({"sources": [fineweb, chat]})
    assert half == corpus_code_version({"sources": [chat, fineweb]})
    assert half != corpus_code_version({"sources": [fineweb, {**chat, "weight": 0.25}]})
    assert half != corpus_code_version({"sources": [fineweb, {**chat, "text_field": "body"}]})
    assert half not in ("1-11b25cbbaa", corpus_code_version({"source": "HuggingFaceFW/fineweb"}))


@pytest.mark.parametrize(
    ("sources", "error"),
    [
        (
            [{"source": "a.txt", "weight": 0}, {"source": "b.txt", "weight": 1}],
            r"corpus\.sources\[0\]\.weight = 0\.0: a weight must be above 0.*Fix: give it a positive weight",
        ),
        (
            [{"source": "a.txt", "weight": -0.5}],
            r"corpus\.sources\[0\]\.weight = -0\.5: a weight must be above 0",
        ),
        (
            [{"source": "a.txt", "weight": 0.5}, {"source": "b.txt"}],
            r"corpus\.sources\[1\] have no weight.*Fix: give each source a weight",
        ),
        (
            [{"source": "s3://bucket/a.txt", "weight": 1}],
            r"corpus\.sources\[0\]\.source = 's3://bucket/a\.txt' is no known kind of source\. "
            r"Fix: use 'embedded', a \.txt, \.jsonl or \.parquet file, or a Hugging Face dataset id",
        ),
        (
            [{"source": "data/a.csv", "weight": 1}],
            r"'data/a\.csv' is no known kind.*\(convert the file to one of those\)",
        ),
        (
            [{"source": " ", "weight": 1}],
            r"corpus\.sources\[0\]\.source is empty\. Fix: give it 'embedded'",
        ),
        (
            [{"source": "a.txt", "wieght": 1}],
            r"corpus\.sources\[0\]\] wieght = 1: Extra inputs are not permitted.*Fix",
        ),
        (
            [{"source": "a.txt", "weight": 1}, {"source": "a.txt", "weight": 2}],
            r"corpus\.sources names 'a\.txt' twice\. Fix: give it once",
        ),
    ],
)
def test_each_bad_mixture_stops_with_one_line_naming_it_and_the_fix(sources, error):
    from assets.stage_config import with_defaults

    with pytest.raises(ValueError, match=error) as raised:
        with_defaults(CorpusConfig, {"sources": sources}, "corpus")
    assert "\n" not in str(raised.value) and str(raised.value).startswith("[corpus] sources = ")


def test_a_single_source_of_no_known_kind_or_beside_sources_stops_at_once():
    from assets.stage_config import with_defaults

    with pytest.raises(ValueError, match=r"corpus\.source = 'ftp://x/y\.txt' is no known kind"):
        with_defaults(CorpusConfig, {"source": "ftp://x/y.txt"}, "corpus")
    with pytest.raises(ValueError, match=r"corpus\.source = 'a\.txt' and corpus\.sources are both"):
        with_defaults(CorpusConfig, {"source": "a.txt", "sources": [{"source": "b.txt"}]}, "corpus")


def test_an_empty_source_of_a_mixture_is_named_with_the_fix(tmp_path, subject):
    alpha, _ = word_files(tmp_path)
    (tmp_path / "empty.jsonl").write_text(json.dumps({"other": "text"}))
    sources = [
        {"source": alpha, "weight": 0.5},
        {"source": str(tmp_path / "empty.jsonl"), "weight": 0.5},
    ]
    with pytest.raises(
        EmptyCorpusError,
        match=r"'.*empty\.jsonl' gave no complete sequence of 16 tokens \(0 documents\)\. "
        r"Fix: point its entry in corpus\.sources \(or drop it\) at a file with text in field 'text'",
    ):
        build_corpus(
            CorpusConfig(ctx_len=16, n_tokens=160, sources=sources),
            subject.tokenizer(),
            DataRoot.at(tmp_path / "d"),
        )


def test_a_deployment_s_mixture_materializes_with_tokens_per_source_in_its_metadata(
    tmp_path, subject
):
    """The TOML form, through the deployment loader and Dagster's config schema (a list of tables)."""
    from dagster import DagsterInstance, materialize

    from assets.corpus import corpus_asset
    from autointerp_defs.deployments import load_deployment
    from resources.settings import AutointerpSettings

    alpha, beta = word_files(tmp_path)
    toml = tmp_path / "mixed.toml"
    toml.write_text(
        "[corpus]\nctx_len = 16\nn_tokens = 128\n"
        f'sources = [{{source = "{alpha}", weight = 1}}, '
        f'{{source = "{beta}", weight = 3, text_field = "body"}}]\n'
    )
    deployment = load_deployment(str(toml))
    result = materialize(
        [corpus_asset(deployment.stage("corpus"))],
        resources={
            "settings": AutointerpSettings(data_dir=str(tmp_path / "data")),
            "subject_model": subject,
        },
        instance=DagsterInstance.ephemeral(),
    )
    metadata = result.asset_materializations_for_node("corpus")[0].metadata
    assert [(s["source"], s["tokens"]) for s in metadata["sources"].value] == [
        (alpha, 32),
        (beta, 96),
    ]
    assert metadata["tokens"].value == 128


def test_a_mixture_of_a_hub_dataset_and_a_local_file(tmp_path, subject, monkeypatch):
    """The hub source goes through the datasets library's own download code, from a scripted hub."""
    from tests.scripted_hub_server import ScriptedHub, hub_environment

    datasets = pytest.importorskip("datasets")
    alpha, _ = word_files(tmp_path)
    rows = "\n".join(json.dumps({"text": f"beta banana berry {i}"}) for i in range(200))
    tok = subject.tokenizer()
    with ScriptedHub() as hub, hub_environment(hub.url, tmp_path / "hf_home"):
        hub.add("datasets/scripted/beta", {"train.jsonl": rows.encode()})
        for name, value in {  # the datasets library reads these once, at import
            "HF_ENDPOINT": hub.url,
            "HUB_DATASETS_URL": hub.url + "/datasets/{repo_id}/resolve/{revision}/{path}",
            "HF_HUB_OFFLINE": False,
            "HF_DATASETS_OFFLINE": False,
            "HF_DATASETS_CACHE": tmp_path / "datasets",
            "USE_PARQUET_EXPORT": False,  # the dataset viewer is another host
        }.items():
            monkeypatch.setattr(datasets.config, name, value)
        sources = [{"source": "scripted/beta", "weight": 0.5}, {"source": alpha, "weight": 0.5}]
        meta = build_corpus(
            CorpusConfig(ctx_len=16, n_tokens=16 * 8, sources=sources),
            tok,
            DataRoot.at(tmp_path / "data"),
        )
        asked = [path for _, path, _ in hub.requests]
    assert [(s["source"], s["tokens"]) for s in meta["sources"]] == [
        (alpha, 64),
        ("scripted/beta", 64),
    ]
    assert origins(load_corpus(DataRoot.at(tmp_path / "data")), tok).count("beta") == 4
    assert any(
        path.startswith("/datasets/scripted/beta/resolve/") and path.endswith("/train.jsonl")
        for path in asked
    )
