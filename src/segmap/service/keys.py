"""The job's idempotency key and the names derived from it.

The key is a SHA-256 over the input series' UID, the sorted set of its SOP Instance UIDs and the MAP image's content
digest: the same input for the same model always has the same key, so the store's UNIQUE constraint makes it run and
be sent at most once. The container (or Kubernetes Job) and the SEG's UIDs are named from it, so a restart finds
what an earlier attempt left instead of repeating it.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

from segmap.uids import seeded_uid


def job_key(series_uid: str, sop_instance_uids: Iterable[str], image_digest: str) -> str:
    """64 hex digits identifying (this exact set of instances of this series, this MAP image)."""
    uids = sorted({str(u) for u in sop_instance_uids})
    if not series_uid or not uids or not image_digest:
        raise ValueError("a job key needs a series UID, at least one SOP Instance UID and an image digest")
    text = "\n".join(["segmap-job-v1", str(series_uid), str(image_digest), *uids])
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def run_name(key: str) -> str:
    """The container / Kubernetes Job name of a job: DNS-1123 safe, 27 characters."""
    return f"segmap-{key[:20]}"


def seg_uids(key: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) the job's SEG carries (the MAP gets ``key`` as its ``uid_seed``)."""
    return seeded_uid(key, "series"), seeded_uid(key, "sop")
