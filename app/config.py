"""Where the application's settings come from, in order of precedence.

- Paths: ``-i/--input``, ``-o/--output``, ``-m/--model`` flags, else ``HOLOSCAN_INPUT_PATH``,
  ``HOLOSCAN_OUTPUT_PATH``, ``HOLOSCAN_MODEL_PATH``, else ``input``, ``output``, ``models`` (MONAI Deploy's
  convention). A models folder holding one model folder (``models/<name>/``) is entered.
- Everything else: ``SEGMAP_*`` environment variables, else the ``segmap:`` section of the app configuration
  (``-c/--config``, else ``HOLOSCAN_CONFIG_PATH``, else ``app.yaml`` beside this file), else the defaults below.

========================== ============================ ===========================================
setting (app.yaml key)     environment                  default
========================== ============================ ===========================================
variant                    SEGMAP_VARIANT               auto (dicom unless the input holds NIfTI)
task_file                  SEGMAP_TASK_FILE             task.yaml (beside the config file, else in app/)
task_name                  SEGMAP_TASK_NAME             the only task in the file
model                      SEGMAP_MODEL                 the model folder under the models path (the only one)
device                     SEGMAP_DEVICE                auto (CUDA when available)
mirroring                  SEGMAP_MIRRORING             false
omit_empty_frames          SEGMAP_OMIT_EMPTY_FRAMES     false
log_level                  SEGMAP_LOG_LEVEL             INFO
========================== ============================ ===========================================
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from segmap.errors import SegmapError
from segmap.pipeline import RunOptions, detect_variant

HERE = Path(__file__).resolve().parent
DEFAULTS: dict[str, Any] = {"variant": "auto", "task_file": "task.yaml", "task_name": None, "model": None,
                            "device": "auto",
                            "mirroring": False, "omit_empty_frames": False, "log_level": "INFO"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass
class AppSettings:
    variant: str
    options: RunOptions
    log_level: str
    config_path: Path | None

    def configure_logging(self) -> None:
        logging.basicConfig(level=self.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger().setLevel(self.log_level)
        logging.getLogger("highdicom").setLevel(max(logging.WARNING, logging.getLogger().level))


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SegmapError(f"setting '{name}' must be true or false, got '{value}'")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="app", description="segmap MONAI Deploy application (see app/config.py)")
    p.add_argument("-i", "--input", help="input folder (DICOM study) or NIfTI file/folder [HOLOSCAN_INPUT_PATH]")
    p.add_argument("-o", "--output", help="output folder [HOLOSCAN_OUTPUT_PATH]")
    p.add_argument("-m", "--model", help="model.ts, fold folder, or models folder [HOLOSCAN_MODEL_PATH]")
    p.add_argument("-w", "--workdir", help="working folder [HOLOSCAN_WORKDIR] (unused; accepted for compatibility)")
    p.add_argument("-c", "--config", help="app configuration YAML [HOLOSCAN_CONFIG_PATH]")
    p.add_argument("-l", "--log-level", type=str.upper, help="DEBUG, INFO, WARNING, ERROR [SEGMAP_LOG_LEVEL]")
    return p


def _model_path(flag: str | None, env_path: str | None, configured: str | None) -> Path:
    """``-m`` wins; otherwise the models path, or the configured model (relative to the models path)."""
    if flag:
        return Path(flag)
    base = Path(env_path or "models")
    if configured:
        return base / configured if not Path(configured).is_absolute() else Path(configured)
    return base


def load_settings(argv: list[str] | None = None) -> AppSettings:
    args = _parser().parse_args(argv)
    env = os.environ
    config_path = Path(args.config or env.get("HOLOSCAN_CONFIG_PATH") or HERE / "app.yaml")
    section: dict[str, Any] = {}
    if config_path.is_file():
        try:
            doc = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as e:
            raise SegmapError(f"{config_path}: not valid YAML ({e})".replace("\n", " ")) from e
        section = dict(doc.get("segmap") or {}) if isinstance(doc, dict) else {}
        unknown = sorted(set(section) - set(DEFAULTS))
        if unknown:
            raise SegmapError(f"{config_path}: unknown keys in 'segmap': {', '.join(unknown)} "
                              f"(allowed: {', '.join(DEFAULTS)})")
    elif args.config or env.get("HOLOSCAN_CONFIG_PATH"):
        raise SegmapError(f"app configuration {config_path} not found")
    values = dict(DEFAULTS)
    values.update({k: v for k, v in section.items() if v is not None})
    for key in DEFAULTS:
        if f"SEGMAP_{key.upper()}" in env:
            values[key] = env[f"SEGMAP_{key.upper()}"]

    task_file = Path(values["task_file"])
    if not task_file.is_absolute():
        # Relative to the configuration file; a packager that moved app.yaml away (holoscan-cli copies it to
        # /var/holoscan) leaves the task file in the app folder, so look there next.
        beside_config, in_app = config_path.parent / task_file, HERE / task_file
        task_file = beside_config if beside_config.exists() or not in_app.exists() else in_app
    input_path = Path(args.input or env.get("HOLOSCAN_INPUT_PATH") or "input")
    variant = str(values["variant"]).lower()
    if variant not in ("auto", "dicom", "nifti"):
        raise SegmapError(f"variant must be dicom, nifti or auto, got '{values['variant']}'")
    if variant == "auto":
        variant = detect_variant(input_path)
    options = RunOptions(
        model=_model_path(args.model, env.get("HOLOSCAN_MODEL_PATH"), values["model"]),
        task=task_file,
        task_name=values["task_name"] or None,
        input=input_path,
        output=Path(args.output or env.get("HOLOSCAN_OUTPUT_PATH") or "output"),
        variant=variant,
        device=str(values["device"]),
        mirroring=_flag("mirroring", values["mirroring"]),
        omit_empty_frames=_flag("omit_empty_frames", values["omit_empty_frames"]),
    )
    level = str(args.log_level or values["log_level"]).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "WARN", "ERROR"):
        raise SegmapError(f"log level must be DEBUG, INFO, WARNING or ERROR, got '{level}'")
    return AppSettings(variant, options, "WARNING" if level == "WARN" else level,
                       config_path if config_path.is_file() else None)
