"""Where a job's record goes besides the terminal: the systemd journal when it runs, else syslog
(/dev/log, or $IMAGER_SYSLOG), and --log-file. Each job logs its start, the engine's phases and
plan, its result and any error, so a cron or timer run leaves a trace an operator can find."""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import sys

from ..errors import UsageError
from ..private import check_private_path

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
        check_private_path(os.path.abspath(log_file), "log file")
        try:
            fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise UsageError(f"--log-file {log_file}: {e.strerror}") from None
        stream = os.fdopen(fd, "a", buffering=1)
        to_file = logging.StreamHandler(stream)
        to_file.setFormatter(logging.Formatter("%(asctime)s imager[%(process)d] %(levelname)s %(message)s"))
        to_file.setLevel(logging.INFO)
        handlers.append(to_file)
    engine.handlers[:] = handlers
    engine.setLevel(logging.INFO)
    engine.propagate = False
    return engine


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
