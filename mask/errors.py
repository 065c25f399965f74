"""The project's error base: every error ``mask`` raises on purpose derives from :class:`MaskError`.

A job catches ``MaskError`` at its entry point and prints one line naming the input and the fix
(``jobs/_cli.py``); anything else is a bug and keeps its traceback. Most subclasses also derive from
``ValueError`` (bad input), so callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations


class MaskError(Exception):
    """Base of every project-defined error.

    ``exit_code`` is what a job exits with when this error ends it: 2 for bad input (the default, as
    argparse and config errors), 1 for a run that failed for another reason (a non-finite loss, a lost
    lease).
    """

    exit_code = 2
