"""The cluster tests' network (`tests/cluster/services.py`) lives in namespaces the tests make: the services in one,
each node in its own, joined by veth pairs inside them. This machine's own network gets no address, route or link,
and every service asks for a password."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest

from tests.cluster.conftest import failing_where_missing
from tests.cluster.services import (
    ClusterNetwork,
    cluster_network,
    joined,
    postgres_server,
    redis_server,
)
from tests.conftest import root_network
from tests.scripted_llm_server import ScriptedLLMServer

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"
)

ON_A_NODE = """
import json, socket, sys, urllib.request
import psycopg
postgres, redis, llm = sys.argv[1:]
found = {}
with psycopg.connect(postgres, connect_timeout=5) as db:
    found["postgres"] = db.execute("SELECT 1").fetchone()[0]
try:
    psycopg.connect(postgres.replace(postgres.split(":")[2].split("@")[0], "wrong"), connect_timeout=5).close()
    found["postgres_wrong_password"] = "accepted"
except psycopg.OperationalError as refused:
    found["postgres_wrong_password"] = "password authentication failed" in str(refused)
host, port = redis.rsplit("@", 1)[1].split("/")[0].split(":")
with socket.create_connection((host, int(port)), timeout=5) as r:
    r.sendall(b"PING\\r\\n")
    found["redis_without_password"] = r.recv(200).decode().strip()
found["llm"] = json.load(urllib.request.urlopen(llm + "/models", timeout=5))["object"]
print(json.dumps(found))
"""


def test_the_services_and_nodes_live_in_namespaces_of_the_test_and_ask_for_passwords():
    before = root_network()
    with contextlib.ExitStack() as stack:
        network = stack.enter_context(failing_where_missing(cluster_network(2)))
        postgres = stack.enter_context(failing_where_missing(postgres_server(network.services)))
        redis = stack.enter_context(failing_where_missing(redis_server(network.services)))
        with joined(network.services):
            server = ScriptedLLMServer(lambda messages: "ok", host="10.231.255.1")
        stack.enter_context(server)
        assert root_network() == before  # while everything runs: nothing was added here
        for restarted, node in enumerate(network.nodes):
            # the faults of bench/cluster_faults.py: the same servers again, on the same data and
            # addresses
            if restarted:
                postgres.daemon.restart()
                redis.daemon.restart()
            done = subprocess.run(
                [
                    *ClusterNetwork.prefix(node),
                    sys.executable,
                    "-c",
                    ON_A_NODE,
                    postgres.nodes_url,
                    redis.nodes_url,
                    server.base_url,
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            assert json.loads(done.stdout) == {
                "postgres": 1,
                "postgres_wrong_password": True,
                "redis_without_password": "-NOAUTH Authentication required.",
                "llm": "list",
            }
    assert root_network() == before
