"""DeepSpeed's JIT-built ops: this environment's own extensions folder and a build lock never waited on unbounded.

A builder killed mid-build leaves torch's lock file behind; plain torch and DeepSpeed
then wait on it for ever (the negative controls show it, cut by the test's own
timeout). raypack.train.extensions removes a lock whose raypack owner is gone and
fails within its bound, with one line naming the file, on a lock it cannot account
for. Every lock here is planted in a temporary folder, never in ~/.cache.

    .venv/bin/pytest tests/test_extensions.py -q
"""

import doctest
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from torch.utils import cpp_extension
from torch.utils.file_baton import FileBaton

from raypack.train import extensions
from raypack.train.extensions import OWNER_PREFIX, BuildLockTimeout, OwnedBaton, environment_key

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

# A raypack process holding a build lock until it is killed (as a Ray Train worker mid-build is by the fault tests).
HOLDER = ("import sys, time; from raypack.train.extensions import OwnedBaton; "
          "OwnedBaton(sys.argv[1], timeout_s=10).try_acquire(); print('held', flush=True); time.sleep(300)")


def killed_while_building(lock: Path) -> None:
    """Leave `lock` as a raypack builder SIGKILLed mid-build leaves it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock.read_text().startswith(f"{OWNER_PREFIX} pid={holder.pid} ")


def waiting(wait, seconds: float) -> threading.Thread:
    """`wait()` in a thread, after `seconds` (is_alive(): still waiting)."""
    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    thread.join(seconds)
    return thread


def test_each_environment_builds_in_its_own_folder(monkeypatch, tmp_path):
    base = environment_key("/work/.venv", "3.11", "2.13.0+cpu", "0.19.8")
    assert base == environment_key("/work/.venv", "3.11", "2.13.0+cpu", "0.19.8")
    others = {environment_key("/clone/.venv", "3.11", "2.13.0+cpu", "0.19.8"),
              environment_key("/work/.venv", "3.12", "2.13.0+cpu", "0.19.8"),
              environment_key("/work/.venv", "3.11", "2.13.0+cu128", "0.19.8"),
              environment_key("/work/.venv", "3.11", "2.13.0+cpu", "0.19.9"),
              environment_key("/work/.venv", "3.11", "2.13.0+cpu", "0.19.8", "/usr/bin/ninja")}
    assert base not in others and len(others) == 5
    assert doctest.testmod(extensions).failed == 0
    monkeypatch.setattr(cpp_extension, "FileBaton", FileBaton)  # restored after the test
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    folder = extensions.prepare()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == folder == extensions.extensions_root()
    assert Path(folder).parent == Path(cpp_extension.get_default_build_root())
    assert Path(folder).name.startswith("raypack-") and cpp_extension.FileBaton is OwnedBaton
    # Two ninjas (ninja 1.12+ hashes its build log's commands differently) would rebuild each other's builds:
    # a process that finds another ninja first on its PATH builds in another folder.
    other_bin = tmp_path / "bin"
    other_bin.mkdir()
    (other_bin / "ninja").write_text("#!/bin/sh\necho 1.11.1\n")
    (other_bin / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", f"{other_bin}{os.pathsep}{os.environ['PATH']}")
    assert extensions.extensions_root() != folder
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)[1:]))
    assert extensions.extensions_root() == folder
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/the/user/chose")
    assert extensions.prepare() == "/somewhere/the/user/chose"
    monkeypatch.setenv("RAYPACK_BUILD_LOCK_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="RAYPACK_BUILD_LOCK_TIMEOUT_S='soon': give a number of seconds"):
        extensions.prepare()


def test_a_stale_lock_is_removed_and_one_without_an_owner_fails_fast_with_its_name(tmp_path):
    lock = tmp_path / "lock"
    killed_while_building(lock)
    # Negative control: torch's own baton cannot take it and waits on it without end.
    plain = FileBaton(str(lock))
    assert not plain.try_acquire()
    plain_wait = waiting(plain.wait, 2.0)
    assert plain_wait.is_alive()
    start = time.monotonic()
    baton = OwnedBaton(str(lock), timeout_s=30)
    assert baton.try_acquire() and time.monotonic() - start < 5
    assert lock.read_text() == extensions.owner_line()  # ours now
    baton.release()
    assert not lock.exists()
    plain_wait.join(5)
    assert not plain_wait.is_alive()  # it waited for the file, and only for it

    lock.write_text("")  # a lock plain torch left, or one a process that takes no flock holds right now
    start = time.monotonic()
    with pytest.raises(BuildLockTimeout) as err:
        OwnedBaton(str(lock), timeout_s=1.0).try_acquire()
    assert 1.0 <= time.monotonic() - start < 5
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{lock}: ") and "delete the file" in message
    assert lock.exists()  # not ours to remove: it may belong to a live build


# Two builders at once: each takes the lock, "builds" for 1 s, releases; prints its interval.
BUILDER = """
import os, sys, time
from raypack.train.extensions import OwnedBaton
lock = sys.argv[1]
if sys.argv[2] == "naive":  # what clearing every lock found would do
    class OwnedBaton(OwnedBaton):
        def try_acquire(self):
            if os.path.exists(lock):
                os.remove(lock)
            open(lock, "w").close()
            return True

        def release(self):
            if os.path.exists(lock):
                os.remove(lock)
baton = OwnedBaton(lock, timeout_s=30)
baton.try_acquire()
start = time.time()
time.sleep(1.0)
end = time.time()
baton.release()
print(start, end)
"""


def intervals(lock: Path, kind: str) -> list[tuple[float, float]]:
    builders = [subprocess.Popen([sys.executable, "-c", BUILDER, str(lock), kind], env=ENV, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    out = [b.communicate(timeout=60) for b in builders]
    assert all(b.returncode == 0 for b in builders), [e for _, e in out]
    return sorted(tuple(map(float, o.split())) for o, _ in out)


def test_two_live_builders_take_turns_and_a_held_lock_is_never_taken_from_its_builder(tmp_path):
    (first_start, first_end), (second_start, _) = intervals(tmp_path / "lock", "owned")
    assert second_start >= first_end > first_start
    # Negative control: treating every lock found as stale lets the two builds overlap, and the check sees it.
    (first_start, first_end), (second_start, _) = intervals(tmp_path / "naive-lock", "naive")
    assert second_start < first_end
    # A builder that outlives the bound makes the next one fail, naming the flock, instead of waiting on.
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "lock")], env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BuildLockTimeout, match=f"^{tmp_path / 'lock'}.flock: another raypack process"):
            OwnedBaton(str(tmp_path / "lock"), timeout_s=0.5).try_acquire()
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- a bare DeepSpeed start (its comm op's build)

# DeepSpeed's CPU start-up (init_distributed JIT-builds or loads deepspeed_shm_comm): raypack's path
# (raypack.train.engine.partitioned_construction) or plain DeepSpeed.
START = """
import os, socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                  DS_ACCELERATOR="cpu")
if sys.argv[1] == "raypack":
    from raypack.config import TrainConfig
    from raypack.train.engine import partitioned_construction
    partitioned_construction(TrainConfig(zero_stage=3), 1, "cpu")
else:
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
print("started in", os.environ["TORCH_EXTENSIONS_DIR"], flush=True)
"""


def start(kind: str, timeout: float, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", START, kind], env={**ENV, **env}, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def built_op(tmp_path_factory) -> Path:
    """A copy of this environment's built deepspeed_shm_comm folder (built there first if it is not yet: ~40 s
    once per machine), its files' times kept, so ninja finds it up to date."""
    env = {k: v for k, v in ENV.items() if k != "TORCH_EXTENSIONS_DIR"}
    done = subprocess.run([sys.executable, "-c", START, "raypack"], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    own = Path(done.stdout.split("started in ")[1].strip())
    assert own.name.startswith("raypack-") and (own / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").is_file()
    copy = tmp_path_factory.mktemp("torch_extensions") / "ext"
    shutil.copytree(own, copy, ignore=shutil.ignore_patterns("lock", "lock.flock"))
    return copy


def test_deepspeed_starts_past_a_killed_builders_lock_where_plain_deepspeed_waits_for_ever(built_op):
    lock = built_op / "deepspeed_shm_comm" / "lock"
    killed_while_building(lock)
    # Negative control: plain DeepSpeed on the same folder is still waiting when the test cuts it (it starts in
    # about 5 s without the lock: below).
    with pytest.raises(subprocess.TimeoutExpired):
        start("deepspeed", timeout=15, TORCH_EXTENSIONS_DIR=str(built_op))
    assert lock.exists()
    begun = time.monotonic()
    done = start("raypack", timeout=120, TORCH_EXTENSIONS_DIR=str(built_op))
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - begun < 60 and f"started in {built_op}" in done.stdout
    assert f"removing the stale torch extension build lock {lock}" in done.stderr
    assert not lock.exists()
    # The lock was all that held plain DeepSpeed: without it, it starts well within the cut.
    begun = time.monotonic()
    assert start("deepspeed", timeout=60, TORCH_EXTENSIONS_DIR=str(built_op)).returncode == 0
    assert time.monotonic() - begun < 15


def test_deepspeed_start_fails_fast_with_one_line_on_a_lock_it_cannot_account_for(built_op):
    lock = built_op / "deepspeed_shm_comm" / "lock"
    lock.write_text("")
    begun = time.monotonic()
    done = start("raypack", timeout=120, TORCH_EXTENSIONS_DIR=str(built_op), RAYPACK_BUILD_LOCK_TIMEOUT_S="2")
    assert done.returncode != 0 and time.monotonic() - begun < 60
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"raypack.train.extensions.BuildLockTimeout: {lock}: "), done.stderr[-3000:]
    assert lock.exists()
    lock.unlink()
