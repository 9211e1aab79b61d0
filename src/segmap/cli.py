"""The ``segmap`` command.

Every user mistake surfaces as one line on stderr (``segmap: error: ...``) and exit code 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from . import signals
from .errors import SegmapError

EPILOG = """\
examples:
  segmap inspect models/demo-spleen/model.ts
  segmap validate --task tasks/spleen.yaml --model models/demo-spleen/model.ts
  segmap run --model models/demo-spleen/model.ts --task tasks/spleen.yaml -i ct.nii.gz -o out/
  segmap demo
  segmap package --model models/demo-spleen/model.ts --task tasks/spleen.yaml --tag segmap/spleen:0.1 --cpu

A model is a MONet model.ts (TorchScript with nnU-Net plans embedded) or a folder of fold_K/model.ts files,
which runs as an ensemble. A task file is a MAIA Segmentation Task YAML; one that holds a single task needs no
--task-name.
"""


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .model import load_model
    from .summary import describe_model

    print(describe_model(load_model(args.model)))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .model import load_model
    from .tasks import load_task
    from .validate import check_agreement

    task = load_task(args.task, args.task_name)
    model = load_model(args.model)
    check_agreement(task, model.spec, task_source=args.task, model_source=args.model)
    print(f"OK: task '{task.name}' ({args.task}) agrees with model {args.model}: "
          f"{len(task.modalities)} modality(ies), {len(task.segments)} segment(s)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import RunOptions, run

    opts = RunOptions(model=Path(args.model), task=Path(args.task), task_name=args.task_name,
                      input=Path(args.input), output=Path(args.output), variant=args.variant, device=args.device,
                      mirroring=args.mirroring, omit_empty_frames=args.omit_empty_frames)
    run(opts)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import DEMO_MODEL, DEMO_TASK, run_demo

    run_demo(Path(args.out), device=args.device, model=Path(args.model or DEMO_MODEL),
             task=Path(args.task or DEMO_TASK))
    return 0


def _add_task_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help="model.ts file, or folder of fold_K/model.ts (ensemble)")
    p.add_argument("--task", "-t", required=True, help="Segmentation Task YAML file")
    p.add_argument("--task-name", default=None, help="task to use when the file holds several")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segmap", description="Ship an nnU-Net (MONet model.ts) segmentation model into a hospital.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"segmap {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="print a readable summary of a model (plans, channels, labels, folds)")
    p.add_argument("model", help="model.ts file or folder of fold_K/model.ts")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("validate", help="check that a task file agrees with a model (modalities and segments)")
    _add_task_model(p)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("run", help="segment a local input: a NIfTI file/folder or a DICOM folder",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="The output folder receives the label map (NIfTI variant) or a DICOM SEG (DICOM variant) "
                              "and run_report.json.")
    _add_task_model(p)
    p.add_argument("-i", "--input", required=True, help="input NIfTI file or folder (NIfTI) / DICOM folder")
    p.add_argument("-o", "--output", required=True, help="output folder (created if missing)")
    p.add_argument("--variant", choices=["auto", "nifti", "dicom"], default="auto",
                   help="input kind; auto picks dicom when the input holds DICOM files (default: auto)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--mirroring", action=argparse.BooleanOptionalAction, default=False,
                   help="test-time mirroring over the model's allowed axes (8x slower in 3D; default off)")
    p.add_argument("--omit-empty-frames", action="store_true",
                   help="DICOM SEG: leave out frames with no segmented voxel (smaller files; some viewers mis-place them)")
    p.set_defaults(func=_cmd_run)

    from .packager.cli import add_package_parser

    add_package_parser(sub)

    p = sub.add_parser("demo", help="run both variants on a freshly generated phantom study with the bundled demo model")
    p.add_argument("--out", default="out/demo", help="where to write the phantom study and the results")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--model", default=None, help="model to use instead of the bundled models/demo-spleen/model.ts")
    p.add_argument("--task", default=None, help="task file to use instead of tasks/spleen.yaml")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signals.install_sigterm_handler()  # docker stop / Kubernetes: clean up, one line, exit 143
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # highdicom logs every module it copies at INFO: keep the run log about the run.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return args.func(args)
    except SegmapError as e:
        print(f"segmap: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("segmap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
