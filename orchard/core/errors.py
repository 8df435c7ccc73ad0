"""Exit statuses and the expected errors that map to them (the one place that mapping lives)."""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """Process exit codes of the `orchard` CLI."""

    OK = 0
    FAILURES = 1  # the run finished but some items failed (see its report)
    USAGE = 2  # bad flags or arguments
    CONFIG = 3  # a setting is missing or invalid, or a dependency is not installed
    UNAVAILABLE = 4  # a service could not be reached or did not become healthy
    INTERRUPTED = 130


class OrchardError(Exception):
    """An expected failure with a one-line message for the user."""

    exit_status = ExitStatus.FAILURES


class ConfigError(OrchardError):
    """A setting is missing or invalid."""

    exit_status = ExitStatus.CONFIG


class DependencyMissing(OrchardError):
    """A binary or distribution that `make deps` installs is not there."""

    exit_status = ExitStatus.CONFIG


class ServiceUnavailable(OrchardError):
    """A service is down, unreachable or did not become healthy in time."""

    exit_status = ExitStatus.UNAVAILABLE


class DatasetNotFound(OrchardError):
    """A dataset (or split) has no objects under its key prefix."""

    exit_status = ExitStatus.CONFIG


class TableNotFound(OrchardError):
    """There is no images table at the configured location yet."""

    exit_status = ExitStatus.CONFIG


class ItemsFailed(OrchardError):
    """A batch run finished with some failed items (already reported)."""

    exit_status = ExitStatus.FAILURES


class CheckpointError(OrchardError):
    """A weights file is not what it should be: unreadable, altered, or not a plain state_dict."""

    exit_status = ExitStatus.CONFIG


class ForbiddenGlobal(CheckpointError):
    """A pickled weights file names a global outside the few a state_dict needs (it could run code)."""


class UnusableImage(ValueError):
    """A decoded image a model's preprocessing cannot use (e.g. no keypoints for a descriptor model):
    a per-image error, recorded in that image's document and counted, never a failed run."""
