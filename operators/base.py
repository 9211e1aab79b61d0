"""The shared shell of segmap's operators: named ports in, one plain function, named port out.

A user-fixable :class:`segmap.errors.SegmapError` is not raised into Holoscan (which would print a scheduler
traceback); the operator reports it on the run's :class:`Outcome` and emits nothing, so nothing downstream runs and
the application prints one line and exits non-zero. Operators only ever report to the outcome, never read it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monai.deploy.core import Fragment, Operator, OperatorSpec

from segmap.errors import SegmapError


class Outcome:
    """The narrow, write-only channel from the graph back to the application: the first failure, or the report."""

    def __init__(self) -> None:
        self.error: SegmapError | None = None
        self.report: Path | None = None

    def fail(self, error: SegmapError) -> None:
        if self.error is None:
            self.error = error

    def succeed(self, report: Path) -> None:
        self.report = report


class StepOperator(Operator):
    """Receives :attr:`inputs`, calls :meth:`step` with them as keyword arguments, emits the result on
    :attr:`output` (nothing for a sink); the constructor keeps the keyword arguments named in :attr:`bound`."""

    inputs: tuple[str, ...] = ()
    output: str | None = None
    #: Keyword arguments of the constructor kept as attributes of the same name: what the step needs besides its
    #: inputs (the task, the run's inference or writer), given when the graph is composed.
    bound: tuple[str, ...] = ()

    def __init__(self, fragment: Fragment, *args: Any, outcome: Outcome, **kwargs: Any) -> None:
        for name in self.bound:
            setattr(self, name, kwargs.pop(name))
        self.outcome = outcome
        self.log = logging.getLogger(f"segmap.app.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        for port in self.inputs:
            spec.input(port)
        if self.output:
            spec.output(self.output)

    def step(self, **received: Any) -> Any:  # pragma: no cover - every operator overrides it
        raise NotImplementedError

    def compute(self, op_input, op_output, context) -> None:
        received = {port: op_input.receive(port) for port in self.inputs}
        try:
            result = self.step(**received)
        except SegmapError as e:
            self.outcome.fail(e)
            return
        if self.output:
            op_output.emit(result, self.output)
