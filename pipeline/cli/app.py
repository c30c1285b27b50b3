"""The typer application and the one place user-facing errors become a clean message and exit code."""

from __future__ import annotations

import datetime as dt
import logging
import sys

import typer
from rich.console import Console

from pipeline.errors import CloudfreeError, DataError

app = typer.Typer(
    name="cloudfree",
    help="Cloud-free imagery for disaster response: archives -> masked patches -> cubes -> models -> COGs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def parse_date(value: str, option: str = "--date") -> dt.date:
    """A YYYY-MM-DD option value, or a one-line error naming the option."""
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise DataError(f"{option} {value!r} is not a date; use YYYY-MM-DD, e.g. 2021-07-22") from None


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except CloudfreeError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
