"""Orthanc's REST API called from inside the plugin, as JSON in and out.

Calls go through the Orthanc core in-process (no HTTP, no credentials). A missing resource is
None rather than an exception, because resources vanish between a change event and its
handling (a study deleted by a user) and that is not an error for the plugin.
"""

from __future__ import annotations

import json
from typing import Any

import orthanc

_UNKNOWN_RESOURCE = 17  # OrthancErrorCode_UnknownResource


class Rest:
    def get(self, uri: str) -> Any | None:
        try:
            return json.loads(orthanc.RestApiGet(uri))
        except orthanc.OrthancException as e:
            if _code(e) == _UNKNOWN_RESOURCE:
                return None
            raise

    def get_bytes(self, uri: str) -> bytes | None:
        try:
            return orthanc.RestApiGet(uri)
        except orthanc.OrthancException as e:
            if _code(e) == _UNKNOWN_RESOURCE:
                return None
            raise

    def post(self, uri: str, body: Any) -> Any:
        answer = orthanc.RestApiPost(uri, json.dumps(body))
        return json.loads(answer) if answer else None

    def put(self, uri: str, body: str) -> None:
        orthanc.RestApiPut(uri, body)


def _code(e: Exception) -> int | None:
    try:
        return int(e.args[0])
    except (IndexError, TypeError, ValueError):
        return None
