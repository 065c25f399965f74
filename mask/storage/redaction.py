"""Credentials: detection and redaction (used by the store, manifests and mask.tracking)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from mask.storage.errors import StorageError

logger = logging.getLogger(__name__)


# Option keys that would carry credentials; refused (the AWS chain provides them).
_CREDENTIAL_OPTION_KEYS = frozenset({
    "key", "secret", "token", "password", "username", "aws_access_key_id", "aws_secret_access_key",
    "aws_session_token", "access_key", "secret_key", "session_token",
})


# Words that make a key name a credential ("aws_secret_access_key", "MLFLOW_TRACKING_TOKEN", "dbPassword"),
# matched on whole words so that "tokenizer", "max_tokens" or "author" stay visible.
_SECRET_WORDS = frozenset({"secret", "secrets", "password", "passwd", "pwd", "passphrase", "token", "credential",
                           "credentials", "apikey", "auth", "authorization", "signature", "cookie"})


_SECRET_WORD_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"),
                                ("session", "key"), ("account", "key"), ("sas", "token"),
                                ("customer", "key")})  # SSE-C: s3_additional_kwargs.SSECustomerKey


_SECRET_VALUE_RES = (
    re.compile(r"\b(AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[A-Z0-9]{16}\b"),  # AWS access key ids
    re.compile(r"\b(ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}\b"),  # GitHub tokens
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}\b"),
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"),  # Slack tokens
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"),  # API secret keys of the "sk-" family
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),
)


# scheme://user:password@host → scheme://***@host (and scheme://token@host for http(s)).
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s:]*:[^/@\s]*)@")


REDACTED = "***"


def is_secret_key(key: str) -> bool:
    """Whether a (possibly dotted) key names a credential, e.g. ``storage.options.secret``.

    Args:
        key: a key such as ``aws_secret_access_key`` or ``tracking.password``.

    Returns:
        True when the last dotted segment looks like a credential name.
    """
    last = str(key).rsplit(".", 1)[-1]
    if last.lower() in _CREDENTIAL_OPTION_KEYS:
        return True
    words = [w.lower() for w in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", last)]
    return any(w in _SECRET_WORDS for w in words) or any(p in _SECRET_WORD_PAIRS for p in zip(words, words[1:], strict=False))


def redact_text(text: str) -> str:
    """Replace credential-looking substrings of ``text`` (AWS key ids, tokens, ``user:pass@``) by ``***``."""
    out = _USERINFO_RE.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    for rx in _SECRET_VALUE_RES:
        out = rx.sub(REDACTED, out)
    return out


def redact(obj: Any, key: str = "") -> Any:
    """Deep copy of ``obj`` with credential-looking keys' values and substrings replaced by ``***``.

    Args:
        obj: JSON-like value (dicts, lists, scalars).
        key: key under which ``obj`` sits (used for the key-name rule).

    Returns:
        The redacted copy; non-string scalars are kept as they are unless their key is secret.
    """
    if key and is_secret_key(key) and obj not in (None, "", {}, []):
        return REDACTED
    if isinstance(obj, dict):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def _check_options(options: dict[str, Any]) -> None:
    def walk(d: Any) -> Iterable[str]:
        if isinstance(d, dict):
            for k, v in d.items():
                yield str(k)
                yield from walk(v)

    bad = sorted(k for k in walk(options) if k.lower() in _CREDENTIAL_OPTION_KEYS)
    if bad:
        raise StorageError(f"storage options carry credentials ({', '.join(bad)}); they are not accepted "
                           "here: use the AWS environment variables or credential chain")
