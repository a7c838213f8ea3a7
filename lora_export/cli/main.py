"""The `lora-export` command: parse, call one library function, render, and map the outcome to an exit code.

Exit codes: 0 success, 1 a check failed, 2 bad input or usage, 3 an internal error (a bug: one line asking for a
report; the traceback with --debug or LORA_EXPORT_DEBUG=1), 130 interrupted. Nothing here imports torch until a
command runs, so `--help` is quick.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from .. import __version__
from ..io.errors import LoraExportError, VerifyError

if TYPE_CHECKING:
    from ..records import CheckedReport


def split_base(paths: tuple[Path, ...], strict_base: bool) -> tuple[Path, list[Path]]:
    """[BASE] ADAPTER...: the base given, or the one the first adapter names; adapters checked against it."""
    from ..model.hub import base_and_adapters

    return base_and_adapters(list(paths), strict_base, warn=_echo_err, log=_echo_err)


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """ "1x128,16x256" → ((1, 128), (16, 256))."""
    out = []
    for part in text.split(","):
        b, _, s = part.strip().lower().partition("x")
        if not (b.isdigit() and s.isdigit()) or int(b) < 1 or int(s) < 1:
            raise ValueError(f"bad shape {part!r}: write BATCHxSEQ, e.g. 1x128,16x256")
        out.append((int(b), int(s)))
    return tuple(out)


class Shapes(click.ParamType):
    """BATCHxSEQ[,BATCHxSEQ…], checked before any work starts."""

    name = "BATCHxSEQ,…"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            return parse_shapes(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    return bool(os.environ.get("LORA_EXPORT_DEBUG")) or bool(root and root.params.get("debug"))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `with` and `finally` on the way out runs: partial outputs, locks,
    temporary folders and child processes are removed, as they are on Ctrl-C."""


def _terminate_like_interrupt() -> None:
    import signal

    def raise_terminated(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise Terminated()

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, raise_terminated)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # started in the background by a shell: Ctrl-C still ends us
        signal.signal(signal.SIGINT, signal.default_int_handler)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The one place where outcomes become exit codes and `Error:` lines."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _terminate_like_interrupt()
        try:
            _check_report_files(kwargs)
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # usage errors: Click prints them and exits 2
        except LoraExportError as e:
            click.echo("Error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()), err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:
            what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
            click.echo(f"Error: {what}; no unfinished output was kept (run the command again)", err=True)
            sys.exit(130)
        except OSError as e:  # a full or read-only disk under a report file, say: one line, not a traceback
            from ..io.outputs import DISK_ERRNOS, temp_hint

            if _debug():
                raise
            if e.errno not in DISK_ERRNOS:
                _internal_error(e)
            hint = temp_hint(Path(str(e.filename))) if e.filename else ""
            click.echo(f"Error: {e.filename or 'a file'}: {e.strerror or e}: {DISK_ERRNOS[e.errno]}{hint}", err=True)
            sys.exit(2)
        except Exception as e:
            if _debug():
                raise
            _internal_error(e)

    return wrapper


REPORT_FILES = {"json_file": "--json", "junit_file": "--junit", "markdown_file": "--markdown", "plot_file": "--plot"}


def _check_report_files(params: dict[str, Any]) -> None:
    """A report file (--json, --junit, --markdown, --plot) outside every folder the command reads or writes: inside
    an input it would change the input (a merged folder or a package lists its files), inside the output it would
    be a file the output's manifest does not list."""
    from ..io.errors import OutputError

    reports = {name: params[name] for name in REPORT_FILES if params.get(name) is not None}
    paths = [p for k, v in params.items() if k not in reports for p in (v if isinstance(v, tuple) else (v,))]
    for name, report in reports.items():
        resolved = report.resolve()
        for path in (p for p in paths if isinstance(p, Path)):
            target = path.resolve()
            if resolved == target or (resolved.parent.is_relative_to(target) and not target.is_file()):
                raise OutputError(
                    f"{REPORT_FILES[name]} {report} is {'' if resolved == target else 'inside '}{path}, which this "
                    "command reads or writes: write the report outside it"
                )


def _internal_error(e: BaseException) -> NoReturn:
    first = str(e).splitlines()[0] if str(e) else ""
    click.echo(
        f"Error: internal error ({type(e).__name__}: {first}); this is a bug in lora-export: please report it with "
        "the output of the same command run with --debug",
        err=True,
    )
    sys.exit(3)


def conclude(
    report: CheckedReport, text: str | None, suite: str, json_file: Path | None = None, junit_file: Path | None = None
) -> None:
    """The one path of a checking command's outcome: print its report (unless `text` is None: printed already),
    write its JSON and JUnit files, and fail (exit 1) when a check failed."""
    from ..render.machine import to_json, write_junit

    if text is not None:
        click.echo(text)
    if json_file:
        json_file.write_text(to_json(report.to_dict()) + "\n", encoding="utf-8")  # type: ignore[attr-defined]
    if junit_file:
        write_junit(junit_file, suite, report.checks)
    if not report.passed:
        failed = report.failed or ["no check ran"]
        raise VerifyError(f"{len(failed)} check(s) failed: {', '.join(failed)}")


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="lora-export")
@click.option("--debug", is_flag=True, help="Show the traceback of an internal error (or set LORA_EXPORT_DEBUG=1).")
def main(debug: bool) -> None:
    """Merge PEFT LoRA adapters into their base model, prove the result, export it.

    \b
    Example:
      lora-export merge ./smollm2 ./adapters/caps -o ./merged
    """
