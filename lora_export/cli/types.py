"""Click types for every option and argument: an input is checked when it is parsed, before any work starts, and a
bad one is a usage error (exit 2) naming the option and the fix. Nothing here imports torch until a value needs it.
"""

from __future__ import annotations

import errno
import math
import os
from pathlib import Path
from typing import Any

import click


def _resolve(value: str, param: Any, ctx: Any, kind: click.ParamType) -> Path:
    """The path as given, after making sure it resolves: a symlink loop is a usage error, not a crash later."""
    path = Path(value)
    try:
        path.resolve(strict=False)
        if path.is_symlink():
            os.stat(path)  # follows the link: a loop raises ELOOP here
    except RuntimeError:  # Python < 3.13: "Symlink loop from …"
        kind.fail(f"{value}: a symlink loop; point it at a real file or folder", param, ctx)
    except OSError as e:
        if e.errno == errno.ELOOP:
            kind.fail(f"{value}: a symlink loop; point it at a real file or folder", param, ctx)
        if e.errno != errno.ENOENT:  # a dangling link: the command's own check names it
            kind.fail(f"{value}: {e.strerror}", param, ctx)
    return path


class Folder(click.ParamType):
    """A folder argument: input folders are checked by the command (with the fix in its message); here, only that
    the path resolves (no symlink loop) and, if it exists, is not a file."""

    name = "directory"

    def convert(self, value: Any, param: Any, ctx: Any) -> Path:
        if isinstance(value, Path):
            value = str(value)
        path = _resolve(value, param, ctx, self)
        if path.is_file():
            self.fail(f"{value} is a file, not a folder", param, ctx)
        if path.exists() and not path.is_dir():  # a FIFO, a socket, a device
            self.fail(f"{value} is not a folder (a FIFO, socket or device); give a folder", param, ctx)
        return path


class ModelFolder(Folder):
    """A BASE or ADAPTER argument: a folder, or a Hugging Face Hub address `org/name[@revision]` when no such path
    exists, resolved through the local cache first (then the network, unless HF_HUB_OFFLINE) by lora_export.model.hub."""

    name = "folder | org/name[@revision]"

    def convert(self, value: Any, param: Any, ctx: Any) -> Path:
        from ..io.errors import InputError
        from ..model import hub

        text = str(value)
        _resolve(str(Path(text).expanduser()), param, ctx, self)  # a loop or a name too long: refused here
        if not Path(text).expanduser().exists() and hub.parse_address(text) is not None:
            try:
                return hub.resolve_address(text, "any", log=lambda m: click.echo(m, err=True))
            except InputError as e:
                self.fail(str(e), param, ctx)
        return super().convert(value, param, ctx)


class InputFile(click.ParamType):
    """A file the command reads (variants, prompts): it exists and is a regular file (not a FIFO, not a folder)."""

    name = "file"

    def convert(self, value: Any, param: Any, ctx: Any) -> Path:
        path = _resolve(str(value), param, ctx, self)
        if not path.exists():
            self.fail(f"{value} does not exist", param, ctx)
        if not path.is_file():
            self.fail(f"{value} is not a regular file", param, ctx)
        return path


class ReportFile(click.ParamType):
    """A file the command writes (--json, --junit, --markdown, --plot): its folder must exist and be writable now,
    so that a long run does not end in an error after its output was written."""

    name = "file"

    def convert(self, value: Any, param: Any, ctx: Any) -> Path:
        path = _resolve(str(value), param, ctx, self)
        if path.is_dir():
            self.fail(f"{value} is a folder; give a file name in it", param, ctx)
        if path.is_fifo() or path.is_socket():  # writing would wait for a reader that may never come
            self.fail(f"{value} is a FIFO or socket; give a regular file name", param, ctx)
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            self.fail(f"{value}: the folder {parent} does not exist; create it first", param, ctx)
        if os.statvfs(parent).f_flag & os.ST_RDONLY:
            self.fail(f"{value}: the folder {parent} is on a read-only file system; choose a writable one", param, ctx)
        if not os.access(parent, os.W_OK | os.X_OK):
            self.fail(
                f"{value}: the folder {parent} is not writable; fix its permissions or choose another", param, ctx
            )
        return path


class _Parsed(click.ParamType):
    """A value parsed from its text by `parse`, whose ValueError is the usage error Click prints (exit 2)."""

    def parse(self, value: Any) -> Any:
        raise NotImplementedError

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        try:
            return self.parse(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class Size(_Parsed):
    """A byte size such as 5GB, 500MB, 2GiB or a plain byte count: finite and positive."""

    name = "size"

    def parse(self, value: Any) -> int:
        from ..merging.merge import parse_size

        try:
            size = parse_size(str(value))
        except Exception as e:  # the parser's message names the fix
            raise ValueError(str(e)) from None
        if not 1 <= size < 2**62:
            raise ValueError(f"{value!r} is outside 1 byte … 4 EiB")
        return size


class FiniteFloat(_Parsed):
    """A float that is a number (not nan or inf), within [low, high] where given (`positive`: above 0)."""

    name = "float"

    def __init__(self, low: float | None = None, high: float | None = None, positive: bool = False):
        self.low, self.high, self.positive = low, high, positive

    def parse(self, value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"{value!r} is not a finite number")
        if (self.positive and number <= 0) or (self.low is not None and number < self.low):
            raise ValueError(f"{value!r} is below {'or at 0' if self.positive else self.low}: {self._range()}")
        if self.high is not None and number > self.high:
            raise ValueError(f"{value!r} is above {self.high:g}: {self._range()}")
        return number

    def _range(self) -> str:
        low = "0 <" if self.positive else f"{self.low:g} ≤" if self.low is not None else ""
        high = f"≤ {self.high:g}" if self.high is not None else ""
        return f"give a number {low} x {high}".replace("  ", " ").strip()


class MaxMemory(_Parsed):
    """--max-memory: DEVICE=SIZE[,DEVICE=SIZE…] with DEVICE a GPU index, cpu, mps or disk and SIZE a byte size such as
    20GiB — accelerate's max_memory, each size parsed here (bytes) so that a bad one is refused before any work."""

    name = "DEV=SIZE,…"

    def parse(self, value: Any) -> dict[int | str, int]:
        if isinstance(value, dict):
            return value
        limits: dict[int | str, int] = {}
        for item in str(value).split(","):
            device, sep, size = item.strip().partition("=")
            if not sep or not (device.isdigit() or device in ("cpu", "disk", "mps")):
                raise ValueError(
                    f"{item!r}: write DEVICE=SIZE, DEVICE a GPU index, cpu, mps or disk, e.g. 0=20GiB,cpu=64GiB"
                )
            key: int | str = int(device) if device.isdigit() else device
            if key in limits:
                raise ValueError(f"{item!r}: {device} is given twice")
            try:
                limits[key] = SIZE.parse(size)
            except ValueError as e:
                raise ValueError(f"{item!r}: {e}") from None
        return limits


class Device(click.ParamType):
    """A torch device this machine has: cpu, cuda, cuda:N (N below the GPU count), mps."""

    name = "device"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        import torch

        try:
            device = torch.device(str(value))
        except (RuntimeError, TypeError) as e:
            self.fail(
                f"{value!r} is not a device ({str(e).splitlines()[0][:80]}…): use cpu, cuda or cuda:N", param, ctx
            )
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                self.fail(f"{value!r}: this machine's torch sees no CUDA GPU; use cpu", param, ctx)
            if device.index is not None and device.index >= count:
                self.fail(f"{value!r}: this machine has {count} CUDA GPU(s) (cuda:0 … cuda:{count - 1})", param, ctx)
        elif device.type == "mps" and not torch.backends.mps.is_available():
            self.fail(f"{value!r}: MPS is not available on this machine; use cpu", param, ctx)
        elif device.type not in ("cpu", "cuda", "mps"):
            self.fail(f"{value!r}: lora-export runs on cpu, cuda or mps", param, ctx)
        return str(value)


FOLDER = Folder()
MODEL = ModelFolder()
INPUT_FILE = InputFile()
REPORT = ReportFile()
SIZE = Size()
FINITE_FLOAT = FiniteFloat()
DEVICE = Device()
MAX_MEMORY = MaxMemory()
THREADS = click.IntRange(1, 1024)
NEW_TOKENS = click.IntRange(1, 4096)  # greedy tokens generated and compared
SEED = click.IntRange(0, 2**32 - 1)
OPSET = click.IntRange(18, 25)  # the dynamo exporter writes 18–25 (below 18 it keeps 18; 26+ fails onnx's checker)
PARAM_COUNT = click.IntRange(1, 10**12)
SECONDS = FiniteFloat(high=3600, positive=True)
