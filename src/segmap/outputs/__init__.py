"""What a run leaves behind: the label map in an output format (see :mod:`.formats`), written atomically, and the
JSON run report.

Plain functions and writer classes with no Holoscan dependency; the application's writer operator is a thin shell
over them. Modules are imported where they are used (``segmap.outputs.seg`` pulls in highdicom).
"""
