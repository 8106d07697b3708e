"""Keep credentials out of what the pipeline writes down: MLflow params, checkpoint configs, logs.

`redact(config)` masks, anywhere in a nested mapping:
- the value of every key whose name looks secret (`password`, `token`, `secret_key`, `api_key`, ...);
- the password of a URI's user info (`postgresql://user:pw@host/db` -> `postgresql://user:***@host/db`);
- every credential currently in the environment (`AWS_SECRET_ACCESS_KEY`, `MLFLOW_TRACKING_TOKEN`, any
  variable whose name looks secret), wherever its value appears.
Credentials themselves come from the environment or a mounted secret, never from a config file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
# A name part that marks a credential: AWS_SECRET_ACCESS_KEY, tracking.password, apiKey, HF_TOKEN.
# Parts are whole words (TOKENIZERS_PARALLELISM and max_new_tokens are not secrets).
SECRET_NAME = re.compile(
    r"(?:^|[_.\-])(?:password|passwd|secret|token|credentials?|api_?key|access_?key(?:_?id)?|secret_?key|"
    r"private_?key|session_?token)(?:$|[_.\-])", re.IGNORECASE)
URI_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.\-]*://[^:/?#@\s]*:)[^@/?#\s]+(?P<at>@)", re.IGNORECASE)
MIN_EMBEDDED = 8  # shorter credentials (e.g. the test value "testing") are masked only as whole values


def is_secret_name(name: str) -> bool:
    return SECRET_NAME.search(name) is not None


def has_uri_password(text: str) -> bool:
    """True when `text` holds a URI with a password in its user info (`https://user:pw@host`)."""
    return URI_PASSWORD.search(text) is not None


def environment_secrets(environ: Mapping[str, str] | None = None) -> set[str]:
    """Values of the environment variables whose names look secret (AWS_*_KEY*, *_PASSWORD, *_TOKEN)."""
    environ = os.environ if environ is None else environ
    return {value for name, value in environ.items() if value and is_secret_name(name)}


def redact_text(text: str, secrets: set[str] | None = None) -> str:
    """`text` with URI passwords and the given (default: the environment's) credentials masked."""
    secrets = environment_secrets() if secrets is None else secrets
    if text in secrets:
        return MASK
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= MIN_EMBEDDED:
            text = text.replace(secret, MASK)
    return URI_PASSWORD.sub(rf"\g<head>{MASK}\g<at>", text)


def redact(data: Mapping[str, Any], secrets: set[str] | None = None) -> dict[str, Any]:
    """A copy of a (nested) config mapping with every credential masked; other values keep their type."""
    secrets = environment_secrets() if secrets is None else secrets
    return {key: _redact_value(str(key), value, secrets) for key, value in data.items()}


def _redact_value(key: str, value: Any, secrets: set[str]) -> Any:
    if value is None:
        return None
    if is_secret_name(key):
        return MASK
    if isinstance(value, Mapping):
        return redact(value, secrets)
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value("", v, secrets) for v in value)
    if isinstance(value, str):
        return redact_text(value, secrets)
    return value
