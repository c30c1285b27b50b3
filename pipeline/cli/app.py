"""The typer application and the one place user-facing errors become a clean message and exit code."""

from __future__ import annotations

import datetime as dt
import errno
import logging
import re
import shutil
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.errors import CloudfreeError, DataError
from pipeline.redact import install as install_redaction

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


# Errors of the file system the user can fix (a path, its permissions, its disk); anything else is a bug and keeps
# its traceback.
_USER_FS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EEXIST, errno.ENOTDIR,
                   errno.EISDIR, errno.ENOENT, errno.ENAMETOOLONG}
# Writers use hidden temp names beside the target (pipeline.files.temp_path, cog intermediates): name the target.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+?)(?:\.\d+-\d+\.tmp|\.partial\.tif)$")


def _user_path(filename: str) -> Path:
    path = Path(filename)
    m = _TEMP_NAME.match(path.name)
    return path.with_name(m["name"]) if m else path


def describe_os_error(exc: OSError) -> str | None:
    """One line naming the path, what the system said and the fix, for file-system errors a user can fix."""
    if exc.errno not in _USER_FS_ERRNOS or not exc.filename:
        return None
    path = _user_path(str(exc.filename))
    what = exc.strerror or errno.errorcode.get(exc.errno or 0, "error")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        folder = next((p for p in [path, *path.parents] if p.exists()), Path("/"))
        free = shutil.disk_usage(folder).free
        return (f"{path}: {what} ({free / 2**20:.1f} MiB free on {folder}); free space there or choose an output "
                "folder on a larger disk")
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"{path}: {what} (a file stands where a folder is needed); choose another output path"
    return f"{path}: {what}; check the path and that you may write there, or choose another output path"


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_redaction()  # after basicConfig: the filter goes on the root handler it creates
    try:
        app()
    except CloudfreeError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as exc:
        line = describe_os_error(exc)
        if line is None:
            raise
        err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        sys.exit(2)
