"""``segmap package``: MAP images (DICOM SEG and NIfTI variants) for one model and one task."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from .baseimage import CPU_BASE_IMAGE, GPU_BASE_IMAGE
from .context import (DEFAULT_GID, DEFAULT_UID, DEFAULT_VARIANTS, VARIANTS, ContextError, ImageName,
                      context_model_digest, prepare_wheelhouse, resolve_python, write_context)


EPILOG = f"""\
examples:
  # both variants for a GPU host: segmap/spleen:1.0 (DICOM SEG) and segmap/spleen:1.0-nifti
  segmap package --model models/demo-spleen/model.ts --task tasks/spleen.yaml --tag segmap/spleen:1.0

  # CPU-only images on the local Debian base (make it once: python -m segmap.packager.baseimage)
  segmap package -m models/demo-spleen -t tasks/spleen.yaml --tag segmap/spleen:1.0 --cpu

  # offline: wheels made beforehand with `pip download`; only the DICOM variant
  segmap package -m model.ts -t tasks.yaml --task-name Spleen --tag spleen:1.0 --cpu \\
      --variants dicom --wheelhouse wheels/

  # write the build contexts without Docker, then build one by hand
  segmap package -m model.ts -t spleen.yaml --tag spleen:1.0 --cpu --dry-run out/ctx
  docker build -t spleen:1.0 out/ctx/dicom

running a MAP:
  docker run --rm -v $PWD/study:/var/holoscan/input:ro -v $PWD/out:/var/holoscan/output spleen:1.0
  docker run --rm spleen:1.0 show          # the manifests; `env` prints the settings, `extract` copies the payload
  docker run --rm -e SEGMAP_DEVICE=cpu ...  # also SEGMAP_MIRRORING, SEGMAP_OMIT_EMPTY_FRAMES, SEGMAP_LOG_LEVEL

The model and the task file are checked against each other before anything is built. The images run the
application as the output folder's owner, or as uid:gid 65532:65532 (--uid/--gid) for a root-owned folder, whose
finished outputs the entry point then moves in where that user cannot write; never as root.
Base images: {CPU_BASE_IMAGE} with --cpu, {GPU_BASE_IMAGE} otherwise;
--base-image picks another (Debian/Ubuntu with glibc 2.35+; apt installs Python 3 if it lacks one).
For CPU images built with network access, point pip at CPU builds of torch, e.g.
PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
"""


def add_package_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``package`` command to the ``segmap`` command's sub-parsers."""
    p = subparsers.add_parser(
        "package", help="build MAP container images (DICOM SEG and NIfTI variants) for a model and a task",
        description="Build MONAI Application Packages: one image per variant, DICOM (study in, DICOM SEG out) "
                    "and NIfTI (image in, label map out), each holding the model, the task and the application.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from ..flags import MODEL_AND_TASK, add_setting
    from ..settings import setting

    for name in MODEL_AND_TASK:
        add_setting(p, setting(name), **({"required": True} if name in ("models", "task_file") else {}))
    p.add_argument("--tag", required=True, metavar="NAME:VERSION",
                   help="image name and version; the NIfTI variant is tagged NAME:VERSION-nifti")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated image variants: " + "; ".join(f"{n} ({v.title})" for n, v in VARIANTS.items())
                   + f" (default: {','.join(DEFAULT_VARIANTS)}); each but dicom is tagged NAME:VERSION-<variant>")
    p.add_argument("--cpu", action="store_true",
                   help=f"CPU-only images: base {CPU_BASE_IMAGE}, no GPU requested in pkg.json")
    p.add_argument("--base-image", default=None, metavar="IMAGE",
                   help=f"base image (default: {GPU_BASE_IMAGE}, or {CPU_BASE_IMAGE} with --cpu)")
    p.add_argument("--uid", type=int, default=DEFAULT_UID,
                   help=f"user id the application runs as (default: {DEFAULT_UID}, unlikely to be a host account)")
    p.add_argument("--gid", type=int, default=DEFAULT_GID,
                   help=f"group id the application runs as (default: {DEFAULT_GID})")
    p.add_argument("--wheelhouse", default=None, metavar="DIR",
                   help="folder of wheels for the image's Python; the build then downloads nothing")
    p.add_argument("--python-version", default=None, metavar="3.N",
                   help="Python of the base image, for downloading wheels (default: known or asked of the image)")
    p.add_argument("--dry-run", default=None, metavar="DIR",
                   help="write the build contexts to DIR/<variant> and stop (no Docker needed)")
    p.add_argument("--source", default=None, metavar="DIR",
                   help="segmap source tree holding pyproject.toml, src/ and app/ (default: this installation's)")
    p.set_defaults(func=package)
    return p


def find_source_root(start: Path | None = None) -> Path:
    """The segmap project root (pyproject.toml + app/) this package was installed from (editable installs)."""
    here = Path(start or __file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "app").is_dir() and (parent / "src" / "segmap").is_dir():
            return parent
    raise ContextError("cannot find the segmap source tree (pyproject.toml, src/segmap, app/): pass --source DIR")


def parse_variants(text: str) -> list[str]:
    variants = [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ContextError(f"--variants {text!r}: expected a comma-separated list of {', '.join(VARIANTS)}")
    return list(dict.fromkeys(variants))


def package(args: argparse.Namespace) -> int:
    """Run ``segmap package``; return the exit code (user mistakes raise :class:`SegmapError`)."""
    model, task = Path(args.models), Path(args.task_file)
    name = ImageName.parse(args.tag)
    variants = parse_variants(args.variants)
    base_image = args.base_image or (CPU_BASE_IMAGE if args.cpu else GPU_BASE_IMAGE)
    source = Path(args.source) if args.source else find_source_root()
    if not (source / "app").is_dir():
        raise ContextError(f"{source}: no app/ folder (the application that goes into the image)")
    from ..run import prepare
    from ..settings import Settings

    # the model and the task must agree before anything is built
    _, loaded_task = prepare(Settings(models=model, task_file=task, task_name=args.task_name, folds=args.folds,
                                      checkpoint=args.checkpoint))

    api = None
    if args.dry_run is None:
        from .docker_engine import connect, image_exists

        api = connect()  # fail before the slow steps when the engine is down
        if base_image == CPU_BASE_IMAGE and not image_exists(api, base_image):
            raise ContextError(f"base image {base_image} not found: make it with `python -m segmap.packager.baseimage` "
                               "(needs root and debootstrap) or run .ci/docker-setup.sh")

    with tempfile.TemporaryDirectory(prefix="segmap-package-") as tmp:
        wheelhouse = Path(args.wheelhouse) if args.wheelhouse else None
        if wheelhouse is None:
            python = resolve_python(base_image, args.python_version)
            wheelhouse = prepare_wheelhouse(Path(tmp) / "wheelhouse", package_source=source, python_version=python)
        root = Path(args.dry_run) if args.dry_run else Path(tmp) / "contexts"
        contexts = {}
        for variant in variants:
            contexts[variant] = write_context(
                root / variant, model=model, task=task, task_name=args.task_name, variant=variant,
                base_image=base_image, uid=args.uid, gid=args.gid, wheelhouse=wheelhouse, app_dir=source / "app",
                package_source=source, tag=args.tag, cpu=args.cpu or base_image == CPU_BASE_IMAGE,
                folds=args.folds, checkpoint=args.checkpoint)
        if args.dry_run is not None:
            for variant, ctx in contexts.items():
                print(f"{variant}: build context {ctx} -> docker build -t {name.for_variant(variant)} {ctx}")
            return 0

        from .build import build_image, image_labels

        task_name = loaded_task.name
        for variant, ctx in contexts.items():
            tag = name.for_variant(variant)
            labels = image_labels(variant=variant, version=name.version, task_name=task_name,
                                  model_name=name.short_name, model_sha256=context_model_digest(ctx), source=source,
                                  base_image=base_image, ref=tag)
            built = build_image(ctx, tag, api=api, buildargs={
                "BASE_IMAGE": base_image, "MAP_UID": str(args.uid), "MAP_GID": str(args.gid),
                "IMAGE_REF": tag, "CREATED": labels["org.opencontainers.image.created"],
                "REVISION": labels["org.opencontainers.image.revision"]}, labels=labels)
            print(f"{variant}: built {tag} ({built.size_bytes / 1e9:.2f} GB) in {built.seconds:.0f} s")
    return 0
