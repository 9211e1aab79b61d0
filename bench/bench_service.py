"""The job service's own overhead and its throughput, with real parts: `segmap serve` (DICOM listener), the demo
model's MAP image on the Docker engine, DCMTK's storescu as the modality and an Orthanc as the destination.

For each concurrency (``--slots``, default 1 and 2) it sends ``--studies`` small phantom CT studies (default 20) one
after another and waits until every SEG is confirmed at the destination. It prints, from the job store's records:

- intake overhead: last instance received -> container started, minus the configured quiet period;
- export overhead: container exited -> SEG confirmed at the destination;
- the MAP's own run time (container start -> exit), for comparison;
- throughput: studies per minute from the first instance to the last confirmation.

With ``--workers 1 2 3`` it measures scale-out instead (issue 11): a PostgreSQL job store (Debian's server, started
here), one intake process (the listener) and N worker processes with one slot each, sharing a workdir.

Goal (issue 10): overhead under 2 s beyond the quiet period. The image is built with `segmap package` when the
engine lacks it. Run: ``.venv/bin/python bench/bench_service.py [--studies 20] [--slots 1 2] [--workers 1 2 3]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from pacs import Orthanc, free_port, storescu  # noqa: E402
from service_harness import ServiceProcess  # noqa: E402

IMAGE = "segmap-test/spleen:ci"


def ensure_image() -> None:
    import docker
    try:
        docker.from_env().images.get(IMAGE)
    except docker.errors.ImageNotFound:
        subprocess.run([sys.executable, "-m", "segmap.cli", "package", "--model",
                        str(ROOT / "models" / "demo-spleen" / "model.ts"), "--task", str(ROOT / "tasks" / "spleen.yaml"),
                        "--tag", IMAGE, "--cpu"], check=True)


def run(slots: int, studies: int, slices: int, quiet: float, folder: Path, workers: int = 0) -> dict:
    """``workers`` = 0: one `segmap serve` with ``slots`` slots; else PostgreSQL, one intake and that many workers."""
    from segmap.demo.phantom import write_phantom_study

    dest = Orthanc(folder / "dest", free_port(), free_port()).start()
    destinations = {"orthanc": {"kind": "orthanc", "url": dest.url}}
    procs, pg = [], None
    try:
        if workers:
            from postgres import Postgres
            pg = Postgres(Path(tempfile.mkdtemp(prefix="segmap-pg-")), free_port()).start()
            common = {"database": pg.fresh_database("bench"), "workdir": str(folder / "shared"), "lease_s": 30}
            svc = ServiceProcess(folder / "intake", IMAGE, quiet_period_s=quiet, destinations=destinations,
                                 extra={"service": {**common, "role": "intake", "worker": "intake"}})
            procs = [svc] + [ServiceProcess(folder / f"w{i}", IMAGE, listener=False, quiet_period_s=quiet,
                                            max_concurrent=slots, destinations=destinations,
                                            extra={"service": {**common, "role": "worker", "worker": f"w{i}"}})
                             for i in range(workers)]
        else:
            svc = ServiceProcess(folder / "service", IMAGE, quiet_period_s=quiet, max_concurrent=slots,
                                 destinations=destinations)
            procs = [svc]
        for p in procs:
            p.start()
        cases = [write_phantom_study(folder / f"s{i}", seed=i, shape_zyx=(slices, 64, 64)) for i in range(studies)]
        t0 = time.time()
        for c in cases:
            storescu(c["dicom_files"], svc.port, "SEGMAP")
        jobs = svc.wait_jobs("done", studies, timeout=60 * studies)
        t1 = max(j.finished_at for j in jobs)
    finally:
        for p in procs:
            p.stop()
        dest.stop()
        if pg is not None:
            pg.stop()
            shutil.rmtree(pg.folder, ignore_errors=True)
    first = min(jobs, key=lambda j: j.received_at)
    # Closing a series (quiet period over -> job queued) is the service's overhead for every job; after that a job
    # waits for a free slot, which is queueing, so the start overhead is taken from the first job (slot free).
    close = [j.created_at - j.received_at - quiet for j in jobs]
    export = [j.finished_at - j.run_finished_at for j in jobs]
    runs = [j.run_finished_at - j.started_at for j in jobs]
    return {"slots": slots, "workers": workers, "studies": studies, "intake_first": first.started_at - first.received_at - quiet,
            "close_median": statistics.median(close), "close_max": max(close),
            "export_median": statistics.median(export), "export_max": max(export),
            "run_median": statistics.median(runs), "per_min": studies / ((t1 - t0) / 60), "wall": t1 - t0}

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--slices", type=int, default=12)
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--quiet", type=float, default=1.0, help="quiet period in seconds (default 1)")
    ap.add_argument("--workers", type=int, nargs="*", default=[],
                    help="scale-out: PostgreSQL store, one intake and this many worker processes (one slot each)")
    args = ap.parse_args(argv)
    ensure_image()
    rows = []
    plans = [(1, w) for w in args.workers] if args.workers else [(n, 0) for n in args.slots]
    for slots, workers in plans:
        with tempfile.TemporaryDirectory(prefix="segmap-bench-service-") as tmp:
            rows.append(run(slots, args.studies, args.slices, args.quiet, Path(tmp), workers))
    print(f"\n{args.studies} studies x {args.slices} slices, quiet period {args.quiet:.1f} s")
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]} on {os.cpu_count()} CPUs")
    print("slots | received->started, first job (s) | received->queued median/max (s) | exit->confirmed "
          "median/max (s) | MAP run median (s) | studies/min | wall (s)   [overheads exclude the quiet period]")
    for r in rows:
        label = f"{r['workers']}w" if r["workers"] else str(r["slots"])
        print(f"{label:>5} | {r['intake_first']:>33.2f} | {r['close_median']:>14.2f} / {r['close_max']:<14.2f} | "
              f"{r['export_median']:>14.2f} / {r['export_max']:<5.2f} | {r['run_median']:>18.2f} | "
              f"{r['per_min']:>11.1f} | {r['wall']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
