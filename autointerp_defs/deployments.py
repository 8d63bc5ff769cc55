"""The one place that reads configuration: a deployment is one TOML file, `deployments/<name>.toml`
(local, remote, gpu) or any path, chosen by `$AUTOINTERP_DEPLOYMENT` (default `local`).

Nothing else in the code base reads `os.environ`: the API key is named here (`[llm] api_key_env`)
and read through Dagster's `EnvVar` when a run makes its client. What defines results goes into
code versions: the stage tables ([corpus], [exemplars], [explanations], [scorers.<name>]) and the
models (`Models`: subject model, explainer, judge, embedder). Everything else in the resource tables
(endpoint URL, key variable, concurrency, timeouts, devices, batch sizes, data root) is an
operational knob that re-runs nothing. A missing or bad value stops here with a message naming the
key and the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import tomllib
from pydantic import ValidationError

from assets.explainers import explainer_classes
from assets.scorers import scorer_classes, scorer_settings
from assets.stage_config import problems
from resources.embedder import EmbedderResource
from resources.llm import ROLES, LLMResource
from resources.settings import AutointerpSettings
from resources.subject_model import SubjectModelResource

DEPLOYMENTS_DIR = Path(__file__).resolve().parent.parent / "deployments"
SELECTOR = "AUTOINTERP_DEPLOYMENT"
RESOURCE_TABLES = {
    "settings": AutointerpSettings,
    "subject_model": SubjectModelResource,
    "llm": LLMResource,
    "embedder": EmbedderResource,
}
STAGE_TABLES = ("corpus", "exemplars", "explanations", "scorers")
TOP_LEVEL = {"automated_scorers", "plugins", "cluster", *RESOURCE_TABLES, *STAGE_TABLES}


class DeploymentError(ValueError):
    """A deployment file that cannot be used; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Deployment:
    path: Path
    values: dict
    scorers: dict = field(default_factory=dict)
    """Scorer plugins by name (built-ins and the file's `plugins`)."""
    explainers: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem

    def stage(self, name: str) -> dict:
        return dict(self.values.get(name, {}))

    @property
    def automated_scorers(self) -> tuple[str, ...]:
        return tuple(self.values.get("automated_scorers", ()))

    def setting(self, name: str):
        """`[settings] name` of this deployment, else the settings resource's default."""
        return self.values.get("settings", {}).get(name, getattr(AutointerpSettings(), name))

    @property
    def data_dir(self) -> str:
        return self.setting("data_dir")

    @property
    def latents_per_shard(self) -> int:
        return int(self.setting("latents_per_shard"))

    @property
    def partitions_per_run(self) -> int:
        return int(self.setting("partitions_per_run"))

    @property
    def sensor_interval_s(self) -> int:
        return int(self.setting("sensor_interval_s"))

    @property
    def cluster(self) -> dict | None:
        """`[cluster]`: present when the steps run on dagster-celery workers (README: Scale out)."""
        return self.values.get("cluster")

    @property
    def broker_env(self) -> str:
        """The variable that holds the cluster's Redis URL (broker and result backend) on each node."""
        return (self.cluster or {}).get("broker_env", "AUTOINTERP_BROKER_URL")

    @property
    def redeliver_after_s(self) -> int:
        """How long after a worker took a step Redis gives it to another worker if it was never acknowledged
        (its worker was lost whole): longer than the longest step, or a step still running is sent twice."""
        return int((self.cluster or {}).get("redeliver_after_s", 6 * 3600))

    def broker_url(self) -> str:
        """The broker's address from this node's environment."""
        if not (url := os.environ.get(self.broker_env)):
            raise self.fail(
                f"[cluster] broker_env names {self.broker_env}, which is not set. "
                f"Fix: export {self.broker_env}=redis://<host>:6379/0 on this node."
            )
        return url

    def fail(self, problem: str) -> DeploymentError:
        return DeploymentError(f"{self.path}: {problem}")

    def scorer_settings(self) -> dict:
        try:
            return scorer_settings(self.values.get("scorers", {}), self.scorers)
        except ValueError as error:
            raise self.fail(str(error)) from None

    def resources(self) -> dict:
        """One resource per resource table, each checked now."""
        built = {}
        for key, resource in RESOURCE_TABLES.items():
            values = dict(self.values.get(key, {}))
            if key == "llm":
                values = self._llm_values(values)
            try:
                built[key] = resource(**values)
            except ValidationError as error:
                raise self.fail(
                    f"{problems(error, key)}. Fix: give each key a value of its type "
                    "(see the README's configuration section)."
                ) from None
            except TypeError as error:
                raise self.fail(f"[{key}]: {error}") from None
        return built

    def _llm_values(self, values: dict) -> dict:
        """`[llm]` with its role tables (`[llm.explainer]`, `[llm.judge]`), each checked now; the errors name
        where the user sets the key and the model. The key's variable is read when a run makes its client,
        so setting it after the definitions loaded works, and its value is never part of the definitions."""
        values = self._llm_role_values(values, "llm", values)
        for role in ROLES:
            if role in values:
                table = f"llm.{role}"
                if not isinstance(values[role], dict):
                    raise self.fail(
                        f"[{table}] must be a table of [llm] settings. "
                        f"Fix: write it as [{table}] with keys such as model."
                    )
                overrides = self._llm_role_values(
                    dict(values[role]), table, {**values, **values[role]}
                )
                if unknown := set(overrides) - set(LLMResource.model_fields) | set(overrides) & set(
                    ROLES
                ):
                    raise self.fail(
                        f"[{table}] has unknown key(s) {sorted(unknown)}. "
                        "Fix: use [llm] settings only: "
                        f"{sorted(set(LLMResource.model_fields) - set(ROLES))}."
                    )
                try:
                    LLMResource(
                        **{
                            **{key: value for key, value in values.items() if key not in ROLES},
                            **overrides,
                        }
                    )
                except ValidationError as error:
                    raise self.fail(
                        f"{problems(error, table)}. Fix: give each key a value of its type."
                    ) from None
                values[role] = overrides
        return values

    def _llm_role_values(self, values: dict, table: str, effective: dict) -> dict:
        """Where the user sets a role's key and model (named in errors), for the table that sets them."""
        if effective.get("backend", "embedded") == "openai":
            if "model" in values or table == "llm":
                values.setdefault("model_setting", f"[{table}] model in {self.path}")
            if "api_key_env" in values:
                values.setdefault(
                    "key_setting",
                    f"the environment variable {values['api_key_env']} (named by [{table}] api_key_env in {self.path})",
                )
        return values


def deployment_path(selected: str | None = None) -> Path:
    """`selected`, else `$AUTOINTERP_DEPLOYMENT`, else `local`: a name in deployments/ or a path to a TOML file."""
    chosen = selected or os.environ.get(SELECTOR) or "local"
    path = Path(chosen).expanduser()
    if path.suffix != ".toml":
        path = DEPLOYMENTS_DIR / f"{chosen}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in DEPLOYMENTS_DIR.glob("*.toml"))
        raise DeploymentError(
            f"{SELECTOR}={chosen!r}: no deployment file {path}. Fix: use one of {known} or the path of a .toml file."
        )
    return path


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = (
            _merge(merged[key], value)
            if isinstance(value, dict) and isinstance(merged.get(key), dict)
            else value
        )
    return merged


def _missing(values: dict, where: str = "") -> list[str]:
    """Keys whose value is the empty string: a required value the file leaves to the user."""
    found = []
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if isinstance(value, dict):
            found += _missing(value, name)
        elif value == "":
            found.append(name)
    return found


def select_for_this_process(deployment: Deployment) -> None:
    """Make `deployment` the one this process and its children build definitions from (`$AUTOINTERP_DEPLOYMENT`):
    a worker's steps rebuild them from the environment, so `--deployment` must reach it."""
    os.environ[SELECTOR] = str(deployment.path)


def load_deployment(selected: str | None = None, overrides: dict | None = None) -> Deployment:
    """The deployment file, with `overrides` (same layout, e.g. {"settings": {"data_dir": ...}}) on top."""
    path = deployment_path(selected)
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise DeploymentError(f"{path}: cannot be read: {error}. Fix: write valid TOML.") from None
    values = _merge(values, overrides or {})
    deployment = Deployment(path, values)
    if unknown := set(values) - TOP_LEVEL:
        raise deployment.fail(
            f"unknown key(s) {sorted(unknown)}. Fix: use only {sorted(TOP_LEVEL)}."
        )
    if missing := _missing(values):
        raise deployment.fail(
            f"{', '.join(missing)} must be set (it is empty). Fix: give it a value in the file."
        )
    plugins = tuple(values.get("plugins", ()))
    try:
        deployment = Deployment(path, values, scorer_classes(plugins), explainer_classes(plugins))
    except ValueError as error:
        raise deployment.fail(str(error)) from None
    if unknown := set(deployment.automated_scorers) - set(deployment.scorers):
        raise deployment.fail(
            f"automated_scorers names unknown scorer(s) {sorted(unknown)}. "
            f"Fix: use any of {sorted(deployment.scorers)}."
        )
    return deployment


def see_only_gpu(index: int) -> None:
    """Make GPU `index` the only one this process and its children see (`CUDA_VISIBLE_DEVICES`): a gpu worker's."""
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index)


def dagster_home() -> Path | None:
    """Dagster's own instance directory variable, `$DAGSTER_HOME` (read here so no other module
    reads the environment)."""
    home = os.environ.get("DAGSTER_HOME")
    return Path(home) if home else None


def is_set(variable: str) -> bool:
    """Whether an environment variable that Dagster itself reads (e.g. the cluster's PostgreSQL URL) is set here."""
    return bool(os.environ.get(variable))
