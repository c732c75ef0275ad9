"""What the commands share: the app and its sub-apps, option types, and output helpers."""

from __future__ import annotations

import functools
import math
import signal
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import FilterkitError


def _terminated(signum, frame):
    raise KeyboardInterrupt


class _App(typer.Typer):
    """A Typer whose commands turn Ctrl-C into one line and exit status 130 themselves: typer 0.29
    exits 130 silently, older typers let click print "Aborted!" and exit 1. SIGTERM, what a
    scheduler or ``kill`` sends before SIGKILL, is taken as Ctrl-C while a command runs, so
    ``pretrain`` saves its checkpoint and ``compare-methods`` its record then too."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)

        def decorator(f):
            @functools.wraps(f)
            def interruptible(*a, **kw):
                main = threading.current_thread() is threading.main_thread()  # signals reach only it
                previous = signal.signal(signal.SIGTERM, _terminated) if main else None
                try:
                    return f(*a, **kw)
                except KeyboardInterrupt:
                    echo_err("interrupted")
                    raise typer.Exit(130) from None
                finally:
                    if main and previous is not None:  # None: set outside Python, cannot be put back
                        signal.signal(signal.SIGTERM, previous)
            register(interruptible)
            return f
        return decorator


app = _App(
    name="filterkit",
    help="Turn an unlabelled image collection into a trustworthy image filter.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"filterkit {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="Print filterkit's version and exit.")] = False) -> None:
    """Turn an unlabelled image collection into a trustworthy image filter."""


model_app = _App(help="Create and inspect model directories.", no_args_is_help=True)
app.add_typer(model_app, name="model")
index_app = _App(help="Build indexes for collections too large for memory.", no_args_is_help=True)
app.add_typer(index_app, name="index")
cache_app = _App(help="Manage embedding caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

FollowOpt = Annotated[bool, typer.Option(
    "--follow-symlinks", help="Read symlinks that point outside the folder, and descend into linked folders.")]
ModelOpt = Annotated[Optional[Path], typer.Option(
    "--model", "-m", help="Model directory.", show_default="the shipped model, or $FILTERKIT_MODEL")]
CacheOpt = Annotated[Optional[Path], typer.Option(
    "--cache", help="Embedding cache file.", show_default="$FILTERKIT_CACHE or ~/.cache/filterkit/embeddings.sqlite")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", min=0, help="Decode processes.", show_default="cores - 1; 0 = decode in-process")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | mps.")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", help="Forward precision: auto (bf16 on CUDA where supported, else fp16; on CPU bf16 where it has bf16 instructions, else fp32) | fp32 | bf16 | fp16. Images already in the cache keep the vectors they were cached with.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show what --action would do; change nothing.")]
ReportOpt = Annotated[Optional[Path], typer.Option(
    "--report", help="Write an HTML report here, with .csv and .json beside it.")]
MapOpt = Annotated[Optional[Path], typer.Option(
    "--map", help="Write a 2-D map of the collection's embeddings (PCA + t-SNE) as a PNG here.")]


def echo_err(message: str) -> None:
    typer.echo(message, err=True)


def load_encoder(model: Optional[Path], device: str = "auto", precision: str = "auto"):
    from ..encoder import Encoder

    return Encoder.load(model, device=device, precision=precision)  # None: the shipped default model


def print_skips(skipped, quiet: bool) -> None:
    """The files that could not be read, on stderr; --quiet shortens the list to a count (it is
    in --json and the reports in full), never hides it."""
    if not skipped:
        return
    if quiet:
        echo_err(f"skipped {len(skipped)} file(s) that could not be read (--json or --report lists them)")
        return
    echo_err(f"skipped {len(skipped)} file(s):")
    for s in skipped[:20]:
        echo_err(f"  {s.path}: {s.reason}")
    if len(skipped) > 20:
        echo_err(f"  ... and {len(skipped) - 20} more (use --json for all)")


def check_outputs(report: Optional[Path], map_png: Optional[Path], *inputs: Optional[Path]) -> None:
    """Before any work: --report and --map may only replace filterkit's own earlier outputs, and
    may not be written into an input folder (the next run would read them as images)."""
    for option, path in (("--report", report), ("--map", map_png)):
        for folder in inputs:
            if path is not None and folder is not None and Path(folder).is_dir() \
                    and Path(folder).resolve() in Path(path).resolve().parents:
                raise FilterkitError(f"{option} {path} is inside the input folder {folder}: filterkit does not write "
                                     "into its inputs (a map would be read as an image next time); write it outside")
    if report is not None:
        from ..report import check_report_path

        check_report_path(report)
    if map_png is not None:
        from ..embedmap import check_map_path

        check_map_path(map_png)


def print_report(report: Optional[Path]) -> None:
    if report is not None:
        typer.echo(f"report: {report} (+ {report.with_suffix('.csv').name}, {report.with_suffix('.json').name})")


def print_actions(plan, done, dry_run: bool, out: Optional[Path] = None) -> None:
    if not plan:
        return
    todo = [p for p in plan if not p.already]
    already = len(plan) - len(todo)
    there = f"; {already} already there from an earlier run (same bytes or link), left as they are" if already else ""
    if dry_run:
        typer.echo(f"dry run: would {plan[0].action} {len(todo)} file(s){there}" + (":" if todo else ""))
        for p in todo[:50]:
            typer.echo(f"  {p.source} -> {p.destination}")
        if len(todo) > 50:
            typer.echo(f"  ... and {len(todo) - 50} more (use --json for all)")
    else:
        into = f" into {out}" if out is not None else ""
        typer.echo(f"{plan[0].action}: {len(done)} of {len(todo)} file(s) done{into}{there}")


def threshold_arg(value: str) -> float | str:
    """--threshold: 'auto' or a finite number (a score)."""
    if value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):  # nan compares false with everything: it would keep every image
        raise FilterkitError(f"--threshold must be 'auto' or a finite number, got {value!r}")
    return number


def review_band_arg(value: str) -> float | str:
    """--review-band: 'auto' or a score width >= 0."""
    if value == "auto":
        return value
    try:
        band = float(value)
    except ValueError:
        band = -1.0
    if not band >= 0:  # also NaN
        raise FilterkitError(f"--review-band must be 'auto' or a score width >= 0 (0: no review), got {value!r}")
    return band
