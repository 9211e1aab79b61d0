"""The job's idempotency key and the names derived from it.

The key is a SHA-256 over the input series' UID, the sorted set of its SOP Instance UIDs, the MAP image's content
digest, the MAP's name and the sorted names of its destinations: the same input for the same MAP (same model, same
route) always has the same key, so the store's UNIQUE constraint makes it run and be sent at most once. Two MAPs that
use one image (a clinical and a research route to different PACS) are two jobs. The container (or Kubernetes Job)
and the SEG's UIDs are named from it, so a restart finds what an earlier attempt left instead of repeating it.

Key shapes, by their first line (never change a released one; a new shape gets a new tag):

- ``segmap-job-v1``: series UID, image digest, SOP Instance UIDs (before the MAP's name and destinations counted;
  jobs made by older releases keep these keys, so an unchanged re-send after an upgrade makes one new job per MAP);
- ``segmap-job-v2``: series UID, image digest, MAP name, ``destinations:`` + the sorted destination names joined by
  commas, SOP Instance UIDs.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

from segmap.uids import seeded_uid


def job_key(series_uid: str, sop_instance_uids: Iterable[str], image_digest: str, *, map_name: str,
            destinations: Iterable[str]) -> str:
    """64 hex digits identifying (this exact set of instances of this series, this MAP image, this MAP and route)."""
    uids = sorted({str(u) for u in sop_instance_uids})
    if not series_uid or not uids or not image_digest or not map_name:
        raise ValueError("a job key needs a series UID, at least one SOP Instance UID, an image digest and the "
                         "MAP's name")
    route = "destinations:" + ",".join(sorted({str(d) for d in destinations}))
    text = "\n".join(["segmap-job-v2", str(series_uid), str(image_digest), str(map_name), route, *uids])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_name(key: str) -> str:
    """The container / Kubernetes Job name of a job: DNS-1123 safe, 27 characters."""
    return f"segmap-{key[:20]}"


def seg_uids(key: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) the job's SEG carries (the MAP gets ``key`` as its ``uid_seed``)."""
    return seeded_uid(key, "series"), seeded_uid(key, "sop")
