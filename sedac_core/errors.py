"""Errors a user can cause. Each carries a one-line, actionable message; the CLI prints it without a traceback."""

from __future__ import annotations


class SedacError(Exception):
    """Base class: `str(err)` is the whole message a user sees (problem + fix)."""

    exit_code = 2


class ConfigError(SedacError):
    """A config file or option is wrong (unknown key, out-of-range value, bad YAML)."""


class ModelLoadError(SedacError):
    """A model spec cannot be resolved or loaded."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model loads, but the engine cannot drive its decoder stack layer by layer."""


class PromptTooLongError(SedacError):
    """The prompt (plus the requested new tokens) does not fit the model's context window."""


class SessionFileError(SedacError):
    """A session (JSONL) file is missing, not a session, or malformed."""


class AppCrashed(SedacError):
    """The chat app (or replay) stopped on an unexpected error: a bug, not the user's doing. The message names the
    error, where the full traceback was written, and where the session file is."""

    exit_code = 1
