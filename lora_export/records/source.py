"""Where an input came from on the Hugging Face Hub, as recorded beside the sha256 of its files."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from ..io.errors import InputError

_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubSource:
    """What the user typed, the repository, the revision asked for (None: the default branch) and the commit it
    resolved to."""

    given: str
    repo: str
    revision: str | None
    commit: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> HubSource:
        """A recorded source, checked: given, repo, revision (or null) and a 40-hex commit."""
        ok = (
            isinstance(data, dict)
            and set(data) == {"given", "repo", "revision", "commit"}
            and all(isinstance(data[k], str) for k in ("given", "repo", "commit"))
            and (data["revision"] is None or isinstance(data["revision"], str))
            and _COMMIT.fullmatch(data["commit"]) is not None
        )
        if not ok:
            raise InputError(
                f"a recorded source must be {{given, repo, revision, commit}} with a 40-hex commit: {data!r}"
            )
        return cls(data["given"], data["repo"], data["revision"], data["commit"])
