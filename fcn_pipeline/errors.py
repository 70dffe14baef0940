"""Exceptions that carry a message meant for the person running the pipeline."""

from __future__ import annotations


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
        self.problems = sorted(problems)
        lines = [f"{summary}: {len(self.problems)} problem(s)"]
        lines += [f"  {path}: {reason}" for path, reason in self.problems[: self.max_listed]]
        if len(self.problems) > self.max_listed:
            lines.append(f"  ... and {len(self.problems) - self.max_listed} more")
        super().__init__("\n".join(lines))


class CheckpointError(PipelineError):
    """A model file or training checkpoint is missing, corrupt or does not fit the data."""


class TrainingDivergedError(PipelineError):
    """The training loss became NaN or infinite (the message names the step and lr)."""
