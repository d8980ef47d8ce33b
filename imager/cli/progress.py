"""Progress displays on stderr, chosen with --progress:

    auto    a bar when stderr is a terminal (whatever stdout is: `--json > r.json` and `| tee`
            keep it), nothing otherwise
    bar     a bar (tqdm), binary units labelled as such (MiB/s)
    plain   a line every few seconds and at the end of each phase, for logs and cron mail
    json    one JSON object per line (command, phase, done, total, rate, ETA), for programs
    none    nothing

Jobs count bytes and name their phases (imager.progress): a restore's verify pass is a phase of
its own, not a bar stuck at 100%.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from typing import TextIO

from ..units import human_bytes

MODES = ("auto", "bar", "plain", "json", "none")
PLAIN_EVERY = 5.0          # seconds between plain lines
JSON_EVERY = 1.0


class Display:
    """Counts bytes of the current phase; subclasses say how it looks."""

    def __init__(self, command: str, total: int, stream: TextIO):
        self.command, self.stream = command, stream
        self.phase_name, self.total, self.done = "", total, 0
        self.started = time.monotonic()
        # What the job writes, when it says (see imager.progress.output_counter).
        self.out_label: str | None = None
        self.out_minimum: float | None = None
        self.out_bytes = 0
        self.out_started = self.started
        self._out_lock = threading.Lock()

    def output(self, label: str, minimum: float | None) -> None:
        self.out_label, self.out_minimum = label, minimum
        self.out_bytes, self.out_started = 0, time.monotonic()

    def written(self, count: int) -> None:
        with self._out_lock:
            self.out_bytes += count

    def out_rate(self) -> float:
        elapsed = time.monotonic() - self.out_started
        return self.out_bytes / elapsed if elapsed > 0 else 0.0

    def out_text(self) -> str:
        """", 41.2 MiB/s to tape (under the drive's 112 MiB/s)" for the lines and the bar."""
        if not self.out_label:
            return ""
        rate = self.out_rate()
        under = (f" (UNDER the drive's {self.out_minimum / 2**20:.0f} MiB/s)"
                 if self.out_minimum and self.out_bytes and rate < self.out_minimum else "")
        return f"{rate / 2**20:.1f} MiB/s {self.out_label}{under}"

    def phase(self, name: str, total: int) -> None:
        if self.phase_name:
            self.end_phase()
        self.phase_name, self.total, self.done = name, total, 0
        self.started = time.monotonic()

    def __call__(self, done: int) -> None:
        self.done += done
        self.update()

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        rate = self.rate()
        return (self.total - self.done) / rate if rate > 0 and self.total > self.done else None

    def update(self) -> None: ...

    def end_phase(self) -> None: ...

    def close(self) -> None:
        self.end_phase()


class PlainDisplay(Display):
    def __init__(self, command: str, total: int, stream: TextIO):
        super().__init__(command, total, stream)
        self._last = time.monotonic()

    def update(self) -> None:
        if time.monotonic() - self._last >= PLAIN_EVERY:
            self._line()

    def end_phase(self) -> None:
        self._line(final=True)

    def _line(self, final: bool = False) -> None:
        self._last = time.monotonic()
        of = f" of {human_bytes(self.total)}" if self.total else ""
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = self.eta()
        tail = "done" if final else (f"ETA {_clock(eta)}" if eta is not None else "")
        name = f"{self.command} {self.phase_name}".strip()
        out = self.out_text()
        print(f"imager: {name}: {human_bytes(self.done)}{of}{pct}, {self.rate() / 2**20:.1f} MiB/s"
              + (f", {out}" if out else "") + (f", {tail}" if tail else ""), file=self.stream, flush=True)


class JsonDisplay(Display):
    def __init__(self, command: str, total: int, stream: TextIO):
        super().__init__(command, total, stream)
        self._last = 0.0

    def update(self) -> None:
        if time.monotonic() - self._last >= JSON_EVERY:
            self._emit(False)

    def end_phase(self) -> None:
        self._emit(True)

    def _emit(self, final: bool) -> None:
        self._last = time.monotonic()
        eta = self.eta()
        event = {"command": self.command, "phase": self.phase_name or self.command, "done": self.done,
                 "total": self.total or None, "bytes_per_second": round(self.rate()),
                 "eta_seconds": None if final or eta is None else round(eta, 1), "final": final}
        if self.out_label:
            event.update(output=self.out_label, bytes_written=self.out_bytes,
                         written_per_second=round(self.out_rate()),
                         minimum_per_second=round(self.out_minimum) if self.out_minimum else None)
        print(json.dumps(event), file=self.stream, flush=True)


class BarDisplay(Display):
    def __init__(self, command: str, total: int, stream: TextIO):
        super().__init__(command, total, stream)
        self._bar = None
        self._postfix_at = 0.0
        self._open()

    def _open(self) -> None:
        from tqdm import tqdm

        # A terminal that reports no size (a bare pty) still gets a bar: tqdm hides bars that
        # do not fit in zero rows. "iB" with a divisor of 1024 labels binary units: MiB/s.
        size = shutil.get_terminal_size((100, 24))
        label = f"{self.command} {self.phase_name}".strip()
        self._bar = tqdm(total=self.total or None, desc=label, unit="iB", unit_scale=True, unit_divisor=1024,
                         file=self.stream, ncols=size.columns, nrows=size.lines, smoothing=0.1)

    def phase(self, name: str, total: int) -> None:
        self.end_phase()
        self.phase_name, self.total, self.done = name, total, 0
        self.started = time.monotonic()
        self._open()

    def update(self) -> None:
        if self._bar is not None:
            if self.out_label and time.monotonic() - self._postfix_at >= 0.5:
                self._postfix_at = time.monotonic()
                self._bar.set_postfix_str(self.out_text(), refresh=False)
            self._bar.update(self.done - self._bar.n)

    def end_phase(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def display_for(mode: str, command: str, total: int, stream: TextIO = sys.stderr) -> Display | None:
    if mode == "auto":
        mode = "bar" if stream.isatty() else "none"
    return {"bar": BarDisplay, "plain": PlainDisplay, "json": JsonDisplay}.get(mode, lambda *a: None)(
        command, total, stream)
