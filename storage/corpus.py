"""The corpus on disk, `corpus/`: `tokens.safetensors` (`tokens`, int32 `[n_sequences, ctx_len]`),
`vocab.json` (token id → the tokenizer's own string) and `meta.json` (content hash, source,
ctx_len, n_sequences, n_tokens, add_bos, seed, tokenizer, special_ids, and for a mixture `sources`:
each source with its weight, sequences and tokens), written last so a corpus with a `meta.json` is
complete."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load_file, save_file

from storage.atomic import atomic_path, read_json, write_json
from storage.layout import DataRoot


@dataclass
class Corpus:
    tokens: np.ndarray
    vocab: list[str]
    """Token id → the tokenizer's own string (control tokens included): for embedding and search."""
    meta: dict

    @property
    def special_ids(self) -> list[int]:
        """Ids of the tokenizer's special tokens; a corpus built before they were stored: tokens like <|name|>."""
        special = self.meta.get("special_ids")
        return (
            special
            if special is not None
            else [i for i, token in enumerate(self.vocab) if re.fullmatch(r"<\|[^|\s]+\|>", token)]
        )


def load_corpus(root: DataRoot) -> Corpus:
    if not root.corpus_meta_path.exists():
        raise FileNotFoundError(
            f"No corpus under {root.corpus_dir}. Materialize the `corpus` asset first."
        )
    return Corpus(
        tokens=load_file(str(root.corpus_tokens_path))["tokens"],
        vocab=json.loads(root.corpus_vocab_path.read_text()),
        meta=read_json(root.corpus_meta_path),
    )


def write_corpus(root: DataRoot, tokens: np.ndarray, vocab: list[str], meta: dict) -> None:
    with atomic_path(root.corpus_tokens_path) as tmp:
        save_file({"tokens": tokens}, str(tmp))
    with atomic_path(root.corpus_vocab_path) as tmp:
        tmp.write_text(json.dumps(vocab))
    write_json(root.corpus_meta_path, meta)
