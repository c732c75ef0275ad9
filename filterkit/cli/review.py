"""The review command: a local page to check a report by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import app


@app.command()
def review(
    report: Annotated[Path, typer.Argument(help="The .json of a filter, dedup, dedup --against or outliers report (or the .html beside it).")],
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port on 127.0.0.1; 0 picks a free one.")] = 0,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Print the URL; do not open a browser.")] = False,
) -> None:
    """Serve a local page (127.0.0.1 only) to mark a filter report's images keep / reject, the
    review band first, re-scoring after each mark; to confirm / split a dedup report's groups; to
    confirm / reject each pair of a dedup --against report (new image beside its reference match);
    or to mark each image of an outliers report outlier / fine (beside its nearest neighbour).
    Marks go to REPORT.labels.json beside the report. Ctrl-C or SIGTERM stops it."""
    from ..review import open_session, serve

    session = open_session(report)
    if getattr(session, "note", ""):
        typer.echo(f"note: {session.note}", err=True)
    serve(session, port, open_browser=not no_browser, echo=lambda line: typer.echo(line))
    typer.echo("stopped")
