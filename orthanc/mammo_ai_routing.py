"""Routes each stable mammography study in Orthanc to the mammo-ai listener, exactly once.

Orthanc's "stable study" event lives only in memory: a restart inside the StableAge window loses
it. So the routing does not trust events; it follows Orthanc's durable change log (/changes):

- every study touched by a NewInstance change is *pending* until all its mammograms are routed
  (or it has none);
- a pending study is routed when Orthanc logged a StableStudy change after its last new
  instance, or, after a restart, when its LastUpdate is older than StableAge;
- each routed instance gets the metadata `MammoAiRouted` (in Orthanc's database, beside the
  instance), so a study that changes again (our results arriving, a late image) sends only what
  was never sent;
- the checkpoint, the change sequence before the oldest pending study, is a global property in
  Orthanc's database; on startup the scan resumes from it.

All REST work happens on one background thread; Orthanc's callbacks only wake it.
"""

from __future__ import annotations

import calendar
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mammo_ai_rest import Rest

# Mammography image storage classes (integration-anchors §5.1): sent whatever their Modality.
MAMMOGRAPHY_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray, For Presentation
        "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray, For Processing
        "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis
        "1.2.840.10008.5.1.4.1.1.13.1.4",  # Breast Projection X-Ray, For Presentation
        "1.2.840.10008.5.1.4.1.1.13.1.5",  # Breast Projection X-Ray, For Processing
    }
)
# Projection images that count as mammograms when their series says Modality MG.
_PROJECTION_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography
        "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray, For Presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray, For Processing
    }
)


@dataclass(frozen=True)
class RoutingSettings:
    modality: str = "mammoai"
    stable_age: int = 60
    checkpoint_property: int = 4602
    routed_metadata: str = "MammoAiRouted"
    route_existing_on_first_start: bool = False
    retry_delays: tuple[int, ...] = (10, 60, 300, 900)
    poll_interval: float = 5.0
    result_manufacturers: frozenset[str] = frozenset({"mammo-ai-plugin"})
    job_timeout: float = 900.0


@dataclass
class _Pending:
    first_seq: int
    stable: bool = False
    attempts: int = 0
    retry_at: float = 0.0


class Router:
    def __init__(
        self,
        rest: Rest,
        settings: RoutingSettings,
        properties: tuple[Callable[[int, str], str], Callable[[int, str], None]],
        log: Callable[[str], None],
    ) -> None:
        self.rest = rest
        self.settings = settings
        self._get_property, self._set_property = properties
        self._log = log
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: dict[str, _Pending] = {}
        self._scanned = 0
        self._checkpoint = 0
        self._ours: dict[str, bool] = {}
        self.routed_instances = 0
        self.routed_studies = 0

    # -- called from Orthanc's callbacks: cheap ---------------------------------------------

    def wake(self) -> None:
        self._wake.put(None)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mammo-ai-routing", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def status(self) -> dict:
        return {
            "Checkpoint": self._checkpoint,
            "Scanned": self._scanned,
            "PendingStudies": len(self._pending),
            "RoutedStudies": self.routed_studies,
            "RoutedInstances": self.routed_instances,
        }

    # -- the background thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._load_checkpoint()
        except Exception as e:  # noqa: BLE001 - a thread must log, not die silently
            self._log(f"mammo-ai routing: cannot read the routing checkpoint, routing is off: {e}")
            return
        while not self._stop.is_set():
            try:
                self._reconcile()
            except Exception as e:  # noqa: BLE001 - keep routing alive; the next pass retries
                self._log(f"mammo-ai routing: pass failed, retrying in a moment: {e!r}")
            try:
                self._wake.get(timeout=self.settings.poll_interval)
                while True:  # one pass serves every wake-up queued meanwhile
                    self._wake.get_nowait()
            except queue.Empty:
                pass

    def _load_checkpoint(self) -> None:
        stored = self._get_property(self.settings.checkpoint_property, "")
        if stored:
            self._checkpoint = int(stored)
        elif self.settings.route_existing_on_first_start:
            self._checkpoint = 0
        else:
            self._checkpoint = int(self.rest.get("/changes?last")["Last"])
            self._set_property(self.settings.checkpoint_property, str(self._checkpoint))
        self._scanned = self._checkpoint

    def _reconcile(self) -> None:
        self._scan_changes()
        now = time.time()
        for study_id, pending in sorted(self._pending.items(), key=lambda kv: kv[1].first_seq):
            if self._stop.is_set():
                return
            if pending.retry_at > now:
                continue
            if self._settle(study_id, pending):
                del self._pending[study_id]
        if not self._pending:
            self._ours.clear()  # a cache for pending studies only
        self._save_checkpoint()

    def _scan_changes(self) -> None:
        while not self._stop.is_set():
            answer = self.rest.get(f"/changes?since={self._scanned}&limit=500")
            for change in answer["Changes"]:
                self._note(change)
            self._scanned = max(self._scanned, int(answer["Last"]))
            if answer["Done"] or not answer["Changes"]:
                return

    def _note(self, change: dict) -> None:
        kind, seq = change["ChangeType"], int(change["Seq"])
        if kind == "NewInstance":
            study = self.rest.get(f"/instances/{change['ID']}/study")
            if study is None:  # deleted since
                return
            pending = self._pending.setdefault(study["ID"], _Pending(first_seq=seq))
            pending.stable = False
        elif kind == "StableStudy" and change["ID"] in self._pending:
            self._pending[change["ID"]].stable = True

    def _settle(self, study_id: str, pending: _Pending) -> bool:
        """Route the study if it is due; True when nothing of it is left to route."""
        study = self.rest.get(f"/studies/{study_id}")
        if study is None:
            return True
        candidates = self._unrouted_mammograms(study_id)
        if not candidates:
            return True
        # LastUpdate has whole seconds: one more keeps "quiet" from coming early.
        quiet = _age_seconds(study.get("LastUpdate")) >= self.settings.stable_age + 1
        if not (pending.stable or quiet):
            return False
        if self._store(candidates):
            self._mark_routed(candidates)
            self.routed_studies += 1
            self.routed_instances += len(candidates)
            self._log(f"mammo-ai routing: study {study_id}: sent {len(candidates)} image(s)")
            return True
        delays = self.settings.retry_delays
        delay = delays[min(pending.attempts, len(delays) - 1)]
        pending.attempts += 1
        pending.retry_at = time.time() + delay
        self._log(
            f"mammo-ai routing: study {study_id}: sending to modality "
            f"'{self.settings.modality}' failed (attempt {pending.attempts}); retrying in "
            f"{delay} s. Check that the listener (`plugin serve`) runs and that "
            f"DicomModalities.{self.settings.modality} names its AE title, host and port."
        )
        return False

    def _unrouted_mammograms(self, study_id: str) -> list[str]:
        out = []
        for series in self.rest.get(f"/studies/{study_id}/series") or []:
            modality = series.get("MainDicomTags", {}).get("Modality", "")
            for instance_id in series.get("Instances", []):
                metadata = self.rest.get(f"/instances/{instance_id}/metadata?expand")
                if metadata is None or self.settings.routed_metadata in metadata:
                    continue
                if not is_mammogram(metadata.get("SopClassUid", ""), modality):
                    continue
                if not self._is_our_result(instance_id):
                    out.append(instance_id)
        return out

    def _is_our_result(self, instance_id: str) -> bool:
        """Derived by this software (IHE AIR Contributing Equipment names us): never routed,
        even if a future output were an image of a mammography SOP class."""
        if instance_id not in self._ours:
            uri = f"/instances/{instance_id}/content/0018,a001"
            items = self.rest.get(uri) or []
            makers = {
                (self.rest.get_bytes(f"{uri}/{i}/0008,0070") or b"")
                .decode(errors="replace")
                .strip(" \x00")
                for i in range(len(items))
            }
            self._ours[instance_id] = bool(makers & self.settings.result_manufacturers)
        return self._ours[instance_id]

    def _store(self, instance_ids: list[str]) -> bool:
        job = self.rest.post(
            f"/modalities/{self.settings.modality}/store",
            {"Resources": instance_ids, "Asynchronous": True},
        )
        deadline = time.time() + self.settings.job_timeout
        while time.time() < deadline and not self._stop.is_set():
            state = (self.rest.get(f"/jobs/{job['ID']}") or {}).get("State")
            if state == "Success":
                return True
            if state in ("Failure", None):
                return False
            time.sleep(0.2)
        return False

    def _mark_routed(self, instance_ids: list[str]) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + " " + self.settings.modality
        for instance_id in instance_ids:
            self.rest.put(
                f"/instances/{instance_id}/metadata/{self.settings.routed_metadata}", stamp
            )

    def _save_checkpoint(self) -> None:
        firsts = [p.first_seq for p in self._pending.values()]
        checkpoint = min(firsts) - 1 if firsts else self._scanned
        if checkpoint != self._checkpoint:
            self._set_property(self.settings.checkpoint_property, str(checkpoint))
            self._checkpoint = checkpoint


def is_mammogram(sop_class_uid: str, series_modality: str) -> bool:
    if sop_class_uid in MAMMOGRAPHY_SOP_CLASSES:
        return True
    return series_modality == "MG" and sop_class_uid in _PROJECTION_SOP_CLASSES


def _age_seconds(last_update: str | None) -> float:
    """Seconds since Orthanc's LastUpdate ("YYYYMMDDTHHMMSS", UTC); 0 when unknown."""
    if not last_update:
        return 0.0
    try:
        then = calendar.timegm(time.strptime(last_update[:15], "%Y%m%dT%H%M%S"))
    except ValueError:
        return 0.0
    return time.time() - then
