"""What every record kept as one JSON file in its folder shares: where it lives, how it is written, and the one
loader that reads it back through the record's validating `from_dict`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ..io.errors import InputError, OutputError
from ..io.jsonio import json_text, read_json

R = TypeVar("R", bound="StoredRecord")


class StoredRecord:
    """A record stored as `NAME` in its folder. `FIX` is the fix a damaged file's error names; `MISSING`, when set,
    is what a folder without the file is told (else read_json's "… is missing; FIX")."""

    NAME: ClassVar[str]
    FIX: ClassVar[str]
    MISSING: ClassVar[str | None] = None

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[R], data: Any, path: Path) -> R:
        raise NotImplementedError

    def write(self, folder: Path | str) -> None:
        """Write the file, read it back through `load` (the checks every reader applies) and compare: a record that
        does not survive its own reader is never left looking finished."""
        path = Path(folder) / self.NAME
        text = json_text(self.to_dict())
        path.write_text(text, encoding="utf-8")
        if json_text(type(self).load(folder).to_dict()) != text:
            raise OutputError(f"{path} does not read back as written (a faulty disk, or a file changed meanwhile?)")

    @classmethod
    def load(cls: type[R], folder: Path | str) -> R:
        path = Path(folder) / cls.NAME
        if cls.MISSING is not None and not path.is_file():
            raise InputError(f"{folder} has no {cls.NAME}: {cls.MISSING}")
        return cls.from_dict(read_json(path, cls.FIX), path)
