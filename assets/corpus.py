"""Stage 1, `corpus`: text → the subject model's tokens → fixed-length sequences, stored once with a hash.

The embedded corpus is the English prose that ships with every CPython: the language and library
documentation in `pydoc_data.topics` and the standard library's docstrings, with code, grammar
and headings filtered out, so the demo needs no download and no extra package.
"""

import functools
import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    Config,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from assets.automation import CODE_CHANGED, in_pool
from assets.checks import corpus_specs, corpus_tokens, result
from assets.stage_config import NO_MODELS, Models, settings_digest, with_defaults
from resources.settings import AutointerpSettings
from resources.subject_model import SubjectModelResource
from storage.corpus import write_corpus
from storage.layout import DataRoot

LOCAL_SUFFIXES = {".txt", ".jsonl", ".parquet"}
# what `embedded_documents` reads
EMBEDDED_CORPUS = "CPython documentation prose (pydoc_data.topics and standard-library docstrings)"


class EmptyCorpusError(ValueError):
    pass


class CorpusConfig(Config):
    source: str = Field(
        default="embedded",
        description="'embedded', a local .txt/.jsonl/.parquet file, or a Hugging Face dataset id.",
    )
    text_field: str = Field(
        default="text", description="Column holding the text in jsonl/parquet/HF sources."
    )
    split: str = Field(default="train", description="Split of a Hugging Face dataset.")
    ctx_len: int = Field(default=128, description="Tokens per sequence, BOS included.")
    n_tokens: int = Field(
        default=65_536, description="Tokens to keep (rounded down to whole sequences)."
    )
    add_bos: bool = Field(
        default=True, description="Start every sequence with the tokenizer's BOS token."
    )
    seed: int = Field(default=0, description="Seed of the document shuffle.")


def _prose(block: str) -> str | None:
    """A paragraph of running English text, or None for headings, code, grammar and tables."""
    lines = block.strip("\n").split("\n")
    text = " ".join(line.strip() for line in lines)
    if re.fullmatch(r"[*=\-~^\s]*", lines[-1]) or "::=" in text:
        return None
    if any(line.lstrip().startswith((">>>", "...", "$ ")) for line in lines):
        return None
    letters = re.sub(r"\s", "", text)
    if len(text.split()) < 8 or sum(c.isalpha() for c in letters) < 0.8 * len(letters):
        return None
    return text


def _stdlib_docstrings() -> list[str]:
    """Module, class and function docstrings of the top-level standard-library modules, in path order."""
    import ast
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    return texts


@functools.lru_cache(maxsize=1)
def embedded_documents() -> tuple[str, ...]:
    """English prose paragraphs of CPython's documentation (`pydoc_data.topics`) and stdlib docstrings."""
    import pydoc_data.topics

    sources = list(pydoc_data.topics.topics.values()) + _stdlib_docstrings()
    paragraphs = (_prose(block) for source in sources for block in re.split(r"\n\s*\n", source))
    return tuple(p for p in paragraphs if p)


def read_documents(source: str, text_field: str = "text", split: str = "train") -> list[str]:
    if source == "embedded":
        return embedded_documents()
    path = Path(source).expanduser()
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.exists():
            raise FileNotFoundError(
                f"Corpus file {path} does not exist. Fix: correct corpus.source."
            )
        if path.suffix == ".txt":
            return [p for p in re.split(r"\n\s*\n", path.read_text()) if p.strip()]
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            return [str(r[text_field]) for r in rows if r.get(text_field)]
        if path.suffix == ".parquet":
            import pandas as pd

            frame = pd.read_parquet(path, columns=[text_field])
            return [str(t) for t in frame[text_field] if t]
        raise ValueError(f"Unsupported corpus file {path}: use .txt, .jsonl or .parquet.")
    try:
        import datasets
    except ImportError as error:
        raise RuntimeError(
            f"Corpus source '{source}' looks like a Hugging Face dataset id; "
            "install the extra: pip install 'autointerp[hf]'"
        ) from error
    try:
        rows = datasets.load_dataset(source, split=split)
    except (
        ConnectionError,
        OSError,
    ) as error:  # no network, or no such dataset: the library says neither plainly
        raise RuntimeError(
            f"Corpus source '{source}' was read as a Hugging Face dataset id, and it could not be loaded "
            f"({type(error).__name__}: {str(error)[:200]}). Fix: without network, point corpus.source at a local "
            f".txt, .jsonl or .parquet file (or 'embedded'), or download the dataset first so it loads from the cache."
        ) from error
    return [row[text_field] for row in rows]


def tokenize_documents(
    documents: list[str], tokenizer, *, ctx_len: int, n_tokens: int, add_bos: bool, seed: int
) -> np.ndarray:
    """Shuffle documents, join them with EOS, and cut `[n_sequences, ctx_len]` int32 sequences."""
    documents = list(documents)
    random.Random(seed).shuffle(documents)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    body_len = ctx_len - 1 if add_bos else ctx_len
    n_sequences = max(n_tokens // ctx_len, 0)
    needed = n_sequences * body_len
    stream: list[int] = []
    for doc in documents:
        if len(stream) >= needed:
            break
        stream.extend(tokenizer.encode(doc, add_special_tokens=False))
        if eos is not None:
            stream.append(eos)
    n_sequences = min(n_sequences, len(stream) // body_len)
    body = np.asarray(stream[: n_sequences * body_len], dtype=np.int32).reshape(
        n_sequences, body_len
    )
    if add_bos:
        body = np.concatenate([np.full((n_sequences, 1), bos, np.int32), body], axis=1)
    return body


def special_token_ids(tokenizer) -> list[int]:
    """Ids of the tokenizer's special tokens (BOS, EOS, chat and tool markers), which prompts never show as text."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return sorted(
        {int(i) for i in tokenizer.all_special_ids}
        | {int(i) for i, token in added.items() if getattr(token, "special", False)}
    )


def build_corpus(config: CorpusConfig, tokenizer, root: DataRoot) -> dict:
    documents = read_documents(config.source, config.text_field, config.split)
    tokens = tokenize_documents(
        documents,
        tokenizer,
        ctx_len=config.ctx_len,
        n_tokens=config.n_tokens,
        add_bos=config.add_bos,
        seed=config.seed,
    )
    if tokens.size == 0:
        raise EmptyCorpusError(
            f"Corpus source '{config.source}' gave no complete sequence of {config.ctx_len} "
            f"tokens ({len(documents)} documents). Fix: point corpus.source at a file with text"
            f"{f' in field {config.text_field!r}' if config.source.endswith(('.jsonl', '.parquet')) else ''}"
            ", or lower corpus.ctx_len."
        )
    content_hash = hashlib.sha256(tokens.tobytes() + str(tokens.shape).encode()).hexdigest()[:16]
    meta = {
        "hash": content_hash,
        "source": config.source,
        "ctx_len": config.ctx_len,
        "n_sequences": int(tokens.shape[0]),
        "n_tokens": int(tokens.size),
        "add_bos": config.add_bos,
        "seed": config.seed,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "special_ids": special_token_ids(tokenizer),
    }
    write_corpus(root, tokens, tokenizer.batch_decode([[i] for i in range(len(tokenizer))]), meta)
    return meta


def _corpus(
    context: AssetExecutionContext,
    config: CorpusConfig,
    settings: AutointerpSettings,
    subject_model: SubjectModelResource,
) -> MaterializeResult:
    meta = build_corpus(config, subject_model.tokenizer(), settings.root)
    context.log.info(
        f"corpus: {meta['n_tokens']} tokens in {meta['n_sequences']} sequences, hash {meta['hash']}"
    )
    return MaterializeResult(
        metadata={
            "tokens": meta["n_tokens"],
            "sequences": meta["n_sequences"],
            "content_hash": meta["hash"],
            "source": meta["source"],
            "tokenizer": subject_model.tokenizer_identity(),
            "path": MetadataValue.path(str(settings.root.corpus_dir)),
        },
        data_version=DataVersion(meta["hash"]),
        check_results=[result("token_count", corpus_tokens(meta, config.n_tokens))],
    )


CORPUS_VERSION = "1"


def corpus_asset(defaults: dict | None = None, models: Models = NO_MODELS) -> AssetsDefinition:
    """The `corpus` asset of a deployment: `defaults` are its [corpus] table and the subject model's
    weights (its tokenizer) are part of the code version. Re-tokenizing into the same tokens keeps the
    data version (the content hash), so only a new tokenizer's tokens make the stages below stale."""
    Configured = with_defaults(CorpusConfig, defaults or {}, "corpus")

    def corpus(
        context: AssetExecutionContext,
        config,
        settings: AutointerpSettings,
        subject_model: SubjectModelResource,
    ) -> MaterializeResult:
        return _corpus(context, config, settings, subject_model)

    corpus.__annotations__.update(
        config=Configured,
        context=AssetExecutionContext,
        settings=AutointerpSettings,
        subject_model=SubjectModelResource,
        **{"return": MaterializeResult},
    )
    return asset(
        name="corpus",
        group_name="autointerp",
        code_version=f"{CORPUS_VERSION}-{settings_digest(Configured())}{models.version_part('tokenizer')}",
        automation_condition=CODE_CHANGED,
        check_specs=corpus_specs(),
        **in_pool(None),
        description="Tokenized fixed-length sequences of the corpus, stored once with a content hash.",
    )(corpus)
