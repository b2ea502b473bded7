"""One driver per sweep: an exclusive lock on the sweep's directory, held while the driver runs.

Two drivers on one sweep (a cluster job submitted twice, a second terminal)
would run every trial twice and overwrite each other's records. The driver
takes a POSIX record lock (`fcntl.lockf`) on `<sweep>/driver.lock` before it
reads or writes anything of the sweep, and holds it until it exits; a second
driver, with or without `--resume`, is refused at once, naming the holder.

Mechanism and limits: the kernel drops the lock when its process dies (kill
-9 included), so a dead driver never blocks the next one; the file's content
(host, pid, start time) only names the holder in messages. On a shared
filesystem `lockf` is NFS's own locking (NFSv4 leases, or lockd for NFSv3):
it holds across hosts as long as the filesystem honours locks; a lock held by
a host that crashed is freed when its lease expires (about 90 s on Linux's
NFS server). On a filesystem without working locks (some FUSE mounts) two
drivers on two hosts are not kept apart: run one driver per sweep there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kdarena.zoo.errors import UserError

LOCK_FILE = "driver.lock"


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    if not holder:
        return "another driver"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')})"


def _locked_fd(root: Path) -> int:
    """An open descriptor of `root/driver.lock` holding its lock, or a UserError naming the holder."""
    path = root / LOCK_FILE
    while True:
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"storage {root} is not writable ({exc.strerror or exc}); pass --storage DIR or set "
                            "storage: in the sweep file") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise UserError(f"cannot lock {path} ({exc.strerror or exc}); the storage must support file locks "
                                "(or run one driver per sweep by hand)") from None
            raise UserError(f"sweep '{root.name}' is being run by {_describe(holder)}: one driver per sweep. Wait for "
                            f"it to end, or stop it (Ctrl-C, or `kill -INT {holder.get('pid', 'PID')}` on its host) "
                            "and continue with --resume") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the file was removed by a driver that just let go of an empty sweep: lock the new one


@contextmanager
def driver_lock(root: Path, say=lambda text: None) -> Iterator[None]:
    """Hold the sweep at `root` for this driver; a UserError naming the holder if another driver has it.

    A folder made only to hold the lock is removed again if the driver
    leaves nothing else in it (a sweep refused before any work).
    """
    made = not root.exists()
    fd = _locked_fd(root)
    try:
        previous = _holder(fd)
        if previous.get("pid") and previous.get("host") == socket.gethostname() and not _alive(int(previous["pid"])):
            say(f"taking over sweep '{root.name}' from driver pid {previous['pid']}, which ended without releasing it")
        mine = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released: the file names nobody
    finally:
        os.close(fd)  # closing drops the lock
        if made and [p.name for p in root.iterdir()] == [LOCK_FILE]:
            (root / LOCK_FILE).unlink(missing_ok=True)
            try:
                root.rmdir()
            except OSError:
                pass
