"""Development tooling that never goes into an image: nnU-Net plans and results folders for tests and benchmarks,
and the training of the bundled demo model (``PYTHONPATH=tools python -m segmap_tools.train``, ``make demo-model``).
"""
