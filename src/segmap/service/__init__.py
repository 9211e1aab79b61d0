"""The PACS job service: a series arrives (DICOM listener or Orthanc), the matching MAP runs as a container job,
the result goes back to a destination -- exactly once, through crashes and restarts.

The service is a state machine over a durable job store (:mod:`.store`): every transition is one transaction, and
every side effect (a container, a sent SEG) is named after the job's idempotency key (:mod:`.keys`) so that a
restart finds it instead of repeating it. Runners (:mod:`.runners`) and destinations (:mod:`.export`) sit behind
small interfaces.
"""
