"""`autointerp ui`: the Dagster UI and daemon over one code server, as `dagster dev` runs them.

`dagster dev` prints that it is superseded by `dg dev`, and `dg` (`dagster-dg-cli`) has no release
for the Dagster installed here. So this starts Dagster's own service commands, the ones a
deployment runs: `dagster code-server start` (loads `autointerp_defs` once), then
`dagster-webserver` and `dagster-daemon run` on a workspace that points at it. Ctrl-C (SIGINT, which
the terminal sends to all of them) or SIGTERM stops the three and waits for them, so nothing is
left behind. After a Ctrl-C the services, which got it too, are given time to stop on their own
before they are signalled again: a second SIGINT during a service's shutdown interrupts it midway.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from autointerp_defs.deployments import dagster_home

STOP_TIMEOUT_S = 60
GROUP_SIGINT_GRACE_S = 30
"""How long services that got the terminal's Ctrl-C themselves may take to stop before they are sent one."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(host: str = "127.0.0.1", port: int = 3000, startup_timeout_s: int = 300) -> int:
    """Run until interrupted or until a service exits; returns the exit status."""
    home = dagster_home() or sys.exit(
        "DAGSTER_HOME is not set. Fix: use `make ui`, or export DAGSTER_HOME=<instance dir>."
    )
    bin_dir = Path(sys.executable).parent
    code_port = free_port()
    workspace = home / "workspace.yaml"
    workspace.write_text(
        f"load_from:\n  - grpc_server:\n      host: 127.0.0.1\n      port: {code_port}\n"
        "      location_name: autointerp_defs\n"
    )
    stopping = []  # the signals received
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda received, _: stopping.append(received))
    services = [
        subprocess.Popen(
            [
                str(bin_dir / "dagster"),
                "code-server",
                "start",
                "-m",
                "autointerp_defs",
                "-h",
                "127.0.0.1",
                "-p",
                str(code_port),
                "--location-name",
                "autointerp_defs",
                "--startup-timeout",
                str(startup_timeout_s),
            ]
        )
    ]
    try:
        deadline = time.time() + startup_timeout_s
        while not stopping and services[0].poll() is None and time.time() < deadline:
            check = [str(bin_dir / "dagster"), "api", "grpc-health-check", "-p", str(code_port)]
            if subprocess.run(check, capture_output=True).returncode == 0:
                break
            time.sleep(
                2
            )  # each check is a short Python process: do not crowd the code server loading
        if not stopping and services[0].poll() is None:
            services.append(
                subprocess.Popen(
                    [
                        str(bin_dir / "dagster-webserver"),
                        "-w",
                        str(workspace),
                        "-h",
                        host,
                        "-p",
                        str(port),
                    ]
                )
            )
            services.append(
                subprocess.Popen([str(bin_dir / "dagster-daemon"), "run", "-w", str(workspace)])
            )
            print(f"Serving the Dagster UI on http://{host}:{port} (Ctrl-C stops it)", flush=True)
        while not stopping and all(s.poll() is None for s in services):
            time.sleep(0.5)
    finally:
        if stopping and stopping[0] == signal.SIGINT:
            grace = time.time() + GROUP_SIGINT_GRACE_S
            while any(s.poll() is None for s in services) and time.time() < grace:
                time.sleep(0.2)
        for service in reversed(services):
            if service.poll() is None:
                service.send_signal(signal.SIGINT)
        deadline = time.time() + STOP_TIMEOUT_S
        for service in services:
            try:
                service.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait()
    return 0 if stopping else max(abs(s.returncode or 0) for s in services)
