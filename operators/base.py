"""The shared shell of segmap's operators: one input port, one output port, errors recorded on the run."""

from __future__ import annotations

import logging
from typing import Any

from monai.deploy.core import Fragment, Operator, OperatorSpec

from segmap.errors import SegmapError
from segmap.pipeline import Run


class StepOperator(Operator):
    """Calls ``self.step(value)`` on what arrives at ``in`` (or nothing, for a source) and emits the result."""

    source = False

    def __init__(self, fragment: Fragment, *args: Any, run: Run, **kwargs: Any) -> None:
        self.run_state = run
        self.log = logging.getLogger(f"segmap.app.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        if not self.source:
            spec.input("in")
        spec.output("out")

    def step(self, value: Any) -> Any:  # pragma: no cover - every operator overrides it
        raise NotImplementedError

    def compute(self, op_input, op_output, context) -> None:
        if self.run_state.error is not None:
            return
        value = None if self.source else op_input.receive("in")
        stage = getattr(self, "stage", None)
        try:
            if stage:
                with self.run_state.report.stage(stage):
                    result = self.step(value)
            else:
                result = self.step(value)
        except SegmapError as e:
            self.run_state.error = e
            return
        if result is not None:
            op_output.emit(result, "out")


