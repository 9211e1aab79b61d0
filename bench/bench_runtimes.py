"""Other CPU runtimes against segmap's TorchScript paths, one network tile at a time, in one process.

For each network (``--nets``: the bundled demo model, the medium and the realistic-size synthetic networks of
``bench_engine.py``) it runs one patch-sized tile of a CT-like phantom through:

- torch fp32: the plain TorchScript graph (segmap's exact path, and the reference logits here);
- torch frozen fp32: torch's frozen, oneDNN-fused copy (the exact path's other candidate);
- torch bf16 autocast: segmap's fast path (segmentation head in fp32), on CPUs with native bf16;
- ONNX Runtime fp32: the TorchScript network exported with torch's TorchScript-based ONNX exporter (opset 17);
- OpenVINO fp32 and bf16: ``openvino.convert_model`` of the TorchScript network, compiled for the CPU with
  ``INFERENCE_PRECISION_HINT`` f32 or bf16 (bf16 only where OpenVINO reports the capability), and bf16 with
  the segmentation head in fp32 in torch: segmap's OpenVINO fast-path candidate (``pip install segmap[openvino]``).

It prints the median time per tile over ``--repeat`` runs after warm-up (three calls for TorchScript, whose
profiling executor optimises on the first calls; one for the others), the speed-up against torch fp32 and against
torch's best path of the same arithmetic, and the agreement with torch fp32: largest absolute logit difference,
voxel agreement of the tile's argmax and the smallest Dice over the labels present. Runtimes that are not installed are reported as such, not failed:
``pip install onnxruntime openvino`` (neither is a segmap dependency).

    .venv/bin/python bench/bench_runtimes.py --nets demo,medium-net --threads 2
    .venv/bin/python bench/bench_runtimes.py --nets realistic --repeat 2   # minutes on a CPU
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_engine import ROOT, SCENARIOS, synthetic_model  # noqa: E402
from segmap.demo.phantom import make_phantom  # noqa: E402
from segmap.engine.precision import candidates_for, cpu_has_fast_bf16  # noqa: E402
from segmap.model import load_model  # noqa: E402
from segmap_tools.train import ct_normalize  # noqa: E402

CT_PROPS = {"mean": 80.0, "std": 250.0, "percentile_00_5": -150.0, "percentile_99_5": 1000.0}
NETS = ("demo", "medium-net", "realistic")


def model_for(name: str, folder: Path) -> Path:
    if name == "demo":
        return ROOT / "models" / "demo-spleen" / "model.ts"
    sc = SCENARIOS[name]
    return synthetic_model(folder, features=sc["features"], patch=sc["patch"], spacing=sc["target"])


def tile_for(spec) -> torch.Tensor:
    """One patch of a CT-like phantom at the network's spacing, normalised as the model's plans say (CT)."""
    case = make_phantom(tuple(spec.patch_size), tuple(spec.target_spacing), seed=77, extra_labels=True)
    props = dict(spec.normalization[0].intensity_properties) or CT_PROPS
    return torch.from_numpy(ct_normalize(case.hu, props))[None, None].float()


def timed(fn, x, warmup: int, repeat: int) -> tuple[float, np.ndarray]:
    for _ in range(warmup):
        fn(x)
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times), np.asarray(out, dtype=np.float32)


def compare(ref: np.ndarray, out: np.ndarray) -> dict:
    a, b = ref[0].argmax(0), out[0].argmax(0)
    dice = []
    for label in range(1, ref.shape[1]):
        x, y = a == label, b == label
        if x.sum() >= 0.002 * x.size:
            dice.append(2 * float(np.logical_and(x, y).sum()) / float(x.sum() + y.sum()))
    return dict(max_abs=float(np.abs(ref - out).max()), agreement=float((a == b).mean()),
                min_dice=min(dice) if dice else float("nan"), labels=len(dice))


def torch_runners(network) -> dict:
    cpu = torch.device("cpu")
    out = {}
    for cand in candidates_for([network], cpu, None, optimize=None):
        net = cand.networks[0]
        out[cand.name.replace("torchscript", "torch")] = (lambda n: lambda x: n(x).float().numpy())(net)
    if cpu_has_fast_bf16():
        cand = candidates_for([network], cpu, torch.bfloat16, optimize=False)[0]
        net = cand.networks[0]

        def bf16(x, net=net):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return net(x).float().numpy()
        out[cand.name.replace("torchscript", "torch")] = bf16
    return out


def onnxruntime_runner(network, x, threads: int):
    import onnxruntime as ort

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (x,), buffer, dynamo=False, opset_version=17, input_names=["x"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return lambda t: session.run(None, {"x": t.numpy()})[0]


def openvino_runners(network, x, threads: int) -> dict:
    from segmap.engine.openvino_runtime import openvino_module, openvino_networks

    ov = openvino_module()  # its telemetry declined, as segmap does
    core = ov.Core()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ov.convert_model(network, example_input=x)
    out = {}
    segmap_ov = openvino_networks([network], tuple(x.shape[1:]), torch.bfloat16)
    if segmap_ov is not None:  # what segmap's fast path runs where the openvino extra is installed
        out["openvino bf16, fp32 head (segmap)"] = (lambda n: lambda t: n(t).numpy())(segmap_ov[0])
    hints = ["f32"] + (["bf16"] if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else [])
    for hint in hints:
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                     "INFERENCE_NUM_THREADS": threads})
        out[f"openvino {hint.replace('f32', 'fp32')}"] = (lambda c: lambda t: c(t.numpy())[0])(compiled)
    return out


def bench_net(name: str, folder: Path, threads: int, repeat: int) -> list[dict]:
    model = load_model(model_for(name, folder))
    network = model.load_networks("cpu")[0]
    x = tile_for(model.spec)
    print(f"\n{name}: patch {tuple(model.spec.patch_size)}, {sum(p.numel() for p in network.parameters()) / 1e6:.1f} M "
          f"parameters, {model.spec.num_outputs} outputs; {threads} threads", flush=True)
    runners = torch_runners(network)
    notes = {}
    for label, make in (("onnxruntime fp32", lambda: {"onnxruntime fp32": onnxruntime_runner(network, x, threads)}),
                        ("openvino", lambda: openvino_runners(network, x, threads))):
        try:
            t = time.perf_counter()
            made = make()
            notes.update({k: f"converted in {time.perf_counter() - t:.1f} s" for k in made})
            runners.update(made)
        except ImportError as e:
            print(f"  {label}: not installed ({e.name}); skipped")
        except Exception as e:  # a runtime that cannot take the network is a result too
            print(f"  {label}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    rows, ref = [], None
    with torch.inference_mode():
        for runtime, fn in runners.items():
            warmup = 3 if runtime.startswith("torch") else 1  # TorchScript profiles, then optimises
            seconds, out = timed(fn, x, warmup, repeat)
            if ref is None:
                ref = out  # torch fp32, the plain graph: the exact path's arithmetic
            row = dict(net=name, runtime=runtime, seconds=seconds, **compare(ref, out), note=notes.get(runtime, ""))
            rows.append(row)
            print(f"  {runtime:<40} {seconds * 1000:9.0f} ms  max|diff| {row['max_abs']:.2e}  "
                  f"argmax agreement {row['agreement']:.5f}  min Dice {row['min_dice']:.4f}  {row['note']}",
                  flush=True)
    base = rows[0]["seconds"]
    best32 = min(r["seconds"] for r in rows if r["runtime"].startswith("torch") and "fp32 head" not in r["runtime"]
                 and "bf16" not in r["runtime"])
    bf16 = [r["seconds"] for r in rows if r["runtime"].startswith("torch") and "bf16" in r["runtime"]]
    for r in rows:
        r["vs_torch_fp32"] = base / r["seconds"]
        same = bf16[0] if ("bf16" in r["runtime"] and bf16) else best32
        r["vs_torch_best_same_arithmetic"] = same / r["seconds"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default="demo,medium-net", help=f"comma-separated, from {', '.join(NETS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per runtime (median reported)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    for n in nets:
        if n not in NETS:
            ap.error(f"unknown net {n!r} (use {', '.join(NETS)})")
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in nets:
            rows += bench_net(n, Path(tmp) / n, args.threads, args.repeat)
    print("\n| net | runtime | ms per tile | vs torch fp32 | vs torch's best of the same arithmetic | "
          "max abs logit diff | argmax agreement | min Dice |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['net']} | {r['runtime']} | {r['seconds'] * 1000:.0f} | {r['vs_torch_fp32']:.2f}x | "
              f"{r['vs_torch_best_same_arithmetic']:.2f}x | {r['max_abs']:.1e} | {r['agreement']:.5f} | "
              f"{r['min_dice']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
