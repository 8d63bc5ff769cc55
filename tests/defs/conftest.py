"""Fixtures of the latent browser's tests: one materialized demo partition per session, and the
viewer serving it (both the API tests and the browser tests use them)."""
import threading

import pytest

from tests.materialized_partition import build


@pytest.fixture(scope="session")
def partition(tmp_path_factory, tiny_sae):
    return build(tmp_path_factory.mktemp("materialized"), tiny_sae)


@pytest.fixture(scope="module")
def server(partition):
    from autointerp_defs.readside.server import make_server

    httpd = make_server(str(partition.root), port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()
