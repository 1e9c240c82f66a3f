"""Validated value types shared by the service configuration and the destination models."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, ValidationInfo


def _relative_to_config(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base")
    value = value.expanduser()
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return value


def _ae_title(value: str) -> str:
    if not re.fullmatch(r"[\x20-\x5b\x5d-\x7e]{1,16}", value) or not value.strip():
        raise ValueError(
            "an AE title is 1 to 16 printable ASCII characters, not blank and without backslash"
        )
    return value.strip()


def _database(value: str, info: ValidationInfo) -> Path | str:
    if not value.startswith(("postgresql://", "postgres://")):
        return _relative_to_config(Path(value), info)
    url = urlsplit(value)
    if url.password is not None:
        raise ValueError(
            "put no password in the URL: name the environment variable that holds it in "
            "storage.password_env"
        )
    if not url.hostname or not url.path.strip("/"):
        raise ValueError(
            "a PostgreSQL URL names a host and a database: postgresql://user@host:port/db"
        )
    return value


ConfigPath = Annotated[Path, AfterValidator(_relative_to_config)]
"""A path in the config; relative paths are taken from the config file's folder."""
DatabaseLocation = Annotated[str, AfterValidator(_database)]
"""A SQLite file (a path, relative to the config's folder) or a `postgresql://` URL."""
AETitle = Annotated[str, AfterValidator(_ae_title)]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
"""The name of an environment variable that holds a secret."""
Seconds = Annotated[float, Field(gt=0)]


def environment_secret(env_name: str | None, what: str, error: type[ValueError]) -> str | None:
    """The secret held by the environment variable a config key names; None when no variable
    is named. A named but unset variable is an `error`: the operator asked for a secret, and
    secrets are never read from the config file."""
    if env_name is None:
        return None
    value = os.environ.get(env_name)
    if value is None:
        raise error(
            f"{what} names environment variable {env_name}, which is not set; export it before "
            "starting the service"
        )
    return value
