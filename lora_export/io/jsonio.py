"""JSON files read and written by the tool: one object per file, typed field access, one error naming the file, the
field and the fix. The loaders of lora_export.records are built on it."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn, TypeVar

from .errors import InputError, UnsafeInputError

T = TypeVar("T")


def read_json_object(
    path: Path, missing_hint: str, error: type[Exception] = InputError, fix: str = ""
) -> dict[str, Any]:
    """A JSON object from `path`, or one error naming the file, what is wrong and the fix."""
    if not path.is_file():
        raise InputError(f"{path} is missing: {missing_hint}")
    data = _parse(path, error, fix)
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}{fix}")
    return data


def json_text(data: Any) -> str:
    """The JSON text this tool writes for `data` (every file, report and --json output): strict JSON that any parser
    reads — a float that is not a number (NaN, ±infinity: a diverged metric, an overflowing ΔW) is written as null,
    since JSON has no such values; anything else that is not JSON (a Path, a dtype) as its text."""
    return json.dumps(finite_json(data), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n"


def finite_json(data: Any) -> Any:
    """`data` with every non-finite float replaced by None, mappings' keys as text, tuples as lists."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, Mapping):
        return {str(k): finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    return data


def write_json(path: Path, data: Any) -> None:
    path.write_text(json_text(data), encoding="utf-8")


class Fields:
    """Typed access to one JSON object read from `path`: every mistake is one InputError naming the file and field."""

    def __init__(self, data: Any, path: Path | str, where: str = "", fix: str = "", label: str = "") -> None:
        self.path, self.where, self.fix, self.label = Path(path), where, fix, label
        if not isinstance(data, Mapping):
            self.fail("", f"expected a JSON object, found {type(data).__name__}")
        self.data: Mapping[str, Any] = data

    def fail(self, key: str, problem: str) -> NoReturn:
        name = f"{self.where}.{key}" if self.where and key else self.where or key
        fix = f"; {self.fix}" if self.fix else ""
        label = f"{self.label}: " if self.label else ""
        raise InputError(
            f"{self.path}: {label}field `{name}` {problem}{fix}" if name else f"{self.path}: {label}{problem}{fix}"
        )

    def get(
        self,
        key: str,
        kind: type[T] | tuple[type, ...],
        default: Any = ...,
        optional: bool = False,
        finite: bool = True,
    ) -> Any:
        if key not in self.data or (optional and self.data[key] is None):
            if default is ...:
                self.fail(key, "is missing")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:  # JSON true is not a number
            self.fail(key, f"must be {' or '.join(k.__name__ for k in kinds)}, found {value!r}")
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds):
            self.fail(key, f"must be {' or '.join(k.__name__ for k in kinds)}, found {type(value).__name__}")
        if finite and isinstance(value, float) and not math.isfinite(value):
            self.fail(key, f"must be a finite number, found {value}")
        return value

    def choice(self, key: str, allowed: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(key, str, default)
        if value not in allowed:
            self.fail(key, f"must be one of {', '.join(allowed)}, found {value!r}")
        return str(value)

    def sub(self, key: str, default: Any = ...) -> Fields | None:
        value = self.get(key, dict, default)
        return None if value is None else self.child(value, f"{self.where}.{key}" if self.where else key)

    def child(self, data: Any, where: str) -> Fields:
        return Fields(data, self.path, where, self.fix, self.label)

    def items(self, key: str, default: Any = ...) -> list[Fields]:
        values = self.get(key, list, default)
        name = f"{self.where}.{key}" if self.where else key
        return [self.child(v, f"{name}[{i}]") for i, v in enumerate(values or [])]

    def strings(self, key: str, default: Any = ...) -> tuple[str, ...]:
        values = self.get(key, list, default)
        if values is None:
            return ()
        if not all(isinstance(v, str) for v in values):
            self.fail(key, "must be a list of strings")
        return tuple(values)


def relative_name(name: str, where: Fields) -> str:
    """A file name inside a package or model folder: relative, no `..`, no backslashes."""
    if not name or name.startswith("/") or "\\" in name or ".." in PurePosixPath(name).parts:
        raise UnsafeInputError(
            f"{where.path}: file name {name!r} points outside its folder: refusing to read it; {where.fix}"
        )
    return name


def read_text(path: Path, fix: str) -> str:
    """A UTF-8 text file, or one error naming the file and the fix (not a UnicodeDecodeError traceback)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); {fix}") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e}); {fix}") from None


def _unique_keys(path: Path, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise InputError(f"{path}: key {twice[0]!r} is given twice; give each variant (and field) once")
    return dict(pairs)


def read_json_strict(path: Path, fix: str) -> Any:
    """JSON written by a person, with no key given twice (a second definition would silently win), as read_yaml."""
    try:
        return json.loads(read_text(path, fix), object_pairs_hook=functools.partial(_unique_keys, path))
    except (json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{path}: not valid JSON ({str(e).splitlines()[0]}); {fix}") from None


def read_yaml(path: Path, fix: str) -> Any:
    """YAML with no aliases (no alias bombs) and no key given twice (a second definition would silently win)."""
    import yaml

    class Strict(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise yaml.YAMLError(f"aliases (*name) are not accepted, {self.peek_event().start_mark}")
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.YAMLError(f"key {key!r} is given twice, {key_node.start_mark}")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(read_text(path, fix), Loader=Strict)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())
        raise InputError(f"{path}: not valid YAML here ({first[:200]}); {fix}") from None


def read_json(path: Path, fix: str) -> Any:
    if not path.is_file():
        raise InputError(f"{path} is missing; {fix}")
    return _parse(path, InputError, f"; {fix}")


def _parse(path: Path, error: type[Exception], fix: str) -> Any:
    """The JSON in `path`, or `error` naming the file and the parser's first line ("not valid JSON (…){fix}")."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise error(f"{path}: not valid JSON ({first}){fix}") from None
