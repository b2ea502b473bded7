"""The local Ray a sweep starts does not outlive its driver.

When a driver that started its own Ray dies without shutting it down
(kill -9, an OOM kill), Ray's raylet and GCS go with it but two of its
agents (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`, ~100 MB each) are
left running for good. So the driver starts this small watcher in its own
session: it waits for the driver to end, then stops every process of this
user that still has a file of that Ray session open — only that session's,
never another Ray's — with SIGTERM, then SIGKILL after 2 s.

    python -m kdarena.search.ray_reaper DRIVER_PID SESSION_DIR
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path


def start(session_dir: str) -> subprocess.Popen:
    """Watch this process; once it is gone, stop what is left of the Ray session at `session_dir`."""
    return subprocess.Popen([sys.executable, "-m", "kdarena.search.ray_reaper", str(os.getpid()), session_dir],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def session_processes(session_dir: str) -> list[int]:
    """Processes of this user, other than this one, with a file under `session_dir` open or named on their command line."""
    prefix = session_dir.rstrip("/") + "/"
    uid, me, found = os.getuid(), os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            uses = prefix in cmdline or session_dir + " " in cmdline + " "
            if not uses:
                for fd in (entry / "fd").iterdir():
                    try:
                        if os.readlink(fd).startswith(prefix):
                            uses = True
                            break
                    except OSError:
                        continue
        except OSError:  # gone, or not ours to read
            continue
        if uses:
            found.append(int(entry.name))
    return found


def _wait_for_exit(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (old kernel) or already gone
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)
    else:
        select.select([fd], [], [])
        os.close(fd)


def stop(pids: list[int], grace_s: float = 2.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_exists(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _exists(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def main() -> None:
    driver, session_dir = int(sys.argv[1]), sys.argv[2]
    _wait_for_exit(driver)
    time.sleep(1.0)  # a clean shutdown is under way: let Ray stop its own processes first
    stop(session_processes(session_dir))


if __name__ == "__main__":
    main()
