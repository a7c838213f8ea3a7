"""One exception tree. Only cli/ turns these into `Error: …` and an exit code (cli/main.py: handle_errors)."""

from __future__ import annotations


class LoraExportError(Exception):
    """Base of every error this tool raises on purpose. Exit code 2 (bad input) unless a subclass says otherwise."""

    exit_code = 2


class InputError(LoraExportError):
    """A file or folder is missing, unreadable, or not what it claims to be."""


class CorruptFileError(InputError):
    """A weights file whose structure is broken (header, offsets, sizes)."""


class UnsafeInputError(InputError):
    """Something that would need trust we were not given: pickles without --allow-pickle, paths escaping a folder."""


class AdapterError(LoraExportError):
    """An adapter_config.json or adapter weights file that we cannot merge correctly."""


class UnsupportedError(LoraExportError):
    """A valid PEFT feature this tool refuses rather than merging it wrongly."""


class ShapeMismatchError(AdapterError):
    """Adapter tensors whose shapes do not fit the base model."""


class NonFiniteError(LoraExportError):
    """NaN or Inf in adapter weights or in a merged tensor."""


class OutputError(LoraExportError):
    """The output location is unusable: exists, overlaps an input, or cannot be written."""


class ExportError(LoraExportError):
    """An exporter failed or wrote a graph that does not pass onnx.checker."""


class WorkerError(LoraExportError):
    """A worker process ended without a result (killed, or it could not start). Exit code 3, like an internal error."""

    exit_code = 3


class VerifyError(LoraExportError):
    """A numerical check failed. Exit code 1, distinct from bad input."""

    exit_code = 1
