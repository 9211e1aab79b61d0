"""UIDs derived from a seed, so that writing the same result twice gives the same UIDs.

The job service passes each job's idempotency key as the seed (setting ``uid_seed``); the SEG of that job then has
the same Series and SOP Instance UIDs however often the job is run or sent, and a receiver that already holds it
stores nothing new. Without a seed, UIDs are random (a fresh result each run).
"""

from __future__ import annotations

from pydicom.uid import generate_uid

#: What a seeded UID is for; each gives a different UID from the same seed.
PURPOSES = ("series", "sop")


def seeded_uid(seed: str, purpose: str) -> str:
    """A DICOM UID that depends only on ``seed`` and ``purpose`` (one of :data:`PURPOSES`)."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    if not seed:
        raise ValueError("seed must be a non-empty string")
    return str(generate_uid(entropy_srcs=["segmap", purpose, seed]))
