"""The artifacts lora-export writes and reads back, as frozen dataclasses.

Each record has `to_dict()` (what goes to disk), `write(path)`, and a validating `load(path)` / `from_dict(data, path)`:
the one place a manifest or report read from disk is checked (types, ranges, file names that stay inside their
folder). Code past `load` trusts its record and never indexes a raw dict of the file. No torch here: these modules
are imported by `--help` and by `package --check`, which must stay light.

Every checking command returns a record with `checks` and `passed`; `Check` is the one shape of a check result.
"""

from .checks import Check, CheckedReport, Metrics, VerifyReport
from .inspect import AdapterInspection, ModuleInspection
from .merge import AdapterRecord, FileRecord, MergeManifest, files_of, versions
from .package import MergedVariant, PackageCheck, PackageManifest, SharedLayout
from .pipeline import PipelineReport
from .source import HubSource
from .swap import SwapReport

__all__ = [
    "AdapterInspection",
    "AdapterRecord",
    "Check",
    "CheckedReport",
    "FileRecord",
    "HubSource",
    "MergeManifest",
    "MergedVariant",
    "Metrics",
    "ModuleInspection",
    "PackageCheck",
    "PackageManifest",
    "PipelineReport",
    "SharedLayout",
    "SwapReport",
    "VerifyReport",
    "files_of",
    "versions",
]
