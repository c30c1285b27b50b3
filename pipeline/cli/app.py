"""The typer application and the one place user-facing errors become a clean message and exit code."""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console

from pipeline.errors import CloudfreeError

app = typer.Typer(
    name="cloudfree",
    help="Cloud-free imagery for disaster response: archives -> masked patches -> cubes -> models -> COGs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except CloudfreeError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
