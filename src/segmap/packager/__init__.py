"""Build MONAI Application Packages (MAPs) from a MONet model and a Segmentation Task file.

``write_context`` lays out a Docker build context (Dockerfile, app, model, task, manifests, wheels);
``build_image`` builds it with the Docker SDK; ``add_package_parser``/``package`` are the ``segmap package`` command.
The CPU base image is made locally by :mod:`segmap.packager.baseimage` (``python -m segmap.packager.baseimage``).
"""

from .baseimage import CPU_BASE_IMAGE, GPU_BASE_IMAGE, ensure_cpu_base
from .build import BuiltImage, build_image
from .cli import add_package_parser, package
from .context import ImageName, write_context
from .docker_engine import DockerEngineError

__all__ = ["CPU_BASE_IMAGE", "GPU_BASE_IMAGE", "BuiltImage", "DockerEngineError", "ImageName", "add_package_parser",
           "build_image", "ensure_cpu_base", "package", "write_context"]
