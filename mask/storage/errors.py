"""The storage errors (both derive from :class:`mask.errors.MaskError`)."""

from __future__ import annotations

from mask.errors import MaskError


class StorageError(MaskError, ValueError):
    """Bad URI, path traversal, damaged or inconsistent artifact; the message names the path."""


class ArtifactNotFound(StorageError):
    """No committed ``_MANIFEST.json`` at an artifact; the message names the URI."""
