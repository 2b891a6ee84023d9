"""A real multi-node Ray cluster on this machine, for tests: each node is a `ray start --block` process group.

Nodes listen on 127.0.0.1 with token authentication (the token in the cluster's
own file), and every port that has a fixed default gets a free one, since the test
session's own Ray instance holds the defaults. Each node runs in its own process
group, so a test can lose one node alone (SIGKILL to its group) and stop the
cluster without `ray stop` (which would also stop the session's Ray instance).

    nodes = RayNodes(Path("/tmp/short"))   # short: Ray's socket paths must stay < 108 chars
    nodes.start("head", num_cpus=2)
    subprocess.run([...], env=nodes.env)   # drivers reach it through RAY_ADDRESS and the token
    nodes.start("second", num_cpus=1); nodes.lose("second"); nodes.stop()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


class RayNodes:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "token").write_text(uuid.uuid4().hex)
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(tmp / "token"), "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        # A lost node is declared dead after ~3 s instead of Ray's default ~15 s.
        self.env.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
        self.nodes: dict[str, subprocess.Popen] = {}
        self.gcs = self.dashboard = None
        self._worker_ports = 20000 + os.getpid() % 40 * 250  # below the kernel's ephemeral range

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs}"

    def start(self, name: str, num_cpus: float, resources: str | None = None, dashboard: bool = False) -> None:
        """Start a node (the first one is the head) and wait until it has joined."""
        agent_http, agent_grpc, metrics, runtime_env, node_manager, object_manager = free_ports(6)
        low, self._worker_ports = self._worker_ports, self._worker_ports + 60
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
               f"--min-worker-port={low}", f"--max-worker-port={low + 59}",
               f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
               "--disable-usage-stats"]
        if self.gcs is None:
            self.gcs, client = free_ports(2)
            cmd += ["--head", f"--port={self.gcs}", f"--ray-client-server-port={client}", f"--temp-dir={self.tmp / 'r'}"]
            if dashboard:
                self.dashboard = free_port()
                cmd += ["--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}"]
            else:
                cmd += ["--include-dashboard=false"]
        else:
            cmd += [f"--address={self.address}"]
        if resources:
            cmd.append(f"--resources={resources}")
        log = self.tmp / f"node-{name}.log"
        proc = subprocess.Popen(cmd, env=self.env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.nodes[name] = proc
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray node {name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        if dashboard:
            self._wait_for_dashboard(proc, log)

    def _wait_for_dashboard(self, proc: subprocess.Popen, log: Path) -> None:
        for _ in range(120):  # ~2 min, then job submission's own retries take over
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.dashboard}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:
                return  # it answers (401 without the token): it is up
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(log.read_text()[-3000:]) from None
                time.sleep(1)

    def lose(self, name: str) -> None:
        """The node and everything on it die at once, as when a machine goes away."""
        proc = self.nodes.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        """Every node goes at once (SIGKILL: a test cluster has nothing to save), then any process left
        with the cluster's temp folder on its command line (workers that outlived their raylet)."""
        for name in list(self.nodes):
            self.lose(name)
        subprocess.run(["pkill", "-9", "-f", str(self.tmp / "r")], check=False)
