"""Typed errors. Every message names the problem and the fix; the CLI prints them without a trace."""

from __future__ import annotations


class RkSmolVLMError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code = 2


class CheckpointError(RkSmolVLMError):
    """The model source is not a usable SmolVLM checkpoint."""


class TargetError(RkSmolVLMError):
    """An unknown target platform or an invalid target × dtype combination."""


class CalibrationError(RkSmolVLMError):
    """A calibration set that cannot be read or is empty."""


class ToolkitMissingError(RkSmolVLMError):
    """A vendor toolkit or runtime library is not installed."""


class ToolkitFailedError(RkSmolVLMError):
    """A vendor toolkit call returned an error code."""


class AccuracyError(RkSmolVLMError):
    """A converted model scored below the accuracy floor."""

    exit_code = 3


class BundleError(RkSmolVLMError):
    """A bundle that is missing, incomplete, tampered with or from an incompatible version."""


class ImageError(RkSmolVLMError):
    """An image that cannot be decoded or is out of the allowed limits."""
