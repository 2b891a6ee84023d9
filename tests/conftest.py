"""Shared fixtures: one local Ray instance for the whole session (2 CPUs, no dashboard), real tokenizer folders."""

import os
import signal
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
# MLflow tracking is on by default; the suite's throw-away runs skip it (importing mlflow costs seconds per
# process) and the tests of tracking turn it on with tracking.enabled=true (an explicit setting wins).
os.environ.setdefault("RAYPACK_TRACKING", "0")
# What a test session may add to the repo: the default output_dir and Python's and pytest's caches.
MAY_APPEAR = ("out/", ".pytest_cache/", ".hypothesis/")


def _untracked(repo: Path) -> set[str]:
    """Untracked and ignored paths under the repo (folders as one entry), without caches that may come and go."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=normal"], cwd=repo,
                         capture_output=True, text=True, check=True).stdout
    return {line[3:] for line in out.splitlines() if line[:2] in ("??", "!!") and "__pycache__" not in line}


@pytest.fixture(scope="session", autouse=True)
def nothing_written_in_the_repo():
    """Every command the suite runs writes under its output_dir: the session fails if the repo gains any other
    untracked or ignored path (prepared data in the repo, a stray report, a cache beside the code)."""
    if not (REPO / ".git").exists():
        yield
        return
    before = _untracked(REPO)
    yield
    added = sorted(p for p in _untracked(REPO) - before if not p.startswith(MAY_APPEAR))
    assert not added, f"the test session wrote inside the repo outside output_dir: {added}"


@pytest.fixture(scope="session")
def finished_studies():
    """Studies that module fixtures finished earlier in the session, by name -> folder, so that a later test
    (`raypack report`) combines real studies without running more (tests/test_fault.py's truth study)."""
    return {}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (`mlflow server`, SQLite store, artifacts served by it) on 127.0.0.1: its URI."""
    import socket
    import sys
    import time
    import urllib.request

    folder = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (folder / "server.log").open("w")
    # Without MLflow's job runner (GenAI jobs, periodic tasks): eight more processes of ~240 MB each, which
    # tracking does not use. Its own process group, so that the teardown ends all of them.
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                               "--artifacts-destination", str(folder / "artifacts")],
                              stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True,
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()[-2000:]
        time.sleep(0.3)
    yield uri
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    import ray

    os.environ.pop("RAY_ADDRESS", None)  # never attach to a cluster left over from elsewhere
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory):
    """Meta-Llama-3-8B's tokenizer files: 128,256 tokens, no pad token, no chat template (tests/real_tokenizers.py)."""
    from real_tokenizers import llama3_tokenizer_dir

    return llama3_tokenizer_dir(tmp_path_factory.mktemp("llama3-tokenizer"))


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    """A Qwen3 tokenizer as shipped, with its own (not prefix-stable) chat template (tests/real_tokenizers.py)."""
    from real_tokenizers import qwen_tokenizer_dir

    return qwen_tokenizer_dir(tmp_path_factory.mktemp("qwen-tokenizer"))
