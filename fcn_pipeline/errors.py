"""Exceptions that carry a message meant for the person running the pipeline."""

from __future__ import annotations

import os


class PipelineError(Exception):
    """Base class: the message names the file, key or value and what is wrong."""


class ConfigError(PipelineError):
    """``params.yaml`` (or a command-line override) is invalid."""


class DatasetError(PipelineError):
    """An ingested dataset directory is missing, incomplete or of another schema."""


class InvalidInputError(PipelineError):
    """Source files failed validation; ``problems`` lists ``(path, reason)`` pairs."""

    max_listed = 20

    def __init__(self, summary: str, problems: list[tuple[str, str]]):
        self.problems = sorted((printable(path), reason) for path, reason in problems)
        lines = [f"{summary}: {len(self.problems)} problem(s)"]
        lines += [f"  {path}: {reason}" for path, reason in self.problems[: self.max_listed]]
        if len(self.problems) > self.max_listed:
            lines.append(f"  ... and {len(self.problems) - self.max_listed} more")
        super().__init__("\n".join(lines))


class CheckpointError(PipelineError):
    """A model file or training checkpoint is missing, corrupt or does not fit the data."""


class TrainingDivergedError(PipelineError):
    """The training loss became NaN or infinite (the message names the step and lr)."""


class OutputError(PipelineError):
    """An output could not be written: no space left, read-only, not a directory, ..."""


def printable(path: str | os.PathLike) -> str:
    """``path`` as text that can always be printed and logged.

    A file name that is not valid UTF-8 reaches Python as a string with lone
    surrogates (``surrogateescape``); its undecodable bytes are shown as ``\\xNN``.
    """
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a surrogate that no file name produces
        raw = os.fspath(path).encode("utf-8", errors="backslashreplace")
    return raw.decode("utf-8", errors="backslashreplace")


def is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8: a non-UTF-8 file name or command-line argument
    reaches Python with lone surrogates, which Parquet, JSON and YAML cannot hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def describe_os_error(error: OSError, path: str | os.PathLike) -> str:
    """``<file>: <cause>`` for an operating-system error met while working on ``path``.

    Names the file the system call failed on when the error carries one (``mkdir``,
    ``open``), else ``path``: a failed ``write`` (no space left) names no file.
    """
    named = isinstance(error.filename, str | bytes | os.PathLike)  # not a file descriptor
    where = printable(error.filename if named else path)
    reason = error.strerror or str(error) or type(error).__name__
    if error.filename2 is not None:
        reason += f" (-> {printable(error.filename2)})"
    return f"{where}: {reason}"


def load_error_reason(error: Exception) -> str:
    """The one line of a ``torch.load`` error that says what is wrong with the file: for
    a pickle refused by ``weights_only=True``, the unpickler's finding, without
    PyTorch's advice to load the file unsafely (which would run untrusted code)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        tail = text.split("WeightsUnpickler error:", 1)[1]
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        detail = lines[0] if lines and not lines[0].startswith("Check the") else "refused"
        return f"holds objects other than tensors and plain values: {detail.split('. ')[0]}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
