"""Starting helper processes of this very engine (the volume daemon, the mount daemon, the freeze
guard), and where daemons keep their run directories.

A daemon is started in a session of its own by start_daemon() (a new interpreter) or
fork_daemon() (this process, forked): it forks once more (no session leader, never a
controlling terminal), logs to a file, and tells its starter on a pipe, in one JSON line
(send_ready()), that it serves or why it cannot.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from typing import Callable, Iterator

from .errors import ImagerError
from .private import open_private

# The directory that holds the imager and devices packages.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN_DIR_ENV = "IMAGER_RUN_DIR"
DEFAULT_RUN_DIR = "/run/imager"


def run_base() -> str:
    """Where daemons keep their run directories ($IMAGER_RUN_DIR, default /run/imager)."""
    return os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR


def engine_env() -> dict[str, str]:
    """This process's environment with the engine's own root first on PYTHONPATH, so that a child
    `python -m imager....` imports this very engine, also from a source checkout that is not
    installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return env


def start_daemon(command: list[str], log_path: str, *, what: str, error: type[ImagerError],
                 timeout: float) -> dict:
    """Run `command` + ["--ready-fd", N] in a session of its own, its output appended to the
    private file `log_path`, and return the JSON object it writes on N when it is ready (or
    failed). `what` names the daemon in messages ("the volume daemon"); `error` is raised when
    it exits or stays silent for `timeout` seconds."""
    ready_read, ready_write = os.pipe()
    try:
        with open_private(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "ab") as log:
            starter = subprocess.Popen(command + ["--ready-fd", str(ready_write)], stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=log, pass_fds=(ready_write,), start_new_session=True,
                                       cwd="/", env=engine_env())
        os.close(ready_write)
        ready_write = -1
        # The starter forks the daemon and exits at once; reap it so no zombie stays behind.
        starter.wait()
        return _read_ready(ready_read, log_path, what, error, timeout)
    finally:
        os.close(ready_read)
        if ready_write >= 0:
            os.close(ready_write)


def fork_daemon(run: Callable[[int], int], log_path: str, *, what: str, error: type[ImagerError],
                timeout: float) -> dict:
    """start_daemon() without a new interpreter: fork this process (it has imported what the
    daemon needs; exec'ing Python again costs a third of a second) into a session of its own,
    fork again, point standard input at /dev/null and output at the private file `log_path`,
    close every other inherited descriptor, and call `run(ready_fd)` there; the daemon ends with
    os._exit(its return value), never unwinding its parent's frames. Returns its ready line."""
    ready_read, ready_write = os.pipe()
    log = open_private(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "ab")
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setsid()
            if os.fork() > 0:
                os._exit(0)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            os.closerange(3, ready_write)
            os.closerange(ready_write + 1, os.sysconf("SC_OPEN_MAX"))
            os.chdir("/")
            code = run(ready_write)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(ready_write)
    log.close()
    try:
        os.waitpid(pid, 0)          # the first child exits at once
        return _read_ready(ready_read, log_path, what, error, timeout)
    finally:
        os.close(ready_read)


def _read_ready(fd: int, log_path: str, what: str, error: type[ImagerError], timeout: float) -> dict:
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise error(f"{what} did not get ready in {timeout:.0f} s; see {log_path}")
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            raise error(f"{what} exited before it was ready: {log_tail(log_path)}")
        data += chunk
    reply = json.loads(data.split(b"\n", 1)[0])
    if not isinstance(reply, dict):
        raise error(f"{what} answered {reply!r}; see {log_path}")
    return reply


def log_tail(log_path: str) -> str:
    """The last line of a daemon's log, and where the log is."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 2000))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"see {log_path}"
    return (lines[-1] if lines else "no message") + f" (log: {log_path})"


def become_daemon() -> None:
    """Fork once more: the daemon is no session leader (it can never get a controlling terminal
    again) and its starter exits at once."""
    if os.fork() > 0:
        os._exit(0)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def send_ready(fd: int | None, reply: dict) -> None:
    """Tell the starter, in one JSON line on `fd`, that the daemon is ready or why it is not."""
    if fd is None:
        return
    try:
        os.write(fd, json.dumps(reply).encode() + b"\n")
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def exit_watch(pid: int) -> Iterator[int | None]:
    """A descriptor that becomes readable when process `pid` ends (None: there is no such
    process), closed on leaving. Taken before signalling or checking the process: a pid reused
    after it is taken cannot be mistaken for the process."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = None
    if fd is None:
        yield None      # outside the except clause: an error of the with-body is not chained to it
        return
    try:
        yield fd
    finally:
        os.close(fd)


def has_exited(watch: int | None, timeout: float | None) -> bool:
    """Wait up to `timeout` seconds (None: for good) for the process of exit_watch() to end."""
    return watch is None or bool(select.select([watch], [], [], timeout)[0])


def process_start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), which tells it from a later process
    that got the same pid; None when there is no such process, or only its zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None
