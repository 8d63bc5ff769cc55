"""Stage 1, `corpus`: text → the subject model's tokens → fixed-length sequences, stored once with a hash.

The embedded corpus is the English prose that ships with every CPython: the language and library
documentation in `pydoc_data.topics` and the standard library's docstrings, with code, grammar
and headings filtered out, so the demo needs no download and no extra package. A mixture (`sources`,
as Transluce's FineWeb and LMSYS chat) gives each source its weight's share of the sequences.
"""

import functools
import hashlib
import json
import math
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from assets.automation import CODE_CHANGED, in_pool
from assets.checks import corpus_specs, corpus_tokens, result
from assets.stage_config import (
    NO_MODELS,
    Models,
    added_later,
    problems,
    settings_digest,
    with_defaults,
)
from resources.settings import AutointerpSettings
from resources.subject_model import SubjectModelResource
from storage.corpus import write_corpus
from storage.layout import DataRoot

LOCAL_SUFFIXES = {".txt", ".jsonl", ".parquet"}
# what `embedded_documents` reads
EMBEDDED_CORPUS = "CPython documentation prose (pydoc_data.topics and standard-library docstrings)"


class EmptyCorpusError(ValueError):
    pass


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
OTHER_FILE_SUFFIXES = {".csv", ".tsv", ".json", ".gz", ".zip", ".md", ".html", ".arrow"}
SOURCE_KINDS = (
    "'embedded', a .txt, .jsonl or .parquet file, or a Hugging Face dataset id (owner/name)"
)


def check_source_kind(source: str, where: str) -> None:
    """Fail now, naming `where`, on a source that is none of the kinds `read_documents` reads (a URL,
    another file format, a path that is no dataset id), rather than when the corpus is built."""
    suffix = Path(source).suffix.lower()
    if "://" not in source and (source == "embedded" or suffix in LOCAL_SUFFIXES):
        return
    if "://" in source or suffix in OTHER_FILE_SUFFIXES or not HUB_ID.fullmatch(source):
        raise ValueError(
            f"{where} = {source!r} is no known kind of source. Fix: use {SOURCE_KINDS}"
            f"{' (convert the file to one of those)' if suffix in OTHER_FILE_SUFFIXES else ''}."
        )


class MixtureSource(BaseModel):
    """One entry of `[corpus] sources`; text_field and split default to the [corpus] ones."""

    model_config = ConfigDict(extra="forbid")
    source: str
    weight: float | None = None
    text_field: str | None = None
    split: str | None = None


def checked_mixture(entries: list[dict], text_field: str, split: str, source: str) -> list[dict]:
    """`[corpus] sources` complete (each with its weight, text field and split) and sorted, so that the
    set of sources and weights, not the order they were written in, is the corpus's identity; a
    ValueError naming the entry and the fix for a bad one."""
    if not entries:
        return []
    if source != "embedded":
        raise ValueError(
            f"corpus.source = {source!r} and corpus.sources are both set. "
            "Fix: move that source into corpus.sources, or drop corpus.sources."
        )
    mixture = []
    for i, entry in enumerate(entries):
        where = f"corpus.sources[{i}]"
        try:
            one = MixtureSource(**entry)
        except ValidationError as error:
            raise ValueError(
                f"{problems(error, where)}. Fix: give each source a source "
                "and optionally weight, text_field and split."
            ) from None
        if not one.source.strip():
            raise ValueError(f"{where}.source is empty. Fix: give it {SOURCE_KINDS}.")
        check_source_kind(one.source, f"{where}.source")
        if one.weight is not None and not 0 < one.weight < math.inf:
            raise ValueError(
                f"{where}.weight = {one.weight}: a weight must be above 0 (a share relative to the "
                "other sources'). Fix: give it a positive weight, or drop the source."
            )
        mixture.append(
            {
                "source": one.source,
                "weight": one.weight,
                "text_field": one.text_field or text_field,
                "split": one.split or split,
            }
        )
    unweighted = [i for i, entry in enumerate(mixture) if entry["weight"] is None]
    if unweighted and len(mixture) > 1:
        raise ValueError(
            f"corpus.sources{unweighted} have no weight, and a mixture needs one for every source. "
            "Fix: give each source a weight, e.g. weight = 0.5 each for half and half."
        )
    mixture = sorted(
        ({**entry, "weight": float(entry["weight"] or 1.0)} for entry in mixture),
        key=lambda entry: (entry["source"], entry["text_field"], entry["split"]),
    )
    for a, b in zip(mixture, mixture[1:], strict=False):
        if (a["source"], a["text_field"], a["split"]) == (b["source"], b["text_field"], b["split"]):
            raise ValueError(
                f"corpus.sources names {a['source']!r} twice. Fix: give it once, with the sum of its weights."
            )
    return mixture


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
    sources: list[dict] = added_later(
        [],
        description="A mixture instead of `source`: entries {source, weight, text_field, split} "
        "(text_field and split default to the ones above; weights are relative shares, one for "
        "every source); each source's sequences fill its share of the corpus.",
    )

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        check_source_kind(source, "corpus.source")
        return source

    @field_validator("sources")
    @classmethod
    def _checked_sources(cls, sources: list[dict], info: ValidationInfo) -> list[dict]:
        return checked_mixture(
            sources,
            info.data.get("text_field", "text"),
            info.data.get("split", "train"),
            info.data.get("source", "embedded"),
        )


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


def shares(n: int, weights: list[float]) -> list[int]:
    """`n` split in proportion to `weights`: whole numbers summing to `n` (largest remainders first)."""
    exact = [n * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def interleave(pools: list[np.ndarray], seed: int) -> np.ndarray:
    """The sources' sequences spread over the corpus in one seeded order, each source's kept in its own
    order (so a single source's sequences come out as they went in)."""
    slots = [i for i, pool in enumerate(pools) for _ in range(len(pool))]
    random.Random(seed).shuffle(slots)
    rows = [iter(pool) for pool in pools]
    return np.stack([next(rows[i]) for i in slots])


def build_corpus(config: CorpusConfig, tokenizer, root: DataRoot) -> dict:
    """Each source tokenized on its own into its share of the sequences (all of them for a single
    source), the shares set by the weights, then spread over the corpus in a seeded order."""
    sources = config.sources or [
        {
            "source": config.source,
            "weight": 1.0,
            "text_field": config.text_field,
            "split": config.split,
        }
    ]
    counts = shares(max(config.n_tokens // config.ctx_len, 0), [s["weight"] for s in sources])
    pools = []
    for source, count in zip(sources, counts, strict=True):
        documents = read_documents(source["source"], source["text_field"], source["split"])
        pool = tokenize_documents(
            documents,
            tokenizer,
            ctx_len=config.ctx_len,
            n_tokens=count * config.ctx_len,
            add_bos=config.add_bos,
            seed=config.seed,
        )
        if len(pool) == 0 and (count or len(sources) == 1):
            name, field = source["source"], source["text_field"]
            where = (
                "its entry in corpus.sources (or drop it)" if config.sources else "corpus.source"
            )
            raise EmptyCorpusError(
                f"Corpus source '{name}' gave no complete sequence of {config.ctx_len} "
                f"tokens ({len(documents)} documents). Fix: point {where} at a file with text"
                f"{f' in field {field!r}' if name.endswith(('.jsonl', '.parquet')) else ''}"
                ", or lower corpus.ctx_len."
            )
        pools.append(pool)
    if not any(len(pool) for pool in pools):  # a mixture asked for less than one sequence
        raise EmptyCorpusError(
            f"corpus.n_tokens = {config.n_tokens} is less than one sequence of corpus.ctx_len = "
            f"{config.ctx_len} tokens. Fix: raise corpus.n_tokens."
        )
    tokens = interleave(pools, config.seed)
    content_hash = hashlib.sha256(tokens.tobytes() + str(tokens.shape).encode()).hexdigest()[:16]
    meta = {
        "hash": content_hash,
        "source": " + ".join(f"{s['source']} ({s['weight']:g})" for s in config.sources)
        or config.source,
        "ctx_len": config.ctx_len,
        "n_sequences": int(tokens.shape[0]),
        "n_tokens": int(tokens.size),
        "add_bos": config.add_bos,
        "seed": config.seed,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "special_ids": special_token_ids(tokenizer),
    }
    if config.sources:
        meta["sources"] = [
            {**source, "sequences": len(pool), "tokens": int(pool.size)}
            for source, pool in zip(sources, pools, strict=True)
        ]
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
            **({"sources": MetadataValue.json(meta["sources"])} if "sources" in meta else {}),
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
