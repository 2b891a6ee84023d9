"""Where DeepSpeed JIT-builds its ops, and a build lock that is never waited on without a bound.

DeepSpeed builds the ops it was not installed with (on CPU its `deepspeed_shm_comm`
communication op, about 40 s on 2 cores, at the first `init_distributed`) through
torch.utils.cpp_extension, into TORCH_EXTENSIONS_DIR/<op>/ (by default one folder
per user: ~/.cache/torch_extensions/py311_cpu/<op>/). torch guards a build with
the file <op>/lock (its FileBaton): the builder creates it with O_EXCL, builds and
removes it; any other process that finds it polls until it is gone. The file names
no owner, so a builder killed mid-build (SIGKILL, out of memory) leaves it behind
and every later process of that user waits for ever, silently. Two Python
environments sharing the folder (a checkout's .venv and a clean clone's) write
different build files there and rebuild in turn, so a killed rebuild is likely.
So do two `ninja` binaries on one environment (the system's and the environment's
`ninja` package, which processes started with different PATHs find): ninja 1.12+
hashes the commands in its build log differently, so each takes the other's log
for changed commands and rebuilds the op (a clean clone's test session rebuilt it
four times, about 50 s each).

`prepare()` (raypack.train.engine calls it before it imports deepspeed, in every
process that may build: the Ray Train workers, a bare process) does two things:

1. TORCH_EXTENSIONS_DIR, unless the user set it, becomes a folder of this
   environment, `<torch's default root>/raypack-<key>`, the key a hash of the
   interpreter's prefix, the Python, torch and deepspeed versions and the
   `ninja` on PATH that torch will run (`environment_key`), so two environments,
   or two ninjas, never share build files.
2. torch's JIT build takes an `OwnedBaton` instead of its FileBaton:
   - a builder first takes an flock on <op>/lock.flock, which the kernel drops
     when its holder dies however it dies; it waits for it at most
     `build_lock_timeout_s()` (BUILD_LOCK_TIMEOUT_S, or RAYPACK_BUILD_LOCK_TIMEOUT_S);
   - holding it, a `lock` that carries raypack's owner line (OWNER_PREFIX, with
     the pid and host that wrote it) is stale: its writer held the flock while it
     built and holds it no longer. It is removed, said in one line on stderr;
   - a `lock` without that line belongs to a process that does not take the
     flock (plain torch or DeepSpeed in a TORCH_EXTENSIONS_DIR the user shares):
     raypack waits for it to go, at most the same bound;
   - it then creates `lock` with its own owner line (written whole before it
     appears: a hard link of a finished file), builds, removes `lock` and drops
     the flock.
   Two live raypack processes serialise on the flock; a wait that reaches the
   bound raises BuildLockTimeout, one line naming the file and what to do.

Pure: imports torch only inside `prepare` and `extensions_root`, and never
deepspeed. tests/test_extensions.py leaves stale and foreign locks in temporary
folders and checks that a bare DeepSpeed start proceeds or fails fast with the
line, while plain DeepSpeed on the same folder still waits when the test cuts it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.metadata
import os
import shutil
import socket
import sys
import time

# Longest wait for a build lock: one build of an op (40 s on 2 cores) on a loaded machine, with room to spare;
# short enough that a run which cannot build fails within minutes (Ray Train retries it train.max_failures times).
BUILD_LOCK_TIMEOUT_S = 300.0
OWNER_PREFIX = "raypack build"
POLL_S = 0.2


class BuildLockTimeout(RuntimeError):
    """A torch extension build lock was still held when the bound ran out."""


def build_lock_timeout_s() -> float:
    """The bound on waiting for a build lock: RAYPACK_BUILD_LOCK_TIMEOUT_S if set, else BUILD_LOCK_TIMEOUT_S."""
    text = os.environ.get("RAYPACK_BUILD_LOCK_TIMEOUT_S", "")
    try:
        value = float(text) if text else BUILD_LOCK_TIMEOUT_S
    except ValueError:
        raise ValueError(f"RAYPACK_BUILD_LOCK_TIMEOUT_S={text!r}: give a number of seconds, e.g. 600") from None
    if value <= 0:
        raise ValueError(f"RAYPACK_BUILD_LOCK_TIMEOUT_S={text!r}: give a number of seconds > 0, e.g. 600")
    return value


def environment_key(prefix: str, python: str, torch_version: str, deepspeed_version: str, ninja: str = "") -> str:
    """12 hex digits naming one environment's build folder; `ninja` is the path of the ninja that builds there.

    >>> environment_key("/work/.venv", "3.11", "2.13.0+cpu", "0.19.8") == environment_key(
    ...     "/work/.venv", "3.11", "2.13.0+cpu", "0.19.8")
    True
    >>> environment_key("/work/.venv", "3.11", "2.13.0+cpu", "0.19.8") == environment_key(
    ...     "/clone/.venv", "3.11", "2.13.0+cpu", "0.19.8")
    False
    """
    text = "\0".join((os.path.realpath(prefix), python, torch_version, deepspeed_version, ninja))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def extensions_root() -> str:
    """This environment's TORCH_EXTENSIONS_DIR: raypack-<environment_key> under torch's default root."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    try:
        deepspeed_version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        deepspeed_version = "none"
    python = f"{sys.version_info.major}.{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    ninja = shutil.which("ninja")  # what torch's build runs: the first on this process's PATH
    key = environment_key(sys.prefix, python, torch.__version__, deepspeed_version,
                          os.path.realpath(ninja) if ninja else "none")
    return os.path.join(get_default_build_root(), f"raypack-{key}")


def prepare() -> str:
    """Before deepspeed is imported: this environment's extensions folder (unless TORCH_EXTENSIONS_DIR is set)
    and the owned, bounded build lock for torch's JIT builds. Returns the folder in use."""
    from torch.utils import cpp_extension

    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = extensions_root()
    build_lock_timeout_s()  # a bad setting fails here, not in the middle of a build
    cpp_extension.FileBaton = OwnedBaton  # what torch's _jit_compile creates around each build
    return os.environ["TORCH_EXTENSIONS_DIR"]


def owner_line() -> str:
    """What raypack writes into a build lock it holds."""
    return f"{OWNER_PREFIX} pid={os.getpid()} host={socket.gethostname()}\n"


def read_owner(lock_path: str) -> str | None:
    """The lock's content, '' when it has none; None when there is no lock."""
    try:
        with open(lock_path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return None


class OwnedBaton:
    """torch.utils.file_baton.FileBaton's interface (try_acquire, wait, release) for torch's JIT build, with an
    owner and a bound: see the module docstring. `try_acquire` returns True or raises BuildLockTimeout."""

    def __init__(self, lock_file_path: str, wait_seconds: float = POLL_S, warn_after_seconds=None,
                 timeout_s: float | None = None) -> None:
        self.lock_file_path = lock_file_path
        self.flock_path = lock_file_path + ".flock"
        self.wait_seconds = wait_seconds
        self.timeout_s = build_lock_timeout_s() if timeout_s is None else timeout_s
        self.flock_fd: int | None = None
        self.held = False

    def try_acquire(self) -> bool:
        """Take the flock, clear a stale lock, create ours; True (the build is ours) or BuildLockTimeout."""
        deadline = time.monotonic() + self.timeout_s
        self._take_flock(deadline)
        try:
            while not self._create():
                owner = read_owner(self.lock_file_path)
                if owner is None:
                    continue  # gone between the two calls
                if owner.startswith(OWNER_PREFIX):
                    self._remove_stale(owner)
                    continue
                self._wait_gone(deadline)
        except BaseException:
            self._drop_flock()
            raise
        self.held = True
        return True

    def wait(self) -> None:
        """Until the lock is gone, at most the bound (torch calls it only when try_acquire returned False)."""
        self._wait_gone(time.monotonic() + self.timeout_s)

    def release(self) -> None:
        """Remove our lock, then drop the flock."""
        try:
            if self.held:
                os.remove(self.lock_file_path)
        finally:
            self.held = False
            self._drop_flock()

    def _take_flock(self, deadline: float) -> None:
        self.flock_fd = os.open(self.flock_path, os.O_CREAT | os.O_RDWR, 0o644)
        while True:
            try:
                fcntl.flock(self.flock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    self._drop_flock()
                    raise
            if time.monotonic() >= deadline:
                self._drop_flock()
                raise BuildLockTimeout(
                    f"{self.flock_path}: another raypack process has been building this torch extension for "
                    f"{self.timeout_s:.0f} s (RAYPACK_BUILD_LOCK_TIMEOUT_S); end that process or wait for it")
            time.sleep(self.wait_seconds)

    def _drop_flock(self) -> None:
        if self.flock_fd is not None:
            os.close(self.flock_fd)  # closing the last descriptor drops the flock
            self.flock_fd = None

    def _create(self) -> bool:
        """Create the lock holding our owner line, atomically; False when a lock is there."""
        folder, name = os.path.split(self.lock_file_path)
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(owner_line())
        try:
            os.link(tmp, self.lock_file_path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)

    def _remove_stale(self, owner: str) -> None:
        print(f"raypack: removing the stale torch extension build lock {self.lock_file_path} (left by "
              f"{owner.strip().removeprefix(OWNER_PREFIX).strip()}, which no longer holds {self.flock_path})",
              file=sys.stderr, flush=True)
        try:
            os.remove(self.lock_file_path)
        except FileNotFoundError:
            pass

    def _wait_gone(self, deadline: float) -> None:
        while os.path.exists(self.lock_file_path):
            if time.monotonic() >= deadline:
                raise BuildLockTimeout(
                    f"{self.lock_file_path}: this torch extension build lock is still there after "
                    f"{self.timeout_s:.0f} s (RAYPACK_BUILD_LOCK_TIMEOUT_S) and no raypack process holds it; if no "
                    "build is running, delete the file and run again")
            time.sleep(self.wait_seconds)
