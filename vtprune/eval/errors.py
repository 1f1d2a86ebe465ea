"""Errors raised for bad user input to the evaluation subsystem (shown as a one-line message by the CLI)."""

from __future__ import annotations

from vtprune.errors import UserInputError


class EvalInputError(UserInputError):
    """Bad user input detected before any work starts: unknown task/split/parser, missing columns, ..."""


class DatasetError(EvalInputError):
    """A dataset could not be found or does not have the schema the task needs."""


class RunDirError(EvalInputError):
    """A result folder exists but cannot be used (e.g. unreadable stored configuration)."""
