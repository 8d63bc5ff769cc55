"""The `delphi` explainer reads a delphi run's explanations instead of asking an LLM; what it read is part of the
explanations' code version, so a changed text makes them, and the scores below, stale."""

import json
from types import SimpleNamespace

import pytest
from dagster import AssetKey

from assets.explainers import EXPLAINERS, ExplainerDeps
from assets.explanations import ExplanationsConfig, explanations_asset, make_explainer, read_latent
from assets.stage_config import NO_MODELS, Models
from storage.tables import TABLES


def delphi_run(tmp_path, texts: dict[int, str], module: str = "model.layers.3"):
    """A delphi run folder holding `texts` as delphi writes them."""
    folder = tmp_path / "run" / "explanations"
    folder.mkdir(parents=True, exist_ok=True)
    for latent, text in texts.items():
        (folder / f"{module}_latent{latent}.txt").write_text(json.dumps(text))
    return folder.parent


def code_version(folder, models: Models = NO_MODELS, **settings) -> str:
    defaults = {"explainer": "delphi", "explainer_settings": {"folder": str(folder), **settings}}
    return explanations_asset(defaults, models=models).code_versions_by_key[
        AssetKey("explanations")
    ]


def test_the_folders_texts_and_not_the_explainer_model_are_in_the_code_version(tmp_path):
    folder = delphi_run(tmp_path, {3: "commas", 5: "digits"})
    before = code_version(folder)
    delphi_run(tmp_path, {3: "commas"})  # written again, the same text
    assert code_version(folder) == before
    delphi_run(tmp_path, {3: "commas before a conjunction"})
    assert code_version(folder) != before
    assert code_version(folder, Models(explainer="a")) == code_version(
        folder, Models(explainer="b")
    )  # no LLM explains
    assert code_version(folder, model="delphi-run") != code_version(folder)


def test_a_latent_is_its_files_text_or_fails_saying_why(tmp_path):
    folder = delphi_run(tmp_path, {3: "commas", 4: " "})
    config = ExplanationsConfig(
        explainer="delphi", explainer_settings={"folder": str(folder), "model": "delphi-run"}
    )
    explainer = make_explainer(config, EXPLAINERS, ExplainerDeps(llm=None))
    ok = read_latent(explainer, SimpleNamespace(latent=3))
    assert set(ok) == set(
        TABLES["explanations"].columns[:-1]
    )  # a row of the table, less the fingerprint
    assert (ok["explanation"], ok["status"], ok["explainer"], ok["model"], ok["candidates"]) == (
        "commas",
        "ok",
        "delphi",
        "delphi-run",
        ["commas"],
    )
    missing = read_latent(explainer, SimpleNamespace(latent=7))
    assert (missing["status"], missing["explanation"], missing["error"]) == (
        "failed",
        "",
        f"not in the delphi folder: no model.layers.3_latent7.txt in {folder / 'explanations'}",
    )
    empty = read_latent(explainer, SimpleNamespace(latent=4))
    assert empty["status"] == "failed" and empty["error"].endswith(
        "model.layers.3_latent4.txt is empty"
    )


def test_a_folder_it_cannot_read_or_an_llm_option_stops_the_definitions_naming_the_fix(tmp_path):
    with pytest.raises(
        ValueError, match=r"No delphi explanation \(<module>_latent<N>\.txt\) under .*Fix"
    ):
        code_version(tmp_path)
    with pytest.raises(ValueError, match=r"folder = .*Field required"):
        explanations_asset({"explainer": "delphi"})
    folder = delphi_run(tmp_path, {3: "commas"})
    delphi_run(tmp_path, {3: "digits"}, module="model.layers.4")
    with pytest.raises(
        ValueError, match=r"several modules \(model.layers.3, model.layers.4\)\. Fix"
    ):
        code_version(folder)
    assert code_version(folder, module="model.layers.3") != code_version(
        folder, module="model.layers.4"
    )
    with pytest.raises(ValueError, match=r"No explanation of module 'model.layers.9'.*Fix"):
        code_version(folder, module="model.layers.9")
    (folder / "explanations" / "model.layers.3_latent8.txt").write_text(json.dumps(["a", "list"]))
    with pytest.raises(ValueError, match=r"holds list, not a JSON string .*Fix"):
        code_version(folder, module="model.layers.3")
    with pytest.raises(
        ValueError,
        match=r"asks no LLM: best_of_n, refine_rounds, senses and stability_latents .*Fix",
    ):
        explanations_asset(
            {"explainer": "delphi", "explainer_settings": {"folder": str(folder)}, "best_of_n": 2}
        )
