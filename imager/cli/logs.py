"""Where a job's record goes besides the terminal: the systemd journal when it runs, else syslog
(/dev/log, or $IMAGER_SYSLOG), and --log-file. Each job logs its start, the engine's phases and
plan, its result and any error, so a cron or timer run leaves a trace an operator can find."""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import socket
import stat
import sys

from ..errors import UsageError
from ..private import check_not_under_dev, check_private_path

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_SOCKET = "/dev/log"
# A record meant for the logs only (the terminal already shows it another way).
AUDIT = {"audit": True}


class JournalHandler(logging.Handler):
    """The journal's native protocol: KEY=value lines in one datagram."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self, path: str = JOURNAL_SOCKET):
        super().__init__()
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record).replace("\n", " ")
            fields = (f"MESSAGE={message}\nPRIORITY={self.PRIORITY.get(record.levelno, 6)}\n"
                      f"SYSLOG_IDENTIFIER=imager\nIMAGER_LOGGER={record.name}\n")
            self.sock.sendto(fields.encode(), self.path)
        except OSError:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


class _NotAudit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "audit", False)


def configure(verbose: bool, quiet: bool, log_file: str | None) -> logging.Logger:
    """The engine's logger: details on stderr with -v, everything at INFO to the system log and
    --log-file."""
    engine = logging.getLogger("imager")
    for old in engine.handlers:
        old.close()
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter("imager: %(message)s"))
    stderr.setLevel(logging.INFO if verbose and not quiet else logging.WARNING)
    stderr.addFilter(_NotAudit())
    handlers: list[logging.Handler] = [stderr]
    system = system_log()
    if system is not None:
        system.setLevel(logging.INFO)
        handlers.append(system)
    if log_file:
        check_not_under_dev(log_file, "--log-file")
        check_private_path(os.path.abspath(log_file), "log file")
        try:
            # O_NONBLOCK: a FIFO with no reader is refused below instead of waiting for one.
            fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
                         | os.O_NONBLOCK, 0o600)
        except OSError as e:
            reason = "a FIFO nobody reads" if e.errno == errno.ENXIO else e.strerror
            raise UsageError(f"--log-file {log_file}: {reason}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UsageError(f"--log-file {log_file}: not a regular file")
        os.set_blocking(fd, True)
        stream = os.fdopen(fd, "a", buffering=1)
        to_file = LogFileHandler(stream, log_file)
        to_file.setFormatter(logging.Formatter("%(asctime)s imager[%(process)d] %(levelname)s %(message)s"))
        to_file.setLevel(logging.INFO)
        handlers.append(to_file)
    engine.handlers[:] = handlers
    engine.setLevel(logging.INFO)
    engine.propagate = False
    return engine


class LogFileHandler(logging.StreamHandler):
    """--log-file: a write that fails (a full filesystem) is said once, in one line, and the
    log file is given up; the job goes on."""

    def __init__(self, stream, path: str):
        super().__init__(stream)
        self.path = path
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            error = sys.exc_info()[1]
            reason = getattr(error, "strerror", None) or error
            print(f"imager: warning: writing the log file {self.path} failed ({reason}); it is not written "
                  f"any more", file=sys.stderr)


def system_log() -> logging.Handler | None:
    if os.path.exists(JOURNAL_SOCKET):
        handler: logging.Handler = JournalHandler()
    else:
        path = os.environ.get("IMAGER_SYSLOG", SYSLOG_SOCKET)
        if not os.path.exists(path):
            return None
        try:
            handler = logging.handlers.SysLogHandler(address=path, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        except OSError:
            return None
        handler.ident = "imager: "
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler
