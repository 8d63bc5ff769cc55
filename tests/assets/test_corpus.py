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
