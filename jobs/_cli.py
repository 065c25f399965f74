"""Shared command line of the thin job entry points: ``--config FILE``, ``--log-level``, the job's own
options and dotted overrides, all in one ``argparse`` parser (so ``--help`` lists every option and a
bad value is an argparse error, exit 2), and :func:`run`, which turns a :class:`mask.errors.MaskError`
into one line on stderr.

A job module reads::

    def build_parser() -> argparse.ArgumentParser:
        p = job_parser(__doc__)
        p.add_argument("--top", type=int, default=10, help="results per query")
        return p

    def main(argv=None) -> dict:
        args, cfg = parse_job(build_parser(), argv)
        ...

    if __name__ == "__main__":
        run(main)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

from mask.config import ConfigError, MaskConfig, load_config
from mask.errors import MaskError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The level the last parse configured; run() prints tracebacks only at DEBUG.
_state = {"log_level": "INFO"}


def job_parser(doc: str | None, default_config: str | None = "demo") -> argparse.ArgumentParser:
    """The parser every job starts from: its docstring as the description, ``--config``,
    ``--log-level`` and the dotted ``overrides``; the job adds its own options."""
    doc = doc or ""
    first, _, rest = doc.strip().partition("\n")
    p = argparse.ArgumentParser(description=first, epilog=rest.strip() or None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=default_config, metavar="FILE",
                   help="YAML config file or a name under configs/ (default: %(default)s)")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                   help="logging level; DEBUG also prints the traceback of a failed job (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="dotted config overrides, e.g. model.latent_dim=256 storage.root=s3://b/p "
                        "index.knowledge=@champion")
    return p


def parse_job(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, MaskConfig]:
    """Parse options and overrides (in any order), configure logging, load the validated config.

    A config error is one line on stderr and exit 2, before any work starts.
    """
    args = p.parse_intermixed_args(argv)
    return args, job_config(args)


def job_config(args: argparse.Namespace) -> MaskConfig:
    """Configure logging at ``args.log_level`` and load ``args.config`` with ``args.overrides``."""
    setup_logging(args.log_level)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {v}")
    return v


def parse(argv: list[str] | None, description: str, default_config: str | None = "demo") -> MaskConfig:
    """``[--config FILE] [--log-level L] [key.path=value ...]`` into a validated config (jobs without
    options of their own)."""
    return parse_job(job_parser(description, default_config), argv)[1]


def setup_logging(level: str) -> None:
    """The project's log format on stderr; framework chatter lowered through the documented knobs.

    Ray: ``RAY_COLOR_PREFIX=0`` (no ANSI colour codes in worker-log prefixes) when stderr is not a
    terminal; Ray Data's and Ray Train's own loggers at WARNING unless ``--log-level DEBUG``.
    """
    _state["log_level"] = level
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    for noisy in ("urllib3", "botocore", "s3fs", "aiobotocore", "fsspec", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def one_line(message: str) -> str:
    """A multi-line message (``invalid configuration:\\n  a: …\\n  b: …``) as one line."""
    lines = [x.strip() for x in str(message).splitlines() if x.strip()]
    if not lines:
        return ""
    head, rest = lines[0], lines[1:]
    return head + (" " + "; ".join(rest) if rest else "")


def user_error(err: BaseException) -> MaskError | None:
    """The :class:`MaskError` behind an exception: itself, its cause/context chain, or what Ray wrapped
    (``RayTaskError.cause``, a Ray Train worker failure)."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError(DatasetError) is a DatasetError whose str is a traceback
        if isinstance(e, MaskError) and not isinstance(cause, MaskError):
            return e
        todo.extend([cause, e.__cause__, e.__context__])
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(failures.values())
    return None


def run(main: Callable[[], object]) -> None:
    """Call a job's ``main()``; a failure is one line on stderr (the traceback only at ``--log-level
    DEBUG``).  Exit 2 for bad input (a :class:`MaskError`; its ``exit_code``), 1 for anything else."""
    try:
        main()
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as e:  # the one place a job's failure becomes its exit status
        if _state["log_level"] == "DEBUG":
            raise
        err = user_error(e)
        if err is not None:
            print(f"error: {one_line(str(err))}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None
        print(f"error: {type(e).__name__}: {one_line(str(e))} (an internal error; rerun with --log-level DEBUG "
              "for the traceback and report it)", file=sys.stderr)
        raise SystemExit(1) from None


def print_summary(summary: dict) -> None:
    print(json.dumps(summary, indent=2, default=str))
