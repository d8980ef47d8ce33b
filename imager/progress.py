"""How jobs report progress: a callable counting bytes done, which may also be told that a new
phase begins (a restore's verify pass reads the whole volume again: a display must not sit at
100% meanwhile). Plain callables are fine; they just do not hear of phases."""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

Progress = Callable[[int], None]


@runtime_checkable
class PhasedProgress(Protocol):
    def __call__(self, done: int) -> None: ...
    def phase(self, name: str, total: int) -> None: ...


def start_phase(progress: Progress | None, name: str, total: int) -> None:
    """Tell `progress` that phase `name` of `total` bytes begins (counting from zero)."""
    if isinstance(progress, PhasedProgress):
        progress.phase(name, total)


@runtime_checkable
class CountsOutput(Protocol):
    def output(self, label: str, minimum: float | None) -> None: ...
    def written(self, count: int) -> None: ...


def output_counter(progress: Progress | None, label: str, minimum: float | None = None) -> Callable[[int], None]:
    """A callback for the bytes a job writes to its output (compressed, for an image), which a
    display that shows them counts under `label` ("to tape"); `minimum` is the rate in bytes
    per second under which the output suffers (a tape drive's slowest streaming rate). The
    callback may be called from another thread (a tape sink's writer)."""
    if isinstance(progress, CountsOutput):
        progress.output(label, minimum)
        return progress.written
    return lambda count: None
