"""Where results go: one pydantic model per destination kind, chosen by `type` in the config.

Secrets are never values here: `password_env` / `token_env` name environment variables that
are read when a sender is made (`secret`). Relative paths resolve against the config file's
folder when the config loader passes `context={"base": folder}`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

from plugin.config_types import AETitle, ConfigPath, EnvName, Seconds, environment_secret


class DestinationError(ValueError):
    """A destination that cannot be used as configured; the message names the key and fix."""


def _http_url(value: str) -> str:
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


HttpUrl = Annotated[str, AfterValidator(_http_url)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DicomTls(_Model):
    ca: ConfigPath | None = None
    """PEM bundle of CAs trusted for the peer's certificate; none: the system's CAs."""
    cert: ConfigPath | None = None
    """Our client certificate (PEM), for peers that require one; needs `key`."""
    key: ConfigPath | None = None
    server_name: str | None = None
    """Name checked against the peer's certificate; default: the destination's host."""
    verify_hostname: bool = True

    @model_validator(mode="after")
    def _cert_with_key(self) -> DicomTls:
        if (self.cert is None) != (self.key is None):
            raise ValueError("give both cert and key for a client certificate, or neither")
        return self


class DicomDestination(_Model):
    """A DICOM C-STORE SCP (PACS, Orthanc, VNA)."""

    type: Literal["dicom"]
    name: Name
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    called_ae: AETitle
    calling_ae: AETitle = "MAMMO_AI"
    tls: DicomTls | None = None
    connect_timeout_seconds: Seconds = 10
    acse_timeout_seconds: Seconds = 30
    dimse_timeout_seconds: Seconds = 60
    network_timeout_seconds: Seconds = 60
    max_pdu: int = Field(16382, ge=0)
    """Largest PDU we accept from the peer; 0 is unlimited. What we send is bounded by the
    peer's own maximum."""


class DicomwebDestination(_Model):
    """A DICOMweb service; instances go by STOW-RS to `{url}/studies`."""

    type: Literal["dicomweb"]
    name: Name
    url: HttpUrl
    """Base URL of the DICOMweb service, e.g. https://pacs.example.org/dicom-web."""
    username: str | None = None
    password_env: EnvName | None = None
    token_env: EnvName | None = None
    """Environment variable holding a bearer token (instead of username and password)."""
    ca: ConfigPath | None = None
    """PEM bundle of CAs trusted for https; none: the system's CAs."""
    timeout_seconds: Seconds = 60

    @model_validator(mode="after")
    def _one_auth(self) -> DicomwebDestination:
        _check_basic_auth(self.username, self.password_env)
        if self.token_env and self.username:
            raise ValueError("use either token_env or username with password_env, not both")
        return self


class OrthancDestination(_Model):
    """An Orthanc server; instances go by its REST API (POST /instances)."""

    type: Literal["orthanc"]
    name: Name
    url: HttpUrl
    """Orthanc's HTTP base URL, e.g. http://localhost:8042."""
    username: str | None = None
    password_env: EnvName | None = None
    ca: ConfigPath | None = None
    timeout_seconds: Seconds = 60

    @model_validator(mode="after")
    def _auth(self) -> OrthancDestination:
        _check_basic_auth(self.username, self.password_env)
        return self


class FolderDestination(_Model):
    """A local or mounted folder; each object lands atomically as `<SOPInstanceUID>.dcm`."""

    type: Literal["folder"]
    name: Name
    path: ConfigPath


Destination = Annotated[
    DicomDestination | DicomwebDestination | OrthancDestination | FolderDestination,
    Field(discriminator="type"),
]


def _check_basic_auth(username: str | None, password_env: str | None) -> None:
    if (username is None) != (password_env is None):
        raise ValueError(
            "give username together with password_env (the environment variable holding the "
            "password), or neither"
        )


def secret(destination: DicomwebDestination | OrthancDestination, key: str) -> str | None:
    """The value of the environment variable that `destination.<key>` names; None when the key
    is unset."""
    what = f"destination {destination.name}: {key}"
    return environment_secret(getattr(destination, key), what, DestinationError)
