"""The application's command line and configuration file, derived from :mod:`segmap.settings`.

MONAI Deploy's conventions: ``-i/-o/-m`` win over ``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH`` and
``HOLOSCAN_MODEL_PATH``; the configuration file is ``-c``, else ``HOLOSCAN_CONFIG_PATH``, else the ``app.yaml``
beside this file. A relative task file is looked for beside the configuration file, then in this folder (a
packager that moves ``app.yaml`` away, as holoscan-cli does, leaves the task file in the app folder).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from segmap.settings import CONFIG_ENV, Settings, SettingsError, resolve, setting

HERE = Path(__file__).resolve().parent
#: The settings the application takes as flags (everything else: environment or configuration file).
FLAGS = ("input", "output", "models", "log_level")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="app", description="segmap MONAI Deploy application (settings: segmap.settings)")
    for name in FLAGS:
        d = setting(name)
        p.add_argument(*[f for f in (d.short, d.flag) if f], dest=name, metavar=d.metavar,
                       help=f"{d.help} [{d.env}]")
    p.add_argument("-c", "--config", help=f"app configuration YAML [{CONFIG_ENV}]")
    p.add_argument("-w", "--workdir", help="working folder [HOLOSCAN_WORKDIR] (accepted for compatibility; unused)")
    return p


def load_settings(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    args = parser().parse_args(argv)
    env = dict(os.environ) if env is None else env
    explicit = args.config or env.get(CONFIG_ENV)
    config = Path(explicit) if explicit else HERE / "app.yaml"
    if explicit and not config.is_file():
        raise SettingsError(f"app configuration {config} not found")
    settings = resolve({name: getattr(args, name) for name in FLAGS}, env=env,
                       config=config if config.is_file() else None)
    task_file = settings.task_file
    if task_file == setting("task_file").default:
        task_file = config.parent / task_file
    if not task_file.exists() and (HERE / task_file.name).is_file():
        task_file = HERE / task_file.name
    return settings.with_values(task_file=task_file)
