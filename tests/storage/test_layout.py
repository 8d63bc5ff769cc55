"""The layout keeps the LLM's files where earlier runs left them: a moved path would orphan every
cached answer, and runs of the old and new code would each hold the endpoint's whole limit."""

from pathlib import Path

from storage.layout import DataRoot, response_cache_file


def test_the_response_cache_is_llm_cache_responses_sqlite(tmp_path):
    assert DataRoot(tmp_path).response_cache_path == tmp_path / "llm_cache" / "responses.sqlite"
    assert response_cache_file(Path("/elsewhere")) == Path("/elsewhere/responses.sqlite")


def test_an_endpoints_slots_are_a_folder_named_by_the_hash_of_its_model_id(tmp_path):
    root = DataRoot(tmp_path)
    folder = root.endpoint_slots_dir("openai|http://127.0.0.1:8000/v1|m|json_schema")
    assert folder == tmp_path / "llm_cache" / "slots" / "80a99ad3dd37c64f"
    assert root.endpoint_slots_dir("openai|http://127.0.0.1:8000/v1|other|json_schema") != folder
