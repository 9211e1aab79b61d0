"""Exceptions for problems a user can act on.

Every message is one line that names the file, series or key at fault and says what was expected. The CLI and the
application turn a :class:`SegmapError` into that line on stderr and a non-zero exit code, without a traceback.
"""


class SegmapError(Exception):
    """A problem with the user's input, files or configuration (not a bug in segmap)."""

    exit_code = 2


class TaskFileError(SegmapError):
    """The Segmentation Task file is missing, unreadable or does not follow the MAIA format."""


class ModelError(SegmapError):
    """The model file is missing, corrupt, or lacks the embedded nnU-Net plans."""


class MismatchError(SegmapError):
    """The task file and the model disagree (modalities or segments)."""


class InputError(SegmapError):
    """The input folder or files cannot be used (empty, unreadable, nothing matches)."""


class OutputError(SegmapError):
    """The output location cannot be written."""


class WheelhouseError(SegmapError):
    """A wheel cannot be built, found or downloaded."""


class BaseImageError(SegmapError):
    """The base image cannot be made or inspected."""


class DockerEngineError(SegmapError):
    """The Docker engine cannot be reached, or it refused a build or an import."""


class ContextError(SegmapError):
    """A build context cannot be written from the given inputs."""


class SettingsError(SegmapError):
    """A setting has a value segmap cannot use; the message names where the value came from."""


class MemoryLimitError(SegmapError):
    """The run's estimated peak memory does not fit the container's memory limit."""


class StudiesFailed(SegmapError):
    """Some studies of a multi-study input failed (the others' outputs are in place)."""


class ServiceConfigError(SegmapError):
    """The job service's configuration file is missing, unreadable, or a key has a value it cannot use."""


class RunnerError(SegmapError):
    """A runner (Docker engine, Kubernetes API) cannot be reached or refused a run."""


class DestinationUnavailable(SegmapError):
    """A result destination cannot be reached now (connection refused, timeout, 5xx): the export is retried later."""


class ExportError(SegmapError):
    """A destination refused a result for good (a DICOM failure status, a 4xx): retrying will not help."""


class OrthancError(SegmapError):
    """Orthanc's REST API cannot be reached or answered something unexpected."""


class SubmitError(SegmapError):
    """``segmap submit`` could not send the study, or no SEG for it appeared at the query node in time."""
