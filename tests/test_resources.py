"""segmap.resources on fake cgroup trees (v1 and v2), and segmap.signals.install in a real process: threads follow the CPU
quota, the memory check refuses with both figures, the umask applies, a stop signal ends a blocked process with one
line and exit 143 and no staging folder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEMO_MODEL, ROOT, SPLEEN_TASK

from segmap.engine.memory import estimate_peak_memory
from segmap.errors import SegmapError
from segmap.resources import (MemoryLimitError, apply_threads, apply_umask, check_memory, cpu_budget, cpu_quota,
                              memory_limit, resolve_threads)
from segmap.settings import Settings, SettingsError, validate_settings



def tree(tmp_path: Path, files: dict[str, str], proc: str = "0::/\n") -> dict:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(parents=True, exist_ok=True)
    (tmp_path / "proc-cgroup").write_text(proc)
    return {"root": root, "proc_cgroup": tmp_path / "proc-cgroup"}


def test_v2_quota_rounds_down_and_never_below_one(tmp_path):
    assert cpu_quota(**tree(tmp_path / "a", {"cpu.max": "150000 100000\n"})) == 1.5
    assert cpu_budget(**tree(tmp_path / "b", {"cpu.max": "150000 100000\n"}), affinity=8) == 1
    assert cpu_budget(**tree(tmp_path / "c", {"cpu.max": "300000 100000\n"}), affinity=8) == 3
    assert cpu_budget(**tree(tmp_path / "d", {"cpu.max": "50000 100000\n"}), affinity=8) == 1
    assert cpu_budget(**tree(tmp_path / "e", {"cpu.max": "400000 100000\n"}), affinity=2) == 2  # affinity wins


def test_no_quota_means_the_affinity(tmp_path):
    assert cpu_quota(**tree(tmp_path / "a", {"cpu.max": "max 100000\n"})) is None
    assert cpu_budget(**tree(tmp_path / "a", {"cpu.max": "max 100000\n"}), affinity=6) == 6
    assert cpu_budget(**tree(tmp_path / "b", {}), affinity=3) == 3
    assert cpu_budget(**tree(tmp_path / "c", {}), affinity=None) == len(os.sched_getaffinity(0))


def test_v1_quota_and_period(tmp_path):
    v1 = tree(tmp_path / "a", {"cpu,cpuacct/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
              proc="12:cpu,cpuacct:/\n11:memory:/\n")
    assert cpu_quota(**v1) == 2.0 and cpu_budget(**v1, affinity=16) == 2
    unlimited = tree(tmp_path / "b", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                                      "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, proc="12:cpu,cpuacct:/\n")
    assert cpu_quota(**unlimited) is None


def test_the_tightest_quota_along_the_hierarchy_counts(tmp_path):
    # A host process in /jobs/job1: the parent slice limits to 1 CPU, the job itself has no quota.
    nested = tree(tmp_path, {"jobs/cpu.max": "100000 100000\n", "jobs/job1/cpu.max": "max 100000\n",
                             "jobs/memory.max": str(3 * 2**30), "jobs/job1/memory.max": "max\n"},
                  proc="0::/jobs/job1\n")
    assert cpu_budget(**nested, affinity=8) == 1
    assert memory_limit(**nested) == 3 * 2**30


def test_memory_limit_v2_v1_and_none(tmp_path):
    assert memory_limit(**tree(tmp_path / "a", {"memory.max": "4294967296\n"})) == 4 * 2**30
    assert memory_limit(**tree(tmp_path / "b", {"memory.max": "max\n"})) is None
    assert memory_limit(**tree(tmp_path / "c", {"memory/memory.limit_in_bytes": "536870912\n"},
                               proc="11:memory:/\n")) == 512 * 2**20
    # v1 writes "no limit" as the largest page-aligned number
    assert memory_limit(**tree(tmp_path / "d", {"memory/memory.limit_in_bytes": "9223372036854771712\n"},
                               proc="11:memory:/\n")) is None


def test_threads_setting_and_environment():
    env: dict[str, str] = {}
    n = apply_threads("auto", environ=env)
    assert n >= 1 and env == {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n), "OPENBLAS_NUM_THREADS": str(n)}
    env = {"OMP_NUM_THREADS": "3"}
    assert apply_threads("0", environ=env) == 3 and env["MKL_NUM_THREADS"] == "3"  # the user's OpenMP choice stands
    env = {"OMP_NUM_THREADS": "3"}
    assert apply_threads("5", environ=env) == 5 and env["OMP_NUM_THREADS"] == "5"  # an explicit setting wins
    assert resolve_threads("2") == 2
    with pytest.raises(SegmapError, match="threads 'many'"):
        resolve_threads("many")


def test_settings_threads_and_umask_are_validated():
    validate_settings(Settings())
    with pytest.raises(SettingsError, match=r"^SEGMAP_THREADS: threads must be auto, 0 or a positive whole number, "
                                            r"got 'lots'$"):
        validate_settings(Settings(threads="lots"))
    with pytest.raises(SettingsError, match=r"^SEGMAP_UMASK: umask must be an octal mode such as 027, got '089'$"):
        validate_settings(Settings(umask="089"))
    with pytest.raises(SettingsError, match=r"^SEGMAP_TILE_STEP_SIZE: tile step '0' must be a number in \(0, 1\] "):
        validate_settings(Settings(tile_step_size="0"))
    validate_settings(Settings(tile_step_size="0.75"))


def test_default_umask_writes_files_0640(tmp_path):
    old = apply_umask(Settings().umask)
    try:
        (tmp_path / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640


def test_estimate_grows_with_the_volume_and_the_classes():
    small = dict(input_shape_czyx=(1, 40, 112, 112), input_spacing_zyx=(3.0, 1.6, 1.6),
                 target_spacing_zyx=(3.0, 1.6, 1.6), patch_size=(32, 64, 64), num_outputs=2, model_bytes=10**6)
    big = dict(small, input_shape_czyx=(1, 300, 512, 512), input_spacing_zyx=(1.0, 0.8, 0.8))
    many = dict(small, num_outputs=20)
    assert estimate_peak_memory(**small) < estimate_peak_memory(**many) < estimate_peak_memory(**big)
    # 300 x 512 x 512 resampled from 0.8 mm to 1.6 mm in-plane and 1 mm to 3 mm in z: the input side dominates
    assert estimate_peak_memory(**big) > 3 * 300 * 512 * 512 * 4


def test_memory_check_names_both_figures():
    check_memory(2**30, 2**31)
    with pytest.raises(MemoryLimitError) as e:
        check_memory(3 * 2**30 + 2**29, 2**30, what="segmenting a 300 x 512 x 512 volume")
    assert str(e.value) == ("segmenting a 300 x 512 x 512 volume needs an estimated 3.50 GiB of memory but the "
                            "container's memory limit is 1.00 GiB: raise the limit (docker run --memory) to at "
                            "least 3.5g")
    assert e.value.exit_code == 2


@pytest.mark.parametrize("signum, code, line", [(signal.SIGTERM, 143, "segmap: terminated (SIGTERM)"),
                                                (signal.SIGINT, 130, "segmap: interrupted")])
def test_stop_signal_ends_a_process_blocked_outside_python(tmp_path, signum, code, line):
    """The main thread sits in a C call that never returns (as under Holoscan's graph or a torch kernel): the stop
    thread still ends the run within the second, removes the staging folder and prints one line."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "segmentation.nii.gz").write_bytes(b"an earlier run's result")
    script = f"""
import os, sys, select
sys.path.insert(0, {str(ROOT / 'src')!r})
from segmap import signals
signals.install()
from segmap.outputs.atomic import atomic_outputs, claim_output_folder
claim_output_folder({str(out)!r})
r, w = os.pipe()
with atomic_outputs({str(out)!r}) as staging:
    (staging.dir / "segmentation.nii.gz").write_bytes(b"half")
    print("writing", flush=True)
    select.select([r], [], [])  # blocked in C, forever
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    t = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=10)
    assert time.monotonic() - t < 2
    assert proc.returncode == code
    assert err.strip().splitlines() == [line]
    assert sorted(p.name for p in out.iterdir()) == ["segmentation.nii.gz"]
    assert (out / "segmentation.nii.gz").read_bytes() == b"an earlier run's result"


@pytest.mark.e2e  # a whole `segmap run` in a subprocess
def test_full_disk_while_writing_is_one_line_and_leaves_nothing(tmp_path):
    """segmap run into a 64 KiB tmpfs (root only; skipped elsewhere): the SEG of the phantom does not fit."""
    from segmap.demo.phantom import make_phantom, write_dicom_series

    out = tmp_path / "tiny"
    out.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0777", "tmpfs", str(out)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        write_dicom_series(make_phantom((40, 112, 112), (3.0, 1.6, 1.6), seed=314), tmp_path / "in" / "series")
        proc = subprocess.run([sys.executable, "-m", "segmap.cli", "run", "--model",
                               str(DEMO_MODEL), "--task", str(SPLEEN_TASK),
                               "-i", str(tmp_path / "in"), "-o", str(out), "--device", "cpu"],
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"})
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("segmap: error: ")]
        assert errors == [f"segmap: error: {out}: cannot write the outputs (No space left on device)"]
        assert "Traceback" not in proc.stderr
        assert list(out.iterdir()) == []
    finally:
        subprocess.run(["umount", str(out)], capture_output=True)


def test_a_run_writes_its_outputs_0640_and_leaves_the_process_umask_alone(tmp_path):
    from segmap.demo.phantom import make_phantom, write_nifti
    from segmap.run import run
    from segmap.settings import Settings

    write_nifti(make_phantom((24, 64, 64), (3.0, 1.6, 1.6), seed=2), tmp_path / "in" / "image.nii.gz")
    before = os.umask(0o022)
    try:
        run(Settings(input=tmp_path / "in", output=tmp_path / "out", models=DEMO_MODEL,
                     task_file=SPLEEN_TASK, device="cpu"))
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(before)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["overlay.png", "run_report.json", "segmentation.nii.gz"]
    for name in files:
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o640, name


@pytest.mark.parametrize("argv", [["run", "--help"], ["-l", "DEBUG", "run", "--help"], ["demo", "--help"]])
def test_signals_are_blocked_before_any_library_can_start_a_thread(argv):
    """`segmap run`/`demo` block SIGTERM before numpy (whose BLAS starts threads) is imported: a thread started
    earlier keeps SIGTERM unblocked, and a `docker stop` landing on it kills the run with -15, without clean-up."""
    code = f"""
import sys
import segmap.signals as signals
import segmap.cli as cli
seen = []
real = signals.install
def install():
    seen.append(sorted(m for m in ("numpy", "torch", "scipy") if m in sys.modules))
    return real()
signals.install = install
try:
    cli.main({argv!r})
except SystemExit:
    pass
print(seen)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[[]]", done.stdout
