"""The prepared GPU check of issue 12: one script for a lent CUDA machine (about 5 minutes on one GPU).

``bench/gpu_check.sh`` runs it on the device machine (``make gpu-prep`` first, here, gathers what has
to travel); ``python -m bench.gpu_check [--device cuda] [--out DIR] [--quick] [--skip-pytest]``:

1. the environment (torch, CUDA, the GPU, bf16 support, TF32 flags after a Net is placed on it);
2. every golden forward/backward and solver case of real BVLC Caffe on the device (pytest with
   ``CAFFEPORT_TEST_DEVICE``: the tests compare to Caffe's numbers within each case's tolerances);
3. ``caffeport train --gpu N`` (the CLI, LMDB data, fine-tuning with a renamed layer) on the golden
   case ``solver_finetune_renamed_lmdb``: the logged losses against Caffe's trace; then the same
   fine-tuning for 300 iterations (finite losses, the last snapshot written), and ``caffeport test``
   of its snapshot, exact and ``--fast`` (losses within 5e-2);
4. inference on ResNet-50 (deploy net from the corpus, seeded weights, batch 64): fast vs exact max
   relative error, and images/s of exact and fast, alternated round by round (medians);
5. training on CaffeNet (batch 32): exact vs fast (``Solver.enable_fast()``; compiled on CUDA by
   default) iterations/s, alternated, and the first-batch check.

Each step's result goes into ``DIR/gpu_check.json`` and a summary line; exit status 1 when a check
failed. ``--quick`` (tiny batches, few rounds, fast mode eager) is what the test suite runs on the
CPU to keep this script working; it measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
RESNET50 = SHARED / "corpus" / "3_model_zoo" / "resnet_KaimingHe" / "prototxt" / "ResNet-50-deploy.prototxt"
FINETUNE = "solver_finetune_renamed_lmdb"


def _env() -> dict[str, str]:
    """The environment of the subprocesses: this checkout first on the path (then carried wheels)."""
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=str(REPO) + (os.pathsep + path if path else ""))


def environment(device: torch.device) -> dict[str, Any]:
    from caffeport.net import exact_cuda_math

    out: dict[str, Any] = {"torch": torch.__version__, "device": str(device), "ok": True}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["bf16"] = torch.cuda.is_bf16_supported()
        exact_cuda_math()
        out["tf32_off"] = not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        out["ok"] = out["tf32_off"]
    return out


def goldens(device: torch.device, workers: int) -> dict[str, Any]:
    """The golden forward/backward and solver tests, on ``device``."""
    env = dict(_env(), CAFFEPORT_TEST_DEVICE=str(device))
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
           "tests/test_golden_forward.py", "tests/solver/test_golden_solver.py"]
    cmd += ["-n", str(workers)] if workers > 1 else []
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    tail = (r.stdout + r.stderr).strip().splitlines()
    summary = next((ln for ln in reversed(tail) if " passed" in ln or " failed" in ln), tail[-1] if tail else "")
    failed = [ln for ln in tail if ln.startswith("FAILED")]
    return {"ok": r.returncode == 0, "summary": summary,
            "failed": failed[:40], "seconds": round(time.perf_counter() - t, 1)}


_LOSS_LINE = re.compile(r"Iteration (\d+)(?: \([^)]*\))?, loss = (\S+)")


def _caffeport(args: list[str], cwd: Path, no_compile: bool = False) -> tuple[subprocess.CompletedProcess, str]:
    """``python -m caffeport ARGS`` in ``cwd``: the process and its log text (stderr + stdout)."""
    env = dict(_env(), **({"CAFFEPORT_NO_COMPILE": "1"} if no_compile else {}))
    r = subprocess.run([sys.executable, "-m", "caffeport", *args], cwd=cwd, env=env, capture_output=True, text=True)
    return r, r.stderr + r.stdout


def _last_line(r: subprocess.CompletedProcess) -> str:
    return "" if r.returncode == 0 else ((r.stderr or r.stdout).strip().splitlines() or [""])[-1]


def cli_train(device: torch.device, workdir: Path, long_iterations: int, compile: bool | None) -> dict[str, Any]:
    """``caffeport train [--gpu N]`` on the LMDB fine-tuning golden case (losses vs Caffe's trace), then
    ``long_iterations`` of it, then ``caffeport test`` of its snapshot, exact vs ``--fast``."""
    from caffeport.io import load_caffemodel, save_caffemodel
    from tests.golden import caffe_filled_params, case_dir, case_info, npz

    d = workdir / FINETUNE
    shutil.copytree(case_dir(FINETUNE), d)
    rtol = case_info(FINETUNE)["rtol"]
    gpu = ["--gpu", str(device.index or 0)] if device.type == "cuda" else []
    # Caffe filled the renamed layer with its own RNG: start it from Caffe's values, via --weights
    weights = load_caffemodel(d / "init.caffemodel")
    for layer, blobs in caffe_filled_params(FINETUNE).items():
        weights[layer] = [blobs[i] for i in sorted(blobs)]
    save_caffemodel(weights, d / "init_ft.caffemodel")
    text = (d / "solver.prototxt").read_text()
    for name, display in (("solver_check.prototxt", 1), ("solver_long.prototxt", 10)):
        (d / name).write_text(re.sub(r"(?m)^display: \d+", f"display: {display}", text))

    r, log = _caffeport(["train", "solver_check.prototxt", "--weights", "init_ft.caffemodel", *gpu], d)
    got = {int(m.group(1)): float(m.group(2)) for m in _LOSS_LINE.finditer(log)}
    want = npz(FINETUNE, "trace.npz")["loss"].astype(np.float64)
    rel = [abs(got[i] - want[i]) / max(abs(want[i]), 1e-12) for i in sorted(got) if i < len(want)]
    err = max(rel) if rel else float("inf")
    out: dict[str, Any] = {"exit": r.returncode, "iterations_compared": len(rel), "of": len(want),
                           "max_rel_error_vs_caffe": err, "error": _last_line(r)}
    ok = r.returncode == 0 and len(rel) == len(want) and err <= max(10 * rtol, 1e-4)

    # the same fine-tuning for longer (the LMDB cycles, tests every 4 iterations): it must finish, log
    # finite losses and write its last snapshot
    t = time.perf_counter()
    r, log = _caffeport(["train", "solver_long.prototxt", "--weights", "init_ft.caffemodel", *gpu,
                         "--iterations", str(long_iterations), "--snapshot_prefix", "long"], d)
    losses = [float(m.group(2)) for m in _LOSS_LINE.finditer(log)]
    snap = d / f"long_iter_{long_iterations}.caffemodel"
    out["long_run"] = {"iterations": long_iterations, "exit": r.returncode,
                       "seconds": round(time.perf_counter() - t, 1), "losses_logged": len(losses),
                       "last_loss": losses[-1] if losses else None, "snapshot": snap.exists(),
                       "error": _last_line(r)}
    ok = ok and r.returncode == 0 and bool(losses) and bool(np.all(np.isfinite(losses))) and snap.exists()

    # `caffeport test` on the TEST phase of that net with the snapshot, exact and --fast
    tests: dict[str, Any] = {}
    for mode, extra in (("exact", []), ("fast", ["--fast"])):
        r, log = _caffeport(["test", "--model", "train.prototxt", "--weights", snap.name, "--iterations", "2",
                             *gpu, *extra], d, no_compile=compile is False)
        loss = re.findall(r"\] Loss: (\S+)", log)
        tests[mode] = {"exit": r.returncode, "loss": float(loss[-1]) if loss else None, "error": _last_line(r)}
    le, lf = tests["exact"]["loss"], tests["fast"]["loss"]
    tests["rel_difference"] = abs(lf - le) / max(abs(le), 1e-12) if le is not None and lf is not None else None
    out["cli_test"] = tests
    out["ok"] = bool(ok and tests["rel_difference"] is not None and tests["rel_difference"] <= 5e-2)
    return out


def _alternate(runs: dict[str, Any], rounds: int, per_round: int, sync: Any) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, fn in runs.items():
            fn()
            sync()
            t = time.perf_counter()
            for _ in range(per_round):
                fn()
            sync()
            times[k].append((time.perf_counter() - t) / per_round)
    return {k: statistics.median(v) for k, v in times.items()}


def inference(device: torch.device, batch: int, rounds: int, compile: bool | None) -> dict[str, Any]:
    from caffeport.export.common import load_deploy_net, randomize_weights
    from caffeport.fast import build_fast

    net = load_deploy_net(RESNET50, None, batch=batch)
    randomize_weights(net, 0)
    net.to(device)
    t = time.perf_counter()
    fast = build_fast(net, compile=compile)
    build_s = time.perf_counter() - t
    x = torch.randn(tuple(net.blobs[net.inputs[0]].shape), generator=torch.Generator().manual_seed(1)).to(device)
    out = net.outputs[0]
    with torch.no_grad():
        want = net.module(**{net.inputs[0]: x})[out]
    got = fast(**{net.inputs[0]: x})[out]
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))

    def exact() -> None:
        with torch.no_grad():
            net.module(**{net.inputs[0]: x})

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    med = _alternate({"exact": exact, "fast": lambda: fast(**{net.inputs[0]: x})}, rounds, 3, sync)
    return {"ok": err <= fast.tolerance, "net": "ResNet-50", "batch": batch, "precision": fast.precision,
            "compiled": fast.compiled, "fast_build_s": round(build_s, 1), "max_rel_error": err,
            "exact_img_s": batch / med["exact"], "fast_img_s": batch / med["fast"],
            "fast_over_exact": med["exact"] / med["fast"], "notices": fast.notices}


def training(device: torch.device, batch: int, rounds: int, compile: bool | None) -> dict[str, Any]:
    from bench.bench_training import _solver

    rng = np.random.default_rng(1)
    x = rng.normal(size=(batch, 3, 227, 227)).astype(np.float32)
    y = rng.integers(0, 1000, size=batch).astype(np.float32)
    solvers = {k: _solver(batch, x, y, device) for k in ("exact", "fast")}
    t = time.perf_counter()
    solvers["fast"].enable_fast(compile=compile)
    solvers["exact"].step(1)
    solvers["fast"].step(1)
    first_s = time.perf_counter() - t
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    med = _alternate({k: (lambda s=s: s.step(1)) for k, s in solvers.items()}, rounds, 1, sync)
    fast = solvers["fast"].fast
    finite = all(np.isfinite(s.last_loss) for s in solvers.values())
    return {"ok": finite and fast.checked, "net": "CaffeNet", "batch": batch, "summary": fast.summary(),
            "first_iteration_s": round(first_s, 1), "exact_iter_s": 1 / med["exact"],
            "fast_iter_s": 1 / med["fast"], "fast_over_exact": med["exact"] / med["fast"],
            "loss_exact": solvers["exact"].last_loss, "loss_fast": solvers["fast"].last_loss}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="tiny sizes, fast mode eager (the CPU self-test)")
    ap.add_argument("--skip-pytest", action="store_true", help="leave out step 2 (the golden tests)")
    ap.add_argument("--workers", type=int, default=4, help="pytest-xdist workers for step 2")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here", flush=True)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    compile = False if args.quick else None
    steps: dict[str, Any] = {
        "environment": lambda: environment(device),
        "goldens": None if args.skip_pytest else (lambda: goldens(device, args.workers)),
        "cli_train": lambda: cli_train(device, Path(tempfile.mkdtemp(prefix="gpu_check_")), 20 if args.quick else 300,
                                       compile),
        "inference": lambda: inference(device, 2 if args.quick else 64, 2 if args.quick else 7, compile),
        "training": lambda: training(device, 2 if args.quick else 32, 2 if args.quick else 5, compile),
    }
    report: dict[str, Any] = {}
    for name, step in steps.items():
        if step is None:
            continue
        t = time.perf_counter()
        try:
            report[name] = step()
        except Exception as e:  # one broken step must not hide the others
            report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                            "traceback": traceback.format_exc().splitlines()[-8:]}
        report[name]["step_s"] = round(time.perf_counter() - t, 1)
        print(f"gpu_check {name}: " + json.dumps(report[name], default=str), flush=True)
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    bad = [k for k, v in report.items() if not v.get("ok")]
    failed = f"; failed: {', '.join(bad)}" if bad else ""
    print(f"gpu_check: {len(report) - len(bad)} of {len(report)} steps ok{failed}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
