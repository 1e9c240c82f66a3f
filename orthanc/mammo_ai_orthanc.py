"""Orthanc Python plugin of mammo-ai-plugin (Debian 12: orthanc 1.10 + orthanc-python 4.0).

- Routes every stable mammography study to the mammo-ai listener (a DicomModalities entry),
  exactly once, also across Orthanc restarts (mammo_ai_routing.py).
- Serves the overlay viewer: /mammo-ai/studies/{orthanc-study-id} (page), its JSON summary at
  /mammo-ai/api/studies/{id} (mammo_ai_results.py), and a routing status at
  /mammo-ai/routing. The page is one self-contained HTML answer (viewer/ inlined).

Runs in Debian's own python3 (3.11) with the standard library only: no pip packages need to be
visible to Orthanc. Images reach the browser as PNG through Orthanc's own decoders
(/instances/{id}/preview for mammograms, /instances/{id}/frames/{n}/image-uint8 for the
JPEG-LS SEG frames), and the page colours the SEG probabilities itself.
"""

from __future__ import annotations

import json
import os
import sys

import orthanc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mammo_ai_rest import Rest  # noqa: E402 - the folder must be on sys.path first
from mammo_ai_results import study_summary  # noqa: E402
from mammo_ai_routing import Router, RoutingSettings  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
VIEWER_DIR = os.path.join(_HERE, "viewer")
_STUDY_ID = r"([0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{8})"


def _settings(config: dict) -> RoutingSettings:
    own = config.get("MammoAI", {})
    defaults = RoutingSettings()
    return RoutingSettings(
        modality=str(own.get("Modality", defaults.modality)),
        stable_age=int(config.get("StableAge", 60)),
        checkpoint_property=int(own.get("CheckpointProperty", defaults.checkpoint_property)),
        route_existing_on_first_start=bool(
            own.get("RouteExistingOnFirstStart", defaults.route_existing_on_first_start)
        ),
        retry_delays=tuple(int(d) for d in own.get("RetryDelays", defaults.retry_delays)),
        poll_interval=float(own.get("PollInterval", defaults.poll_interval)),
        result_manufacturers=frozenset(
            own.get("ResultManufacturers", sorted(defaults.result_manufacturers))
        ),
    )


def _configuration_problem(config: dict, settings: RoutingSettings) -> str | None:
    modalities = config.get("DicomModalities", {})
    if settings.modality not in modalities:
        return (
            f'"DicomModalities" has no entry "{settings.modality}" for the mammo-ai listener; '
            f'add "{settings.modality}": ["MAMMO_AI", "<host>", 11112] (AE title, host, port of '
            f'`plugin serve`) or set "MammoAI": {{"Modality": "<your entry>"}}'
        )
    if settings.routed_metadata not in config.get("UserMetadata", {}):
        return (
            f'"UserMetadata" lacks "{settings.routed_metadata}"; add '
            f'"UserMetadata": {{"{settings.routed_metadata}": 4601}} (any free id 1024-65535) '
            f"so routed instances can be marked"
        )
    if not 1024 <= settings.checkpoint_property <= 65535:
        return '"MammoAI.CheckpointProperty" must be a global-property id in 1024-65535'
    return None


CONFIG = json.loads(orthanc.GetConfiguration())
SETTINGS = _settings(CONFIG)
PROBLEM = _configuration_problem(CONFIG, SETTINGS)
REST = Rest()
ROUTER = Router(
    REST,
    SETTINGS,
    properties=(orthanc.GetGlobalProperty, orthanc.SetGlobalProperty),
    log=orthanc.LogWarning,
)


def on_change(change_type, level, resource_id) -> None:  # noqa: ARG001 - Orthanc's signature
    # Cheap only: this runs on Orthanc's change thread.
    if change_type == orthanc.ChangeType.ORTHANC_STARTED:
        if PROBLEM:
            orthanc.LogError(f"mammo-ai: routing is off: {PROBLEM}")
        else:
            ROUTER.start()
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        ROUTER.stop()
    elif change_type == orthanc.ChangeType.STABLE_STUDY:
        ROUTER.wake()


# -- HTTP -----------------------------------------------------------------------------------


def _answer_json(output, value, status: int = 200) -> None:
    body = json.dumps(value, indent=1)
    if status == 200:
        output.AnswerBuffer(body, "application/json")
    else:
        output.SendHttpStatus(status, body)


def _get_only(output, request) -> bool:
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return False
    return True


def serve_page(output, uri, **request) -> None:
    if _get_only(output, request):
        output.AnswerBuffer(_viewer_page(), "text/html; charset=utf-8")


def _viewer_page() -> bytes:
    """index.html with its CSS and JS inlined: one request, so a page opened with credentials
    in its URL (kiosk, headless) loads no sub-resource through that URL, which browsers
    block."""

    def read(name: str) -> str:
        with open(os.path.join(VIEWER_DIR, name), encoding="utf-8") as f:
            return f.read()

    page = read("index.html")
    page = page.replace(
        '<link rel="stylesheet" href="viewer.css">', f"<style>\n{read('viewer.css')}</style>"
    )
    page = page.replace(
        '<script src="viewer.js"></script>', f"<script>\n{read('viewer.js')}</script>"
    )
    return page.encode("utf-8")


def serve_summary(output, uri, **request) -> None:
    if not _get_only(output, request):
        return
    summary = study_summary(REST, request["groups"][0])
    if summary is None:
        _answer_json(output, {"error": "no such study in Orthanc"}, 404)
    else:
        _answer_json(output, summary)


def serve_routing(output, uri, **request) -> None:
    if _get_only(output, request):
        _answer_json(output, {"ConfigurationProblem": PROBLEM, **ROUTER.status()})


_EXPLORER_LINK = """
$('#study').live('pagebeforeshow', function() {
  $('#mammo-ai-viewer').remove();
  var b = $('<a>').attr('id', 'mammo-ai-viewer').attr('data-role', 'button')
    .attr('href', '#').attr('data-icon', 'search').attr('data-theme', 'e')
    .text('Mammo AI overlay viewer')
    .click(function(e) {
      e.preventDefault();
      window.open('../mammo-ai/studies/' + $.mobile.pageData.uuid, '_blank');
    });
  b.insertBefore($('#study-delete').parent().parent());
});
"""

orthanc.RegisterOnChangeCallback(on_change)
if CONFIG.get("MammoAI", {}).get("Viewer", True):
    orthanc.RegisterRestCallback(f"/mammo-ai/studies/{_STUDY_ID}", serve_page)
    orthanc.RegisterRestCallback(f"/mammo-ai/api/studies/{_STUDY_ID}", serve_summary)
    orthanc.ExtendOrthancExplorer(_EXPLORER_LINK)
orthanc.RegisterRestCallback("/mammo-ai/routing", serve_routing)
