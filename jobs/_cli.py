"""Shared argument parsing for the thin job entry points: ``--config FILE`` plus dotted overrides."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mask.config import ConfigError, MaskConfig, load_config


def parse(argv: list[str] | None, description: str, default_config: str | None = "demo") -> MaskConfig:
    """Parse ``[--config FILE] [key.path=value ...]`` into a validated config (errors before any work)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=default_config,
                   help="YAML config file or a name under configs/ (default: %(default)s, the embedded default)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.latent_dim=256 storage.root=s3://b/p")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("urllib3", "botocore", "s3fs", "aiobotocore", "fsspec", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def print_summary(summary: dict) -> None:
    print(json.dumps(summary, indent=2, default=str))
