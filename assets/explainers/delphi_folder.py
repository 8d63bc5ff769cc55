"""delphi's explanations, read from a delphi run folder instead of asked of an LLM (`autointerp import delphi`
runs `explanations` with it), so that imported explanations are materialized, versioned and re-scored like any
other. delphi writes `<folder>/explanations/<module>_latent<N>.txt`, each a JSON string."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from pydantic import Field

from assets.explainers.base import Explainer, ExplainerDeps, ExplainerSettings
from assets.records import LatentRecord

DELPHI_FILE = re.compile(r"^(?P<module>.+)_latent(?P<latent>\d+)\.txt$")
"""delphi's name of a latent's explanation or score file."""


class DelphiFolderError(ValueError):
    """A folder without a readable delphi explanation of the module; the message names the fix."""


def explanations_dir(folder: Path) -> Path:
    """Where delphi's explanations are: `<folder>/explanations`, or `folder` itself."""
    return folder / "explanations" if (folder / "explanations").is_dir() else folder


def read_delphi_explanations(folder: Path, module: str = "") -> tuple[str, dict[int, str]]:
    """The module (`module`, or the only one the folder holds) and its latent → explanation, from
    `<folder>/explanations/*.txt` (or `<folder>/*.txt`)."""
    base = explanations_dir(Path(folder))
    found: dict[str, dict[int, str]] = {}
    for path in sorted(base.glob("*.txt")):
        match = DELPHI_FILE.match(path.name)
        if not match:
            continue
        text = json.loads(path.read_text())
        if not isinstance(text, str):
            raise DelphiFolderError(
                f"{path} holds {type(text).__name__}, not a JSON string as delphi writes "
                "explanations. Fix: point at delphi's explanations folder."
            )
        found.setdefault(match["module"], {})[int(match["latent"])] = text
    if not found:
        raise DelphiFolderError(
            f"No delphi explanation (<module>_latent<N>.txt) under {base}. "
            "Fix: pass delphi's run folder (the one holding explanations/)."
        )
    if not module:
        if len(found) > 1:
            raise DelphiFolderError(
                f"{base} holds explanations of several modules ({', '.join(sorted(found))}). "
                "Fix: pick one with --module."
            )
        module = next(iter(found))
    if module not in found:
        raise DelphiFolderError(
            f"No explanation of module {module!r} under {base}; "
            f"it has {', '.join(sorted(found))}. Fix: --module with one of those."
        )
    return module, found[module]


class DelphiFolderSettings(ExplainerSettings):
    folder: str = Field(
        description="delphi's run folder (holding explanations/) or its explanations folder."
    )
    module: str = Field(
        default="",
        description="delphi's module name in the file names (e.g. model.layers.15); "
        "empty: the only module the folder holds.",
    )
    model: str = Field(default="delphi", description="The explainer model's name to record.")


class DelphiFolder(Explainer):
    name = "delphi"
    description = (
        "delphi's explanations, read from its run folder (`autointerp import delphi`); no LLM."
    )
    Settings = DelphiFolderSettings
    asks_llm = False

    def __init__(self, settings: DelphiFolderSettings, deps: ExplainerDeps):
        super().__init__(settings, deps)
        self.base = explanations_dir(Path(settings.folder))
        self.module, self.texts = read_delphi_explanations(Path(settings.folder), settings.module)

    @property
    def model(self) -> str:
        return self.settings.model

    def files_digest(self) -> str:
        content = json.dumps([self.module, sorted(self.texts.items())])
        return hashlib.sha256(content.encode()).hexdigest()[:10]

    def read(self, record: LatentRecord) -> str:
        text = self.texts.get(record.latent)
        if text is None:
            raise LookupError(
                f"not in the delphi folder: no {self.module}_latent{record.latent}.txt in {self.base}"
            )
        if not text.strip():
            raise LookupError(
                f"the delphi folder's {self.module}_latent{record.latent}.txt is empty"
            )
        return text
