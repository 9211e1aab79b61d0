"""The ``segmap`` command.

Every user mistake surfaces as one line on stderr (``segmap: error: ...``) and exit code 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from . import signals
from .convert import add_convert_parser
from .errors import SegmapError
from .flags import MODEL_AND_TASK, add_setting
from .logs import configure_logging
from .model import load_model, parse_folds
from .settings import declared, resolve, setting
from .summary import describe_model

EPILOG = """\
examples:
  segmap inspect models/demo-spleen/model.ts
  segmap validate --task tasks/spleen.yaml --model models/demo-spleen/model.ts
  segmap run --model models/demo-spleen/model.ts --task tasks/spleen.yaml -i ct.nii.gz -o out/
  segmap demo
  segmap package --model models/demo-spleen/model.ts --task tasks/spleen.yaml --tag segmap/spleen:0.1 --cpu
  segmap serve -c service.yaml     (the PACS job service; `segmap serve --example` prints a configuration)
  segmap portal -c portal.yaml     (MONAI Label's API for 3D Slicer, OHIF, scripts; `--example` prints one)

A model is a MONet model.ts (TorchScript with nnU-Net plans embedded), a folder of fold_K/model.ts files (an
ensemble), or an nnU-Net results folder (plans.json, dataset.json, fold_K/checkpoint_final.pth). A task file is a MAIA Segmentation Task YAML; one that holds a single task needs no
--task-name.
"""


def _cmd_inspect(args: argparse.Namespace) -> int:
    print(describe_model(load_model(args.model, folds=parse_folds(args.folds), checkpoint=args.checkpoint)))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .run import prepare  # here: see _cmd_run

    settings = resolve({name: getattr(args, name) for name in MODEL_AND_TASK}, env={})
    model, task = prepare(settings)
    print(f"OK: task '{task.name}' ({settings.task_file}) agrees with model {settings.model_path}: "
          f"{len(task.modalities)} modality(ies), {len(task.segments)} segment(s)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    # Here, not at the top: the run layer imports numpy and scipy, whose thread pools must start after main() has
    # blocked SIGTERM/SIGINT (segmap.signals), or a signal can land on one of their threads and kill the process.
    from .run import run

    flags = {d.name: getattr(args, d.name, None) for d in _run_settings()}
    flags["log_level"] = args.log_level
    settings = resolve(flags, config=Path(args.config) if args.config else None)
    configure_logging(settings.log_level)
    run(settings)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        from .demo.run import DEMO_MODEL, DEMO_TASK, run_demo
    except ImportError:  # a MAP image's segmap holds only what runs
        return _not_installed("segmap demo", "the demo")(args)

    run_demo(Path(args.out), device=args.device, model=Path(args.model or DEMO_MODEL),
             task=Path(args.task or DEMO_TASK))
    return 0


def _run_settings():
    """The settings ``segmap run`` takes as flags: every declared setting that has a flag (log level: global)."""
    return [d for d in declared() if d.flags and d.name != "log_level"]


def _not_installed(command: str, what: str):
    def fail(_args: argparse.Namespace) -> int:
        raise SegmapError(f"{command}: {what} is not part of this installation (a MAP image holds only what runs); "
                          "use a full segmap installation")
    return fail


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segmap", description="Ship an nnU-Net (MONet model.ts) segmentation model into a hospital.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"segmap {__version__}")
    level = setting("log_level")
    parser.add_argument("--log-level", type=str.upper, default=None, choices=level.choices,
                        help=f"{level.help} [{level.env}; default: {level.default}]")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="print a readable summary of a model (plans, channels, labels, folds)")
    p.add_argument("model", help="model.ts, folder of fold_K/model.ts, or nnU-Net results folder")
    for name in ("folds", "checkpoint"):
        add_setting(p, setting(name))
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("validate", help="check that a task file agrees with a model (modalities and segments)")
    for name in MODEL_AND_TASK:
        add_setting(p, setting(name), **({"required": True} if name in ("models", "task_file") else {}))
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("run", help="segment a local input: a NIfTI file/folder or a DICOM folder",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="The output folder receives the label map (a DICOM SEG for DICOM input, a NIfTI label "
                              "map for NIfTI input, or --output-format) and run_report.json.\n"
                              "Each flag's environment variable applies when the flag is not given; -c reads the "
                              "segmap: section of an app.yaml.")
    for d in _run_settings():
        add_setting(p, d)
    p.add_argument("-c", "--config", default=None, help="app.yaml whose segmap: section supplies defaults")
    p.set_defaults(func=_cmd_run)

    try:
        from .packager.cli import add_package_parser
    except ImportError:  # a MAP image's segmap holds only what runs
        # Takes any arguments (no option prefix), so that the user learns what is missing rather than a usage line.
        p = sub.add_parser("package", help="build MAP container images (not in this installation)",
                           prefix_chars="\x00", add_help=False)
        p.add_argument("args", nargs="*")
        p.set_defaults(func=_not_installed("segmap package", "the packager"))
    else:
        add_package_parser(sub)

    try:
        from .service.cli import add_service_parsers
        from .submit import add_submit_parser
    except ImportError:  # a MAP image's segmap holds only what runs
        for name in ("serve", "jobs", "submit"):
            p = sub.add_parser(name, help="the PACS job service (not in this installation)", prefix_chars="\x00",
                               add_help=False)
            p.add_argument("args", nargs="*")
            p.set_defaults(func=_not_installed(f"segmap {name}", "the job service"))
    else:
        add_service_parsers(sub)
        add_submit_parser(sub)

    try:
        from .portal.cli import add_portal_parser
    except ImportError:  # a MAP image's segmap holds only what runs
        pass
    else:
        add_portal_parser(sub)

    add_convert_parser(sub)

    p = sub.add_parser("demo", help="run both variants on a freshly generated phantom study with the bundled demo model")
    p.add_argument("--out", default="out/demo", help="where to write the phantom study and the results")
    add_setting(p, setting("device"))
    p.add_argument("--model", default=None, help="model to use instead of the bundled models/demo-spleen/model.ts")
    p.add_argument("--task", default=None, help="task file to use instead of tasks/spleen.yaml")
    p.set_defaults(func=_cmd_demo)

    # Global flags after the subcommand too (`segmap run --log-level DEBUG`); absent there, the global value stays.
    for p in sub.choices.values():
        if p.prefix_chars == "-":
            try:
                p.add_argument("--log-level", type=str.upper, default=argparse.SUPPRESS, choices=level.choices,
                               help=f"{level.help} [{level.env}; default: {level.default}]")
            except argparse.ArgumentError:  # the subcommand has its own
                pass
    return parser


def _command(argv: list[str] | None) -> str | None:
    """The subcommand named in ``argv``, found without building the full parser (which imports numpy through the
    packager's and the service's modules, and numpy's BLAS starts threads)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-l", "--log-level")
    pre.add_argument("command", nargs="?")
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    return known.command


def main(argv: list[str] | None = None) -> int:
    # docker stop / Kubernetes / Ctrl-C at any moment of a run, also inside torch: clean up, one line, exit 143
    # (130). Before any library starts a thread (numpy's BLAS, torch, OpenMP), so that every thread inherits the
    # blocked signals (segmap.signals.install); a thread started earlier could take the signal and die of it (-15).
    # Not for `package`: the pip and git processes it starts would inherit them too.
    if _command(argv) not in ("run", "demo") or not signals.install():
        signals.install_sigterm_handler()
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level or setting("log_level").default)
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
