"""The segmentation portal: an always-on server speaking MONAI Label's REST API over warm segmap models.

- :mod:`.config`: ``portal.yaml``, checked; :mod:`.auth`: the bearer token and when it is required;
- :mod:`.inference`: the one adapter onto the run's steps (same code as ``segmap run``), models kept loaded;
- :mod:`.queue`: device slots (one request at a time per device, a bounded queue, 503 beyond it);
- :mod:`.datastore`: uploads in a bounded cache, or a DICOMweb server (fetch by UID, STOW-RS of the SEG);
- :mod:`.app`: the FastAPI routes; :mod:`.metrics`: Prometheus; :mod:`.server`: start-up and uvicorn;
- :mod:`.cli`: ``segmap portal -c portal.yaml``.
"""
