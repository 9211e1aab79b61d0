"""Command-line flags derived from the settings' declarations (:mod:`segmap.settings`), for every ``segmap``
sub-command that takes settings (``run``, ``validate``, ``inspect``, ``package``, ``demo``)."""

from __future__ import annotations

import argparse

from .settings import Declared

#: The settings that name a model and a task (``segmap validate``, ``segmap package``).
MODEL_AND_TASK = ("models", "task_file", "task_name", "folds", "checkpoint")


def add_setting(p: argparse.ArgumentParser, d: Declared, **overrides) -> None:
    """One flag of :mod:`segmap.settings`; the default stays None so that environment and config can apply."""
    default = "none" if d.default is None else (str(d.default).lower() if d.type == "bool" else d.default)
    kwargs: dict = {"dest": d.name, "default": None, "help": f"{d.help} [{d.env}; default: {default}]"}
    if d.type == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs.update(metavar=d.metavar, choices=d.choices)
    kwargs.update(overrides)
    p.add_argument(*d.flags, **kwargs)
