"""Following an Orthanc server's ``/changes`` feed (:class:`OrthancFollower`), through the one Orthanc client
(:class:`segmap.orthanc.OrthancClient`).

Orthanc's stable events (Lua ``OnStableSeries``) live in memory and are lost when Orthanc restarts inside the
``StableAge`` window; the ``/changes`` feed is persistent and paged, so the follower reads that instead. Its position
(the last change sequence number read) lives in the job store and moves in the same transaction that records the
page's instances (:meth:`JobStore.record_changes`): after a crash of either side the follower reads again from the
last committed page -- nothing is lost, and a page read twice records nothing twice.

Orthanc 1.10 cannot filter ``/changes`` by type, so every page is read and filtered here: ``NewInstance`` becomes an
:class:`Arrival` (UIDs and Modality from Orthanc's main DICOM tags; the file is fetched only when the job runs),
``StableSeries`` marks the series stable. Errors are :class:`OrthancError` with one line naming the URL (never the
credentials).

A feed that does not advance (``Done: false`` with ``Last`` not past the cursor) ends the poll and is not asked
again for a back-off that doubles from ``stall_backoff_s`` up to :data:`MAX_STALL_BACKOFF_S` while it stays stuck; one
poll reads at most :data:`MAX_PAGES_PER_POLL` pages, so even a feed that always has more returns to the loop.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Iterable

import pydicom

from segmap.errors import InputError, OrthancError
from segmap.orthanc import OrthancClient, OrthancNotFound
from segmap.service.spool import Spool, check_uid
from segmap.service.store import Arrival

log = logging.getLogger("segmap.service.orthanc")

#: Longest wait before asking a feed that did not advance again.
MAX_STALL_BACKOFF_S = 60.0
#: Pages read by one poll at most.
MAX_PAGES_PER_POLL = 100


class OrthancFollower:
    """Follows one Orthanc's ``/changes`` into the job store as source ``orthanc:<name>``.

    Holds no state of its own: the cursor is in the store, so a new follower on the same store (a restarted service)
    continues where the last committed page ended.
    """

    def __init__(self, client: OrthancClient, store, spool: Spool, name: str = "main", page_size: int = 100,
                 stall_backoff_s: float = 1.0):
        self.client = client
        self.store = store
        self.spool = spool
        self.name = name
        self.source = f"orthanc:{name}"
        self.page_size = int(page_size)
        self.stall_backoff_s = float(stall_backoff_s)
        self._stalls = 0
        self._resume_at = 0.0

    def poll_once(self) -> int:
        """Read the feed from the stored cursor to its end, committing page by page; returns new instances.

        Raises :class:`OrthancError` when Orthanc cannot be reached; the pages committed before stay committed and the
        next call continues after them.
        """
        if time.monotonic() < self._resume_at:
            return 0  # backing off from a feed that did not advance
        since = self.store.cursor(self.source)
        new = 0
        for _ in range(MAX_PAGES_PER_POLL):
            changes, last, done = self.client.changes(since, self.page_size)
            if changes and last <= since and not done:
                self._stalled(since)
                break
            if not changes:
                if last < since:
                    # Orthanc's change log ends before our cursor: its database was replaced. Its sequence numbers
                    # started again, so read it from the start (recording what the store knows records nothing).
                    log.warning("Orthanc %s (%s): its change log ends at %d, before our cursor %d (database "
                                "replaced?): reading it again from the start", self.name, self.client.url, last,
                                since)
                    self.store.record_changes(self.source, 0, [], [])
                    since = 0
                    continue
                break
            arrivals, stable = self._translate(changes)
            new += self.store.record_changes(self.source, last, arrivals, stable)
            if arrivals or stable:
                log.debug("Orthanc %s: changes %d..%d: %d instances, %d stable series", self.name, since + 1, last,
                          len(arrivals), len(stable))
            since = last
            if self._stalls:
                log.info("Orthanc %s (%s): its change feed moves again (at %d)", self.name, self.client.url, last)
                self._stalls = 0
            if done:
                break
        return new

    def _stalled(self, since: int) -> None:
        """The feed says there is more but did not move past ``since``: wait before asking again, longer each time."""
        wait = min(MAX_STALL_BACKOFF_S, self.stall_backoff_s * 2 ** self._stalls)
        if not self._stalls:
            log.warning("Orthanc %s (%s): /changes answers Done: false without moving Last past %d; asking again "
                        "after a back-off (up to %.0f s)", self.name, self.client.url, since, MAX_STALL_BACKOFF_S)
        self._stalls += 1
        self._resume_at = time.monotonic() + wait

    def _translate(self, changes: Iterable[dict]) -> tuple[list[Arrival], list[str]]:
        arrivals: list[Arrival] = []
        stable: list[str] = []
        series_cache: dict[str, tuple[str, str, str] | None] = {}  # Orthanc series id -> (study, series, modality)
        for change in changes:
            kind, orthanc_id = change.get("ChangeType"), change.get("ID")
            if kind == "NewInstance":
                arrival = self._arrival(orthanc_id, series_cache)
                if arrival is not None:
                    arrivals.append(arrival)
            elif kind == "StableSeries":
                uids = self._series_uids(orthanc_id, series_cache)
                if uids is not None:
                    stable.append(uids[1])
        return arrivals, stable

    def _arrival(self, orthanc_id: str, series_cache: dict) -> Arrival | None:
        try:
            instance = self.client.instance(orthanc_id)
        except OrthancNotFound:
            log.info("Orthanc %s: instance %s was deleted before it was read: skipped", self.name, orthanc_id)
            return None
        uids = self._series_uids(instance.get("ParentSeries"), series_cache)
        if uids is None:
            return None
        try:
            sop = check_uid(instance.get("MainDicomTags", {}).get("SOPInstanceUID"), "SOPInstanceUID")
        except InputError as exc:
            log.warning("Orthanc %s: instance %s of series %s: %s: skipped", self.name, orthanc_id, uids[1], exc)
            return None
        study, series, modality = uids
        return Arrival(source=self.source, study_uid=study, series_uid=series, sop_uid=sop, modality=modality,
                       remote_id=orthanc_id)

    def _series_uids(self, orthanc_id: str | None, cache: dict) -> tuple[str, str, str] | None:
        if not orthanc_id:
            return None
        if orthanc_id not in cache:
            cache[orthanc_id] = self._read_series_uids(orthanc_id)
        return cache[orthanc_id]

    def _read_series_uids(self, orthanc_id: str) -> tuple[str, str, str] | None:
        try:
            series = self.client.series(orthanc_id)
            study = self.client.study(series["ParentStudy"])
        except OrthancNotFound:
            log.info("Orthanc %s: series %s was deleted before it was read: skipped", self.name, orthanc_id)
            return None
        except KeyError:
            raise OrthancError(f"Orthanc at {self.client.url}: series {orthanc_id} has no ParentStudy") from None
        tags = series.get("MainDicomTags", {})
        try:
            return (check_uid(study.get("MainDicomTags", {}).get("StudyInstanceUID"), "StudyInstanceUID"),
                    check_uid(tags.get("SeriesInstanceUID"), "SeriesInstanceUID"), str(tags.get("Modality", "")))
        except InputError as exc:
            log.warning("Orthanc %s: series %s: %s: skipped", self.name, orthanc_id, exc)
            return None

    def fetch(self, study_uid: str, series_uid: str, instances: Iterable[tuple[str, str]]) -> list[Path]:
        """Download the series' instances ``(sop_uid, orthanc_id)`` durably into the spool; returns their paths.

        Instances already in the spool are not downloaded again. A file whose UIDs are not the ones Orthanc listed
        (the instance was replaced meanwhile) is refused with :class:`OrthancError`.
        """
        paths = []
        for sop_uid, orthanc_id in instances:
            if self.spool.has(study_uid, series_uid, sop_uid):
                paths.append(self.spool.path(study_uid, series_uid, sop_uid))
                continue
            data = self.client.instance_file(orthanc_id)
            _check_file(data, self.client.url, orthanc_id, study_uid, series_uid, sop_uid)
            try:
                paths.append(self.spool.write(data, study_uid, series_uid, sop_uid))
            except InputError as exc:
                raise OrthancError(f"Orthanc at {self.client.url}: instance {orthanc_id}: {exc}") from None
        return paths

    def is_stable(self, series_uid: str) -> bool:
        """Orthanc's own view: True when every Orthanc series with this UID is stable (False when it has none)."""
        found = [r for r in self.client.lookup(series_uid) if r.get("Type") == "Series"]
        if not found:
            return False
        return all(bool(self.client.series(r["ID"]).get("IsStable")) for r in found)


def _check_file(data: bytes, url: str, orthanc_id: str, study_uid: str, series_uid: str, sop_uid: str) -> None:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
    except Exception as exc:
        raise OrthancError(f"Orthanc at {url}: instance {orthanc_id} is not a readable DICOM file "
                           f"({type(exc).__name__})") from None
    got = (str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")), str(ds.get("SOPInstanceUID", "")))
    if got != (study_uid, series_uid, sop_uid):
        raise OrthancError(f"Orthanc at {url}: instance {orthanc_id} holds SOP {got[2]} of series {got[1]}, expected "
                           f"SOP {sop_uid} of series {series_uid}")
