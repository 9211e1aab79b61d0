"""Every setting of a segmap run, declared once.

Each field of :class:`Settings` is one setting: its name is the key in the ``segmap:`` section of ``app.yaml``, its
annotation the type, its default the only default segmap has, and its metadata the help text, the command-line
flag and the environment variable. Everything else is derived from these declarations: the ``segmap run`` flags,
the MONAI Deploy application's configuration (``app/config.py``), the packaged ``app.yaml``, the README's settings
table and ``docker run IMAGE env``. Tests compare each of them with this module.

Where a value comes from, first match wins:

1. the command-line flag;
2. the environment variable (``SEGMAP_<KEY>`` for run settings; MONAI Deploy's ``HOLOSCAN_*`` for the paths);
3. the ``segmap:`` section of the configuration file (``-c/--config``, ``HOLOSCAN_CONFIG_PATH``, or the app's
   own ``app.yaml``);
4. the default declared here.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from .engine.options import NNUNET_STEP, PRECISIONS, EngineOptions, check_step
from .errors import SegmapError, SettingsError
from .outputs.formats import FORMATS, INPUT_MEDIA_TYPES, OMIT_EMPTY_FRAMES, SEG_TYPES

INPUT_KINDS = tuple(INPUT_MEDIA_TYPES)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")



def _setting(default: Any, help: str, *, flag: str | None = "", short: str | None = None, env: str | None = "",
             choices: tuple[str, ...] | None = None, yaml_key: bool = True, packaged: bool = True,
             metavar: str | None = None) -> Any:
    """Declare one setting. ``flag=""`` derives ``--key-name``, ``flag=None`` means no flag; ``env=""`` derives
    ``SEGMAP_KEY``; ``yaml_key=False`` keeps it out of ``app.yaml``; ``packaged=False`` keeps it out of the
    run-time defaults a MAP image bakes in (paths and the identity of the model and task are set by the packager)."""
    return field(default=default, metadata={
        "help": help, "flag": flag, "short": short, "env": env, "choices": choices, "yaml": yaml_key,
        "packaged": packaged, "metavar": metavar})


@dataclass(frozen=True)
class Settings:
    """The settings of one run (a ``segmap run`` or one execution of the MONAI Deploy application)."""

    # --- where things are (MONAI Deploy's paths and their HOLOSCAN_* variables) ----------------------------------
    input: Path = _setting(Path("input"), "input: a DICOM folder (searched recursively) or a NIfTI file/folder",
                           short="-i", env="HOLOSCAN_INPUT_PATH", yaml_key=False, packaged=False, metavar="IN")
    output: Path = _setting(Path("output"), "output folder (created if missing); outputs appear only when the "
                            "whole run succeeded", short="-o", env="HOLOSCAN_OUTPUT_PATH", yaml_key=False,
                            packaged=False, metavar="OUT")
    models: Path = _setting(Path("models"), "model: a model.ts, a folder of fold_K/model.ts (an ensemble), an "
                            "nnU-Net results folder (plans.json, dataset.json, fold_K/checkpoint_final.pth), or a "
                            "folder holding one such model", flag="--model", short="-m",
                            env="HOLOSCAN_MODEL_PATH", yaml_key=False, packaged=False, metavar="MODEL")
    # --- what runs ------------------------------------------------------------------------------------------------
    model: str | None = _setting(None, "model folder under the models path; none: the only one there",
                                 flag=None, packaged=False)
    folds: str | None = _setting(None, "folds to ensemble, e.g. 0,1 or all; none: every fold of the model",
                                 metavar="LIST", packaged=False)
    checkpoint: str | None = _setting(None, "nnU-Net results folders only: final (checkpoint_final.pth, also when "
                                      "none), best (checkpoint_best.pth) or a checkpoint file name", metavar="NAME",
                                      packaged=False)
    task_file: Path = _setting(Path("task.yaml"), "Segmentation Task YAML (relative to the configuration file's "
                               "folder in the application)", flag="--task", short="-t", packaged=False,
                               metavar="TASK")
    task_name: str | None = _setting(None, "task to use when the task file holds several", packaged=False,
                                     metavar="NAME")
    input_kind: str = _setting("auto", "what the input holds: dicom, nifti, or auto (nifti when the input is or "
                               "holds a NIfTI file, else dicom)", choices=("auto",) + INPUT_KINDS)
    output_format: str = _setting("auto", "what to write: dicom-seg, nifti, or auto (DICOM SEG for DICOM input, "
                                  "a NIfTI label map for NIfTI input)", choices=("auto",) + tuple(FORMATS))
    # --- how it runs ------------------------------------------------------------------------------------------
    device: str = _setting(EngineOptions.device, "auto (CUDA when available), cpu, cuda or cuda:N")
    mirroring: bool = _setting(EngineOptions.mirroring, "nnU-Net test-time mirroring over the model's allowed axes "
                               "(nnU-Net's default; 8x the network time in 3D)")
    precision: str = _setting(EngineOptions.precision, "network arithmetic: exact (fp32, matches nnU-Net to Dice >= "
                              "0.999), fast (bf16 on CPUs with native bf16, fp16 on CUDA, OpenVINO fp32 on other CPUs "
                              "where openvino is on; Dice >= 0.99) or auto (fast where the hardware has it); the "
                              "report records which ran", choices=PRECISIONS)
    tile_step_size: str = _setting(str(NNUNET_STEP), "sliding-window step as a fraction of the patch, nnU-Net's "
                                   "tile_step_size (nnUNetv2_predict -step_size), on both precisions: 0.75 runs 27 "
                                   "tiles instead of 64 on a 512x512x300 CT at 1.5 mm, at the cost of agreement with "
                                   "nnU-Net's default 0.5 (model-dependent: measure it on your data); the report "
                                   "records the step and the network calls", metavar="STEP")
    openvino: bool = _setting(EngineOptions.openvino, "let OpenVINO (pip install 'segmap[openvino]') compete on the "
                              "fast path: bf16 on CPUs with native bf16, fp32 on the others (where it is the only fast "
                              "path: about 2x torch's fastest fp32 per tile on an AVX2 CPU; not exact, Dice >= 0.99); "
                              "it compiles for seconds when the model loads; never used by precision exact")
    segmentation_type: str = _setting(SEG_TYPES[0], "DICOM SEG type: binary (one frame per segment and slice; "
                                      "every viewer) or labelmap (one frame per slice; newer viewers only)",
                                      choices=SEG_TYPES)
    omit_empty_frames: bool = _setting(OMIT_EMPTY_FRAMES, "DICOM SEG: leave out frames without segmented voxels (smaller "
                                       "files; some viewers misplace them)")
    overlay: bool = _setting(True, "write overlay.png beside the outputs: axial and coronal slices through the "
                             "segments, in the task's colours, with volumes in mL (no patient data)")
    log_level: str = _setting("INFO", "log detail", short="-l", choices=LOG_LEVELS)
    threads: str = _setting("auto", "CPU threads for torch and OpenMP: auto (0) follows the container's CPU quota "
                            "(docker run --cpus) and CPU affinity; a number sets it", metavar="N")
    uid_seed: str | None = _setting(None, "DICOM SEG: derive its Series and SOP Instance UIDs from this text, so "
                                    "a repeated run gives the same UIDs (the job service sets it to the job key); "
                                    "none: fresh UIDs each run", yaml_key=False, packaged=False, metavar="TEXT")
    umask: str = _setting("027", "file-mode mask of the outputs (octal): 027 writes them 0640, readable by the "
                          "group, not by others", metavar="MASK")

    # ---------------------------------------------------------------------------------------------------------------

    def with_values(self, **values: Any) -> "Settings":
        return dataclasses.replace(self, **values)

    @property
    def model_path(self) -> Path:
        """The model to load: the models path, or the configured model folder under it."""
        if self.model:
            return Path(self.model) if Path(self.model).is_absolute() else self.models / self.model
        return self.models

    def effective(self) -> dict[str, Any]:
        """Every setting and its value, as plain YAML/JSON values (paths as strings)."""
        return {s.name: _plain(getattr(self, s.name)) for s in declared()}


# --------------------------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Declared:
    """One setting's declaration, read from the :class:`Settings` field."""

    name: str
    type: str
    default: Any
    help: str
    flag: str | None
    short: str | None
    env: str | None
    choices: tuple[str, ...] | None
    yaml: bool
    packaged: bool
    metavar: str | None

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(f for f in (self.short, self.flag) if f)

    def parse(self, value: Any, source: str) -> Any:
        """``value`` as this setting's type; ``source`` names where it came from for the error message."""
        if value is None:
            if self.default is None:
                return None
            raise SettingsError(f"{source}: {self.name} needs a value ({self._expected()})")
        if self.type == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise SettingsError(f"{source}: {self.name} must be true or false, got {value!r}")
        if self.type == "Path":
            return Path(str(value))
        text = str(value).strip()
        if self.choices:
            folded = text.upper() if self.name == "log_level" else text.lower()
            if folded == "WARN":
                folded = "WARNING"
            if folded not in self.choices:
                raise SettingsError(f"{source}: {self.name} must be {self._expected()}, got {value!r}")
            return folded
        return text or (None if self.default is None else text)

    def _expected(self) -> str:
        if self.choices:
            return ", ".join(self.choices[:-1]) + " or " + self.choices[-1]
        return {"bool": "true or false", "Path": "a path"}.get(self.type, "text")


def declared() -> tuple[Declared, ...]:
    """Every setting, in declaration order."""
    out = []
    for f in dataclasses.fields(Settings):
        m = f.metadata
        kind = str(f.type).split(" ")[0].replace("'", "")
        out.append(Declared(
            name=f.name, type=kind, default=f.default, help=m["help"],
            flag=("--" + f.name.replace("_", "-")) if m["flag"] == "" else m["flag"], short=m["short"],
            env=f"SEGMAP_{f.name.upper()}" if m["env"] == "" else m["env"], choices=m["choices"],
            yaml=m["yaml"], packaged=m["packaged"], metavar=m["metavar"]))
    return tuple(out)


def setting(name: str) -> Declared:
    for d in declared():
        if d.name == name:
            return d
    raise KeyError(name)


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


# --------------------------------------------------------------------------------------------- resolution


CONFIG_ENV = "HOLOSCAN_CONFIG_PATH"


def read_config_section(path: Path) -> dict[str, Any]:
    """The ``segmap:`` section of a configuration file, checked for unknown keys."""
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise SettingsError(f"{path}: cannot read the configuration ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise SettingsError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from e
    if not isinstance(doc, dict):
        raise SettingsError(f"{path}: expected a mapping with a 'segmap:' section")
    section = doc.get("segmap") or {}
    if not isinstance(section, dict):
        raise SettingsError(f"{path}: 'segmap' must be a mapping of settings")
    allowed = [d.name for d in declared() if d.yaml]
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise SettingsError(f"{path}: unknown keys in 'segmap': {', '.join(unknown)} (allowed: {', '.join(allowed)})")
    return section


def resolve(flags: Mapping[str, Any] | None = None, *, env: Mapping[str, str] | None = None,
            config: Path | None = None) -> Settings:
    """Settings from flags (``name -> value``, ``None`` meaning not given), the environment and a config file.

    Relative ``task_file`` values from the configuration file are taken relative to that file's folder.
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = os.environ if env is None else env
    section = read_config_section(config) if config is not None else {}
    values: dict[str, Any] = {}
    for d in declared():
        if d.name in flags:
            values[d.name] = d.parse(flags[d.name], d.flags[-1] if d.flags else d.name)
        elif d.env and d.env in env:
            values[d.name] = d.parse(env[d.env], d.env)
        elif d.name in section and section[d.name] is not None:
            value = d.parse(section[d.name], f"{config} key segmap.{d.name}")
            if d.name == "task_file" and not value.is_absolute():
                value = Path(config).parent / value
            values[d.name] = value
    return Settings(**values)


def validate_settings(settings) -> None:
    """Check the ``threads``, ``tile_step_size`` and ``umask`` settings (one line naming the variable when wrong)."""
    for name, check in (("threads", _check_threads), ("tile_step_size", check_step), ("umask", _check_umask)):
        try:
            check(getattr(settings, name))
        except SegmapError as e:
            raise SettingsError(f"{setting(name).env}: {e}") from None


def _check_threads(value) -> None:
    if value in (None, "", "auto"):
        return
    if not str(value).strip().isdigit():
        raise SegmapError(f"threads must be auto, 0 or a positive whole number, got {value!r}")


def _check_umask(value) -> None:
    text = str(value).strip()
    if not (text and all(ch in "01234567" for ch in text) and int(text, 8) <= 0o777):
        raise SegmapError(f"umask must be an octal mode such as 027, got {value!r}")


# --------------------------------------------------------------------------------------------- derived documents


def runtime_defaults() -> dict[str, Any]:
    """The settings a MAP image bakes into its ``app.yaml`` as defaults (``docker run -e SEGMAP_...`` overrides)."""
    return {d.name: _plain(d.default) for d in declared() if d.packaged and d.yaml}


def markdown_table() -> str:
    """The README's settings table."""
    rows = ["| setting (`app.yaml`) | flag | environment | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for d in declared():
        key = f"`{d.name}`" if d.yaml else "–"
        flags = ", ".join(f"`{f}`" for f in d.flags) or "–"
        default = "none" if d.default is None else f"`{_plain(d.default) if d.type != 'bool' else str(d.default).lower()}`"
        rows.append(f"| {key} | {flags} | `{d.env}` | {default} | {d.help} |")
    return "\n".join(rows) + "\n"


def iter_env_lines(settings: Settings, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """``NAME=value`` lines of the effective settings, then the environment's other ``HOLOSCAN_*`` variables (the
    MAP's manifests, timeout, logs), for ``docker run IMAGE env``."""
    names = set()
    for d in declared():
        value = getattr(settings, d.name)
        names.add(d.env)
        yield f"{d.env}={'' if value is None else (str(value).lower() if isinstance(value, bool) else str(value))}"
    env = os.environ if env is None else env
    for name in sorted(n for n in env if n.startswith("HOLOSCAN_") and n not in names):
        yield f"{name}={env[name]}"


def main(argv: list[str] | None = None) -> int:
    """``python -m segmap.settings [CONFIG]``: print the effective settings (environment over configuration)."""
    args = sys.argv[1:] if argv is None else argv
    config = Path(args[0]) if args else (Path(os.environ[CONFIG_ENV]) if CONFIG_ENV in os.environ else None)
    try:
        settings = resolve(config=config if config is not None and config.is_file() else None)
        validate_settings(settings)
    except SegmapError as e:
        print(f"segmap: error: {e}", file=sys.stderr)
        return e.exit_code
    for line in iter_env_lines(settings):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
