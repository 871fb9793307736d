"""A progress bar for long generate() calls (rich), silent unless asked for."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import Progress


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None):
        self._progress, self._task = progress, task

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)


@contextmanager
def request_progress(total: int, enabled: bool) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None, None)
        return
    with Progress(transient=True) as progress:
        yield _Bar(progress, progress.add_task("generating", total=total))
