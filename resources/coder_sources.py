"""Registering sparse coders from where they are published: a Hugging Face repo, a SAELens release, a local folder.

A source holds its coders as folders, each in a format `sparse_coders.format_by_names` tells by its file
names: sparsify puts one folder per hookpoint (`layers.3/`), SAELens one per hook
(`blocks.3.hook_resid_post/`), Gemma Scope one per layer, width and L0
(`layer_3/width_16k/average_l0_71/`). A SAELens release name is looked up in SAELens' own directory of
pretrained SAEs (its `pretrained_saes.yaml`), which names the repo and folder of each SAE id.

Downloads go through huggingface_hub into its cache, which reads HF_HOME, HF_ENDPOINT, HF_TOKEN and
HF_HUB_OFFLINE itself. The chosen folder's files are copied into the registry with a `source.json`
naming where they came from and at which commit; the copy is checked by loading it before it appears
under its final name, so the registry sensor never sees half a coder.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from resources.sparse_coders import KNOWN_FORMATS, RegistryError, format_by_names, load_coder_folder

SOURCE_FILE = "source.json"
"""Beside a registered coder's files: where they came from (source, repo, folder, revision, commit)."""


class CoderSourceError(RegistryError):
    """A source, coder id, revision or hub answer that cannot give a coder: the message names it and the fix."""


@dataclass(frozen=True)
class Registered:
    key: str
    width: int
    source: str
    revision: str | None
    commit: str | None
    folder: Path
    new: bool


@dataclass(frozen=True)
class Source:
    """Where coders are read from: `files` are the paths (relative, '/'-separated) the source holds."""

    spec: str
    files: list[str]
    repo: str | None = None
    revision: str | None = None
    commit: str | None = None
    local: Path | None = None
    release: dict | None = None


def register(
    spec: str,
    registry: Path,
    hookpoints: list[str] | None = None,
    name: str | None = None,
    revision: str | None = None,
) -> list[Registered]:
    """Register the coders `hookpoints` names (each `ID` or `ID=HOOKPOINT`: a coder folder of the source,
    or an SAE id of a release) from the source `spec`, under `name` (default: the source's last path
    part). Without `hookpoints`, a source holding one coder registers it."""
    source = open_source(spec, revision)
    chosen = choose(source, hookpoints)
    name = name or default_name(source)
    if "/" in name or not name.strip("."):
        raise CoderSourceError(
            f"--name {name!r} cannot be a registry folder name. Fix: a name without '/', e.g. {default_name(source)!r}."
        )
    targets = {}
    for folder, hookpoint in chosen.items():
        hookpoint = hookpoint or default_hookpoint(source, folder)
        if hookpoint in targets.values():
            raise CoderSourceError(
                f"Two of the chosen coders would be registered as {name}/{hookpoint}. "
                "Fix: register them one at a time, each with its own --name."
            )
        targets[folder] = hookpoint
    return [
        place(source, folder, registry / name / hookpoint, name, hookpoint)
        for folder, hookpoint in targets.items()
    ]


# ---- sources ------------------------------------------------------------------------------------


def open_source(spec: str, revision: str | None) -> Source:
    """A local folder, else a SAELens release, else a hub repo id."""
    local = Path(spec).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CoderSourceError(
                f"{spec} is a file; a coder source is a folder (a coder's own, "
                "or one holding a folder per coder). Fix: name its folder."
            )
        if revision:
            raise CoderSourceError(
                f"--revision {revision} was given for the local folder {spec}, "
                "which has no revisions. Fix: drop --revision."
            )
        files = sorted(
            p.relative_to(local).as_posix()
            for p in local.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(local).parts)
        )
        return Source(spec, files, local=local.resolve())
    release = saelens_release(spec) if "/" not in spec else None
    repo = release["repo_id"] if release else spec
    commit, files = hub_listing(repo, revision, spec)
    return Source(spec, files, repo=repo, revision=revision, commit=commit, release=release)


def saelens_release(name: str) -> dict | None:
    """The entry of SAELens' directory of pretrained SAEs for the release `name` (None when it has none)."""
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        raise CoderSourceError(
            f"{name!r} is not a local folder nor a hub repo id (owner/name); "
            "it could be a SAELens release, but SAELens is not installed. "
            "Fix: pip install 'autointerp[saelens]', or give the repo id (owner/name) "
            "or a local folder."
        )
    return saelens_directory(
        Path(list(spec.submodule_search_locations)[0]) / "pretrained_saes.yaml"
    ).get(name)


@functools.cache
def saelens_directory(path: Path) -> dict:
    """The YAML file SAELens ships, read without importing SAELens (whose import takes seconds); 1.5 MB, read once."""
    import yaml

    with open(path) as handle:
        return yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def hub_listing(repo: str, revision: str | None, spec: str) -> tuple[str, list[str]]:
    """The commit `revision` names and the files of `repo` there; offline (HF_HUB_OFFLINE), the files of
    the cached snapshot, which are all that can be registered then."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    with hub_errors(repo, revision, spec):
        try:
            info = HfApi().model_info(repo, revision=revision)
            return info.sha, sorted(s.rfilename for s in info.siblings or [])
        except OfflineModeIsEnabled:
            pass
        try:
            folder = Path(snapshot_download(repo, revision=revision, local_files_only=True))
        except LocalEntryNotFoundError as error:
            if getattr(error, "snapshot_path", None) is None:
                raise
            folder = Path(
                error.snapshot_path
            )  # a snapshot with some of the repo's files: what is cached is what can be used
        return folder.name, sorted(
            p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
        )


class hub_errors:
    """Turns huggingface_hub's errors into one line naming the repo, the revision and the fix."""

    def __init__(self, repo: str, revision: str | None, spec: str):
        self.repo, self.revision, self.spec = repo, revision, spec

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        from huggingface_hub import constants
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
        from huggingface_hub.utils import get_token

        if error is None or isinstance(error, CoderSourceError):
            return False
        at = f"{self.repo}@{self.revision or 'main'}"
        where = f"the hub at {constants.ENDPOINT}"
        if isinstance(error, HFValidationError):
            raise CoderSourceError(
                f"{self.spec!r} is not a local folder, a SAELens release nor a hub repo id "
                f"({error}). Fix: give an existing folder, a release name from SAELens' "
                "pretrained directory, or owner/name of a Hugging Face repo."
            ) from None
        if isinstance(error, RevisionNotFoundError):
            raise CoderSourceError(
                f"{where} has no revision {self.revision!r} of {self.repo}. "
                "Fix: --revision a branch, tag or commit of the repo."
            ) from None
        if isinstance(error, GatedRepoError):
            raise CoderSourceError(
                f"{self.repo} is gated on {where}: its terms must be accepted, "
                "and the token in HF_TOKEN must belong to an account that did. "
                "Fix: accept them on the repo's page, then set HF_TOKEN."
            ) from None
        if isinstance(error, RepositoryNotFoundError) or (
            isinstance(error, HfHubHTTPError)
            and error.response is not None
            and error.response.status_code in (401, 403)
        ):
            token = (
                "the token in HF_TOKEN (or `hf auth login`) has no access to it"
                if get_token()
                else "no token was sent (HF_TOKEN is not set)"
            )
            raise CoderSourceError(
                f"{where} answered that {self.repo} does not exist or is private ({token}). "
                f"Fix: check the repo id, or set HF_TOKEN to a token that can read it."
            ) from None
        if isinstance(error, LocalEntryNotFoundError):
            raise CoderSourceError(
                f"{at} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and the hub cannot be asked "
                f"({'HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else str(error).splitlines()[0][:200]}). "
                f"Fix: run the same command once online to fill the cache, or point HF_HOME at a cache that holds it."
            ) from None
        if isinstance(error, EntryNotFoundError):
            raise CoderSourceError(
                f"{at} has no file {str(error).splitlines()[-1][:200]}. "
                "Fix: check the coder id against the repo's files."
            ) from None
        if isinstance(error, (OSError, HfHubHTTPError)):
            raise CoderSourceError(
                f"Cannot download {at} from {where} ({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
                f"Fix: check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use what is cached."
            ) from None
        return False


# ---- choosing coders ----------------------------------------------------------------------------


def coder_folders(files: list[str]) -> dict[str, str]:
    """The folders of `files` that hold a coder, and its format."""
    by_folder: dict[str, set[str]] = {}
    for path in files:
        parent, _, file = path.rpartition("/")
        by_folder.setdefault(parent, set()).add(file)
    return {
        folder: found[0]
        for folder, names in sorted(by_folder.items())
        if (found := format_by_names(names)) is not None
    }


def choose(source: Source, hookpoints: list[str] | None) -> dict[str, str | None]:
    """The coder folders to register, each with the hookpoint asked for (None: the default)."""
    from huggingface_hub import constants

    folders = coder_folders(source.files)
    ids = (
        {sae["id"]: str(sae["path"]) for sae in source.release["saes"]}
        if source.release
        else {(f or "."): f for f in folders}
    )
    listed = ", ".join(list(ids)[:20]) + (f" … ({len(ids)} in all)" if len(ids) > 20 else "")
    cached = (
        " (HF_HUB_OFFLINE is set: only the cached files are listed)"
        if source.repo and constants.HF_HUB_OFFLINE
        else ""
    )
    if not folders:
        held = ", ".join(source.files[:20]) or "no files"
        raise CoderSourceError(
            f"{where(source)} holds no sparse coder in a known layout ({KNOWN_FORMATS}, "
            f"in the source's top folder or one folder per coder); it holds {held}. "
            "Fix: name a source that holds one, or copy the coder into the registry by hand "
            "(README: Registering coders)."
        )
    if not hookpoints:
        if len(ids) == 1 and not source.release:
            return {next(iter(ids.values())): None}
        raise CoderSourceError(
            f"{where(source)} holds {len(ids)} coders: {listed}. "
            "Fix: choose with --hookpoints ID [ID ...] (ID=HOOKPOINT to name its module)."
        )
    chosen = {}
    for asked in hookpoints:
        coder_id, _, hookpoint = asked.partition("=")
        if coder_id not in ids:
            raise CoderSourceError(
                f"{coder_id!r} is not a coder "
                f"{'id of the release' if source.release else 'folder'} of "
                f"{where(source)}{cached}. Its coders: {listed}. Fix: pick one of them."
            )
        folder = ids[coder_id].strip("/")
        if folder not in folders:
            have = sorted(f for f in source.files if f.startswith(f"{folder}/")) or "no files"
            raise CoderSourceError(
                f"{where(source)} has no coder in a known layout ({KNOWN_FORMATS}) "
                f"at {folder or 'its top folder'}{cached}; it holds {have}. "
                "Fix: check the folder, or register the coder from a local copy."
            )
        if source.release:
            check_release_sae(source, coder_id, folders[folder])
        chosen[folder] = hookpoint or None
    return chosen


def check_release_sae(source: Source, sae_id: str, fmt: str) -> None:
    """Refuse a release SAE that SAELens itself would transform on loading (a conversion of files that look
    like its own layout, or a scaling of the input), since reading its files as they are would encode wrongly."""
    entry = next(sae for sae in source.release["saes"] if sae["id"] == sae_id)
    conversion = source.release.get("conversion_func")
    if "norm_scaling_factor" in entry:
        raise CoderSourceError(
            f"The SAE {sae_id!r} of the release {source.spec} needs its input scaled by "
            f"{entry['norm_scaling_factor']} (SAELens does it on loading), "
            "which autointerp does not support yet. Fix: choose an SAE without input scaling."
        )
    if conversion and fmt == "saelens":
        raise CoderSourceError(
            f"SAELens converts the files of the release {source.spec} with {conversion!r}; "
            "read as they are, they would encode wrongly. Fix: load the SAE with SAELens "
            "(SAE.from_pretrained), save_model() it to a folder, and register that folder."
        )


def where(source: Source) -> str:
    if source.local:
        return str(source.local)
    return f"{source.repo}@{source.revision or 'main'}" + (
        f" (SAELens release {source.spec})" if source.release else ""
    )


def default_name(source: Source) -> str:
    return source.spec if source.release else PurePosixPath(source.repo or str(source.local)).name


TRANSFORMERLENS_RESIDUAL = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)")


def default_hookpoint(source: Source, folder: str) -> str:
    """The subject model's module whose output the coder reads, where the source's names tell it: a sparsify
    folder is named after it; a TransformerLens residual hook (SAELens) is the output of a decoder layer, named
    relative to the base model (`layers.N`); so is a Gemma Scope residual SAE's `layer_N`."""
    coder_id = sae_id_of(source, folder) or folder or "."
    fix = (
        f"Fix: name the module with --hookpoints '{coder_id}=MODULE' (e.g. "
        f"{coder_id}=model.layers.3 for a residual SAE after layer 3)."
    )
    fmt = coder_folders(source.files)[folder]
    if fmt == "sparsify" and folder:
        return PurePosixPath(folder).name
    if fmt == "saelens":
        hook = sae_id_of(source, folder) or PurePosixPath(folder).name or "."
        if (match := TRANSFORMERLENS_RESIDUAL.fullmatch(hook)) is not None:
            layer = int(match.group(1)) - (match.group(2) == "pre")
            if layer >= 0:
                return f"layers.{layer}"
        raise CoderSourceError(
            f"The SAELens coder {hook!r} of {where(source)} reads a TransformerLens hook with no "
            f"default module of the subject model. {fix}"
        )
    if (
        fmt == "gemmascope"
        and "-res" in (source.repo or "")
        and (match := re.match(r"layer_(\d+)/", folder))
    ):
        return f"layers.{match.group(1)}"
    raise CoderSourceError(
        f"The {fmt} coder at {folder or 'the top folder'} of {where(source)} does not say which "
        f"module of the subject model it reads. {fix}"
    )


def sae_id_of(source: Source, folder: str) -> str | None:
    if not source.release:
        return None
    return next(
        (sae["id"] for sae in source.release["saes"] if str(sae["path"]).strip("/") == folder), None
    )


# ---- placing ------------------------------------------------------------------------------------


def place(source: Source, folder: str, target: Path, name: str, hookpoint: str) -> Registered:
    """Copy the coder's files into `target` (through a hidden staging folder, checked by loading it), or
    find it already there from the same source and commit."""
    files = [f for f in source.files if f.rpartition("/")[0] == folder]
    provenance = {
        "source": source.spec,
        "repo": source.repo,
        "folder": folder,
        "revision": source.revision,
        "commit": source.commit,
        "local": str(source.local) if source.local else None,
        "sae_id": sae_id_of(source, folder),
    }
    if target.exists():
        recorded = (
            json.loads((target / SOURCE_FILE).read_text())
            if (target / SOURCE_FILE).exists()
            else {}
        )
        if recorded == provenance and any(target.iterdir()):
            return Registered(
                f"{name}/{hookpoint}",
                load_coder_folder(target, name, hookpoint).width,
                source.spec,
                source.revision,
                source.commit,
                target,
                new=False,
            )
        was = (
            f"from {recorded.get('source')}@{recorded.get('commit') or recorded.get('local')}"
            if recorded
            else "by hand"
        )
        raise CoderSourceError(
            f"{name}/{hookpoint} is already registered ({was}) at {target}. "
            f"Fix: choose another --name, or delete {target} first "
            "(results already made for it stay under its old key)."
        )
    base = source.local or download(source, files)
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent.parent, prefix=".incoming-"))
    try:
        for file in files:
            shutil.copy2(base / file, staging / PurePosixPath(file).name)
        (staging / SOURCE_FILE).write_text(json.dumps(provenance, indent=2))
        coder = load_coder_folder(staging, name, hookpoint)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Registered(
        coder.key, coder.width, source.spec, source.revision, source.commit, target, new=True
    )


def download(source: Source, files: list[str]) -> Path:
    """The snapshot folder of the source's commit holding `files`, downloaded into the hub cache. Asked by the
    revision's name, so that the cache records which commit it names (for offline runs later)."""
    from huggingface_hub import snapshot_download

    with hub_errors(source.repo, source.revision, source.spec):
        folder = Path(
            snapshot_download(source.repo, revision=source.revision, allow_patterns=files)
        )
    if folder.name != source.commit:
        raise CoderSourceError(
            f"{where(source)} moved from commit {source.commit} to {folder.name} while "
            "registering. Fix: run again, or pin --revision to a commit."
        )
    return folder
