"""The job state machine: the states, and the one table of transitions the store enforces.

::

    queued --claim--> running --run succeeded--> exporting --every destination confirmed--> done
      ^                  |                           |
      +--run failed, ----+                           +--destination refused for good / gave up--> failed
         attempts left   +--run failed, no attempts left--> failed
    any unfinished state --cancel (or superseded)--> cancelled;  failed / cancelled --retry--> queued

``exporting -> exporting`` is a transition too: one destination confirmed, or an export retry was scheduled.
The SQL ``CHECK`` of the jobs table, the job page's filters and the CLI's ``--state`` choices all come from
:class:`State`.
"""

from __future__ import annotations

from enum import StrEnum

from segmap.errors import SegmapError


class State(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    EXPORTING = "exporting"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: from-state -> the states a job may move to from there.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.RUNNING, State.CANCELLED}),
    State.RUNNING: frozenset({State.EXPORTING, State.QUEUED, State.FAILED, State.CANCELLED}),
    State.EXPORTING: frozenset({State.EXPORTING, State.DONE, State.FAILED, State.CANCELLED}),
    State.DONE: frozenset(),
    State.FAILED: frozenset({State.QUEUED}),
    State.CANCELLED: frozenset({State.QUEUED}),
}

#: States a job can still leave without an operator (the worker's loop moves it on).
UNFINISHED: tuple[State, ...] = (State.QUEUED, State.RUNNING, State.EXPORTING)
#: States an operator may queue again (``segmap jobs retry``).
RETRYABLE: tuple[State, ...] = tuple(s for s in State if State.QUEUED in TRANSITIONS[s] and s not in UNFINISHED)


class IllegalTransition(SegmapError):
    """A job was asked to move along an edge :data:`TRANSITIONS` does not have; nothing was changed."""


def check_transition(job_ref: str, old: str, new: str) -> None:
    """Raise :class:`IllegalTransition` unless ``old -> new`` is in :data:`TRANSITIONS`."""
    if State(new) not in TRANSITIONS[State(old)]:
        allowed = ", ".join(sorted(TRANSITIONS[State(old)])) or "none: it is final"
        raise IllegalTransition(f"job {job_ref}: cannot move from {old} to {new} (from {old}: {allowed})")


def sql_in(values) -> str:
    """``'a', 'b'``: a list of values for a SQL ``IN (...)``/``CHECK``, from an enum (never user input)."""
    return ", ".join(f"'{v}'" for v in values)
