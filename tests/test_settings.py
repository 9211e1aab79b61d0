"""The settings model is the one source of truth: everything derived from it matches, and values resolve as documented."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import DEMO_MODEL, ROOT, SPLEEN_TASK

from segmap import __version__
from segmap.engine.options import EngineOptions
from segmap.errors import SegmapError
from segmap.settings import Settings, SettingsError, declared, resolve, runtime_defaults

sys.path.insert(0, str(ROOT / "tools"))



def test_readme_settings_table_is_generated_from_the_model():
    from generate import readme_with_table

    text = (ROOT / "README.md").read_text()
    assert readme_with_table(text) == text, "README settings table drifted: run `make generate`"
    for d in declared():
        assert f"`{d.env}`" in text


def test_repo_app_yaml_is_generated_from_the_model():
    from segmap.packager.context import repo_app_yaml

    assert (ROOT / "app" / "app.yaml").read_text() == repo_app_yaml(__version__), "app/app.yaml drifted: `make generate`"
    section = yaml.safe_load((ROOT / "app" / "app.yaml").read_text())["segmap"]
    assert set(section) == {d.name for d in declared() if d.yaml}


def test_app_requirements_follow_pyproject():
    from generate import app_requirements

    assert (ROOT / "app" / "requirements.txt").read_text() == app_requirements(), "run `make generate`"


def test_service_settings_reference_is_generated_from_the_parsers_declarations():
    from generate import SERVICE_SETTINGS, service_settings_doc

    from segmap.service.config import reference_table

    text = SERVICE_SETTINGS.read_text()
    assert text == service_settings_doc(), "docs/service-settings.md drifted: run `make generate`"
    for row in reference_table():  # every key the parser reads, each once
        assert text.count(f"| `{row['name']}` |") == 1, row["name"]
    for key in ("destinations.<dicom>.host", "destinations.<stow>.url", "maps[].trigger.tag", "service.lease_s",
                "service.poll_s", "service.retry_backoff_s", "listener.allowed_peers"):
        assert f"| `{key}` |" in text, key


def test_packaged_app_yaml_carries_every_runtime_default(tmp_path):
    from segmap.outputs.formats import variants
    from segmap.packager.context import app_config

    for variant in variants().values():
        section = app_config(variant=variant, task_file="/opt/holoscan/task/t.yaml", task_name="T", model_name="m",
                             version="1", cpu=True)["segmap"]
        assert {k: section[k] for k in runtime_defaults()} == {
            **runtime_defaults(), "input_kind": variant.input_kind, "output_format": variant.output_format.name}


#: A literal given to a setting's name as an annotated default (``name: T = lit``), a keyword default
#: (``name=lit``) or a mapping entry (``"name": lit``); plain reassignments (``name = lit``) are not defaults.
LITERAL = r"(True|False|\"[^\"]*\"|'[^']*'|\d+)"
SETTING_DEFAULT = (r"\b{name}\b\s*:[^=\n]*=\s*" + LITERAL + r"|\b{name}=" + LITERAL
                   + r"|[\"']{name}[\"']\s*:\s*" + LITERAL)


#: Settings that are engine options: their defaults are declared by :class:`segmap.engine.options.EngineOptions`.
ENGINE_OPTIONS = {f.name for f in dataclasses.fields(EngineOptions)}


@pytest.mark.parametrize("d", [d for d in declared() if d.default is not None and d.type != "Path"],
                         ids=lambda d: d.name)
def test_each_default_is_declared_in_one_place(d):
    """No other module restates a setting's default (a keyword default, a dict entry, a dataclass field). The
    engine's options declare their own defaults (the engine does not know the settings); settings.py reads them."""
    owner = ROOT / "src/segmap" / ("engine/options.py" if d.name in ENGINE_OPTIONS else "settings.py")
    pattern = re.compile(SETTING_DEFAULT.format(name=re.escape(d.name)))
    found = []
    for folder in ("src/segmap", "app", "operators"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == owner:
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)


def test_run_flags_and_help_come_from_the_model():
    from segmap.cli import build_parser

    parser = build_parser()
    run = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "run")[1]
    help_text = run.format_help()
    for d in declared():
        if d.flags and d.name != "log_level":
            assert d.flags[-1] in help_text and d.env in help_text, d.name
    assert "--log-level" in parser.format_help()


def test_precedence_flag_env_config_default(tmp_path):
    config = tmp_path / "app.yaml"
    config.write_text(yaml.safe_dump({"segmap": {"device": "cuda", "mirroring": True, "task_file": "t.yaml"}}))
    assert Settings().device == "auto"
    assert resolve({}, env={}, config=config).device == "cuda"
    assert resolve({}, env={}, config=config).task_file == tmp_path / "t.yaml"  # relative to the config file
    assert resolve({}, env={"SEGMAP_DEVICE": "cpu"}, config=config).device == "cpu"
    assert resolve({"device": "cuda:1"}, env={"SEGMAP_DEVICE": "cpu"}, config=config).device == "cuda:1"
    assert resolve({}, env={"SEGMAP_MIRRORING": "off"}, config=config).mirroring is False
    assert resolve({}, env={"HOLOSCAN_INPUT_PATH": "/in"}).input == Path("/in")
    assert resolve({}, env={"SEGMAP_LOG_LEVEL": "warn"}).log_level == "WARNING"


@pytest.mark.parametrize("env, fragment", [
    ({"SEGMAP_MIRRORING": "maybe"}, "SEGMAP_MIRRORING: mirroring must be true or false, got 'maybe'"),
    ({"SEGMAP_OUTPUT_FORMAT": "png"}, "SEGMAP_OUTPUT_FORMAT: output_format must be auto, dicom-seg or nifti"),
    ({"SEGMAP_INPUT_KIND": "jpeg"}, "SEGMAP_INPUT_KIND: input_kind must be auto, dicom or nifti"),
])
def test_bad_values_name_their_source(env, fragment):
    with pytest.raises(SettingsError, match=re.escape(fragment)):
        resolve({}, env=env)


def test_config_file_errors_name_the_key(tmp_path):
    config = tmp_path / "app.yaml"
    config.write_text("segmap:\n  mirorring: true\n")
    with pytest.raises(SegmapError, match="unknown keys in 'segmap': mirorring"):
        resolve({}, env={}, config=config)
    config.write_text("segmap:\n  omit_empty_frames: sometimes\n")
    with pytest.raises(SegmapError, match=r"app.yaml key segmap.omit_empty_frames: omit_empty_frames must be true"):
        resolve({}, env={}, config=config)


def test_effective_settings_printout(tmp_path):
    """What `docker run IMAGE env` prints: every setting's variable with the value in effect."""
    config = tmp_path / "app.yaml"
    config.write_text(yaml.safe_dump({"segmap": {"mirroring": True, "model": "spleen"}}))
    env = {"SEGMAP_DEVICE": "cpu", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "segmap.settings", str(config)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    assert set(lines) == {d.env for d in declared()}
    assert lines["SEGMAP_DEVICE"] == "cpu" and lines["SEGMAP_MIRRORING"] == "true" and lines["SEGMAP_MODEL"] == "spleen"
    bad = subprocess.run([sys.executable, "-m", "segmap.settings", str(config)], capture_output=True, text=True,
                         env={**env, "SEGMAP_MIRRORING": "2"}, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("segmap: error: SEGMAP_MIRRORING")


def test_validate_reports_a_bad_rule_with_file_task_modality_and_selection(tmp_path):
    task = tmp_path / "task.yaml"
    task.write_text(SPLEEN_TASK.read_text().replace('"Modality": "(?i)CT"',
                                                    '"Modality": "(?i)CT", "BodyPartExamined": "[abd"'))
    proc = subprocess.run([sys.executable, "-m", "segmap.cli", "validate", "--task", str(task), "--model",
                           str(DEMO_MODEL)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    for part in (str(task), "task 'Spleen'", "modality 'image'", "selection 'CT Series'", "BodyPartExamined",
                 "not a valid regular expression"):
        assert part in line, line
