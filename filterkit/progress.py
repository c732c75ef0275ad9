"""Progress bars (rich, on stderr so ``--json`` output stays clean)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True,
                 unit: str = "img") -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, description=None, total=None)`` (``total``: a new total, for work
    whose size changed); shows description, bar, done/total, rate, elapsed, ETA."""
    if not enabled:
        yield lambda n=1, description=None, total=None: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        _RateColumn(unit), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1, description: str | None = None, total: int | None = None) -> None:
            if description is None and total is None:
                bar.advance(task, n)
            else:
                bar.update(task, advance=n, **({} if description is None else {"description": description}),
                           **({} if total is None else {"total": total}))

        yield advance
