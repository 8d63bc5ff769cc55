"""Long-lived clients live in resources: one engine per process and settings, shared by every
resource instance and run; what a run opens (the response cache) is closed when the run ends."""

import sqlite3

from dagster import AssetExecutionContext, asset, materialize

from resources.embedder import EmbedderResource
from resources.engines import close_engines, engine
from resources.llm import LLMResource
from storage.layout import DataRoot
from tests.conftest import open_engines


def test_a_run_closes_the_response_cache_it_opened(tmp_path):
    opened = []

    @asset
    def asks(context: AssetExecutionContext, llm: LLMResource) -> None:
        opened.append(llm.client(DataRoot(tmp_path)).cache)

    assert materialize([asks], resources={"llm": LLMResource()}).success
    assert opened[0] is not None and (tmp_path / "llm_cache" / "responses.sqlite").exists()
    try:
        opened[0]._db.execute("SELECT 1")
        still_open = True
    except sqlite3.ProgrammingError:
        still_open = False
    assert not still_open


def test_two_resources_and_two_runs_share_one_embedder_engine():
    models = []

    @asset
    def embeds(embedder: EmbedderResource) -> None:
        embedder.embed(["a sentence"])
        models.append([key for key in open_engines() if key[0] == "embedder"])

    for _ in range(2):
        assert materialize([embeds], resources={"embedder": EmbedderResource()}).success
    assert models[0] == models[1] and len(models[0]) == 1


def test_closing_the_engines_closes_each_once():
    class Engine:
        closed = 0

        def close(self):
            Engine.closed += 1

    first = engine("test-kind", ("x",), Engine)
    assert engine("test-kind", ("x",), Engine) is first  # built once
    assert close_engines("test-kind") == 1 and Engine.closed == 1
    assert all(key[0] != "test-kind" for key in open_engines())
