"""The portal warm (issue 23): request latencies of `segmap portal` beside the network time and a cold MAP container.

On demand, never part of `make test`. It starts `segmap portal` with the demo model (warm-up off, so that the first
request pays the model load as a cold portal would), makes the demo phantom (a NIfTI CT), and prints:

- the first and the next nine ``POST /infer/spleen?output=image`` latencies (MONAI Label's multipart upload), each
  beside the network time (the same bytes uploaded to ``PUT /datastore/`` and as many bytes as the label map
  fetched back), the run's own steps as the portal reports them in its ``Server-Timing`` header (load the NIfTI,
  inference, write the label map: what ``segmap run`` does too), and what is left: the portal's own overhead;
- a cold ``segmap run`` (a new process: imports, model load, inference) on the same file;
- a cold ``docker run`` of the demo model's NIfTI MAP image on the same file (skipped with a message when no
  engine or no image: build it with ``segmap package --model models/demo-spleen/model.ts --task tasks/spleen.yaml
  --tag segmap-test/spleen:ci --cpu``).

Goals: after the first request, overhead beyond the network < 0.3 s, and >= 5x faster end to end than the cold
container. Run: ``.venv/bin/python bench/bench_portal.py [--repeat 10] [--shape 40 112 112] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from pacs import free_port  # noqa: E402

MODEL = ROOT / "models" / "demo-spleen" / "model.ts"
TASK = ROOT / "tasks" / "spleen.yaml"
IMAGE = "segmap-test/spleen:ci-nifti"
TOKEN = "bench-portal-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def start_portal(folder: Path, device: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = {"portal": {"port": port, "warm_up": False, "datastore": {"cache_dir": str(folder / "cache")}},
              "models": {"spleen": {"model": str(MODEL), "task": str(TASK),
                                    "settings": {"device": device, "overlay": False}}}}
    (folder / "portal.yaml").write_text(json.dumps(config))
    log = open(folder / "portal.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "segmap.cli", "portal", "-c", str(folder / "portal.yaml")],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "SEGMAP_PORTAL_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the portal exited: see {folder / 'portal.log'}")
        try:
            if requests.get(url + "/auth/", timeout=1).ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.2)
    raise SystemExit("the portal did not start in 300 s")


def infer(url: str, image: Path) -> tuple[float, requests.Response, dict[str, float]]:
    """One request: its latency, the answer, and the portal's stages in seconds (its Server-Timing header)."""
    t = time.perf_counter()
    r = requests.post(f"{url}/infer/spleen", params={"output": "image"}, headers=AUTH, timeout=900,
                      files={"params": (None, "{}"), "file": (image.name, image.read_bytes())})
    latency = time.perf_counter() - t
    r.raise_for_status()
    stages = {}
    for item in r.headers.get("Server-Timing", "").split(","):
        name, _, duration = item.strip().partition(";dur=")
        stages[name] = float(duration) / 1000
    return latency, r, stages


def network_time(url: str, image: Path, answer_bytes: int) -> float:
    """The same upload into the datastore plus a download of the answer's size (the portal's GET /metrics is
    padded to it by repetition): the transfer cost any request of this size pays."""
    t = time.perf_counter()
    requests.put(f"{url}/datastore/?image=bench", headers=AUTH, timeout=300,
                 files={"params": (None, "{}"), "file": (image.name, image.read_bytes())}).raise_for_status()
    got = 0
    while got < answer_bytes:
        got += len(requests.get(f"{url}/metrics", headers=AUTH, timeout=60).content)
    return time.perf_counter() - t


def cold_segmap_run(image: Path, folder: Path, device: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "segmap.cli", "run", "--model", str(MODEL), "--task", str(TASK), "-i",
                    str(image), "-o", str(folder / "run"), "--device", device, "--no-overlay"], check=True,
                   capture_output=True)
    return time.perf_counter() - t


def cold_docker_run(image: Path, folder: Path, tag: str = IMAGE) -> float | str:
    if shutil.which("docker") is None:
        return "skipped: no docker command"
    if subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode != 0:
        return (f"skipped: no image {tag} on the engine (or no engine); build it with `segmap package --model "
                f"models/demo-spleen/model.ts --task tasks/spleen.yaml --tag segmap-test/spleen:ci --cpu`")
    inp, out = folder / "map-in", folder / "map-out"
    inp.mkdir()
    shutil.copy(image, inp / image.name)
    out.mkdir()
    out.chmod(0o777)  # the image runs as uid 65532
    t = time.perf_counter()
    done = subprocess.run(["docker", "run", "--rm", "--network", "none", "-v", f"{inp}:/var/holoscan/input:ro",
                           "-v", f"{out}:/var/holoscan/output", tag], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        return f"failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10, help="requests in all (the first, then the rest)")
    parser.add_argument("--shape", type=int, nargs=3, default=(40, 112, 112), metavar=("Z", "Y", "X"))
    parser.add_argument("--spacing", type=float, nargs=3, default=(3.0, 1.6, 1.6), metavar=("Z", "Y", "X"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-docker", action="store_true", help="leave out the cold container")
    parser.add_argument("--image", default=IMAGE, help="the demo model's NIfTI MAP image for the cold container")
    args = parser.parse_args(argv)

    from segmap.demo.phantom import make_phantom, write_nifti

    folder = Path(tempfile.mkdtemp(prefix="bench-portal-"))
    image = write_nifti(make_phantom(args.shape, args.spacing, seed=77), folder / "image.nii.gz")
    print(f"input: demo phantom {args.shape[0]}x{args.shape[1]}x{args.shape[2]} at {args.spacing} mm, "
          f"{image.stat().st_size / 1024:.0f} KiB; device {args.device}; {os.cpu_count()} CPU(s)")
    proc, url = start_portal(folder, args.device)
    rows = []
    try:
        for _ in range(args.repeat):
            latency, r, stages = infer(url, image)
            rows.append({"latency": latency, "stages": stages, "network": network_time(url, image, len(r.content))})
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    # overhead: what the request cost beyond the network and the run's own steps (load the NIfTI, segment, write
    # the label map: what `segmap run` does too): HTTP, multipart parsing, the queue, temporary files.
    print(f"\n{'request':>8} {'latency s':>10} {'network s':>10} {'load s':>7} {'inference s':>12} {'write s':>8} "
          f"{'overhead s':>11}")
    for i, row in enumerate(rows):
        st = row["stages"]
        row["overhead"] = row["latency"] - row["network"] - st["load"] - st["inference"] - st["write"]
        print(f"{i + 1:>8} {row['latency']:>10.3f} {row['network']:>10.3f} {st['load']:>7.3f} "
              f"{st['inference']:>12.3f} {st['write']:>8.3f} {row['overhead']:>11.3f}")
    rest = rows[1:] or rows
    median = statistics.median(r["latency"] for r in rest)
    overhead = statistics.median(r["overhead"] for r in rest)
    beyond = statistics.median(r["latency"] - r["network"] - r["stages"]["inference"] for r in rest)
    print(f"\nfirst request {rows[0]['latency']:.2f} s; next {len(rest)}: median {median:.2f} s; beyond the network "
          f"and the network pass {beyond:.3f} s, of which the portal's own overhead {overhead:.3f} s (goal < 0.3 s)")
    run_s = cold_segmap_run(image, folder, args.device)
    print(f"cold `segmap run` (new process): {run_s:.2f} s -> portal {run_s / median:.1f}x faster")
    if args.no_docker:
        print("cold `docker run`: skipped (--no-docker)")
    else:
        docker_s = cold_docker_run(image, folder, args.image)
        if isinstance(docker_s, float):
            print(f"cold `docker run` of {args.image}: {docker_s:.2f} s -> portal {docker_s / median:.1f}x faster "
                  f"(goal >= 5x)")
        else:
            print(f"cold `docker run`: {docker_s}")
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
