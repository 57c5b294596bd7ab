"""Side by side: caffeport exact, caffeport fast, onnxruntime (on caffeport's ONNX), OpenCV dnn.

``python -m bench side_by_side [--nets caffenet,googlenet,resnet50,squeezenet,mobilenet]
[--batches 1,16] [--rounds 5] [--iters 2] [--threads 2] [--no-compile] [--cold] [--profile] [--quick]``

``--quick`` (what ``make bench`` runs): 3 rounds of >= 1 forward and >= 0.3 s per engine. Fast mode compiles as it
does for users (unless ``CAFFEPORT_NO_COMPILE=1`` or ``--no-compile``).

Deploy nets from ../shared/corpus with fixed seeded weights (``randomize_weights``), the same thread
count for every engine (torch.set_num_threads, ort intra_op_num_threads, cv2.setNumThreads), one
worker process per engine (in one process onnxruntime's spinning threads kept both cores busy while
torch ran: CaffeNet batch 1 exact fell from ~26 to ~3 img/s), engines alternated round by round (the
order rotates each round), medians of the rounds. The engine processes keep OpenMP's default wait
policy, as users get it (``--omp-wait-policy PASSIVE`` for a CPU shared with other jobs: there torch's
spinning barriers once made it 7-10x slower at batch 1; with the cores to itself PASSIVE costs torch
a thread wake-up per op: SqueezeNet batch 1 fast 129 img/s under PASSIVE, 222 under the default);
onnxruntime keeps its own default (spinning) thread pool. Prints images/s,
each engine's ratio to caffeport fast, each engine's max relative error vs caffeport exact
(``max|y - exact| / max|exact|`` on the outputs), and the caffemodel load time as a ratio to
protobuf's own ``ParseFromString`` of the same file. ``--cold``: per engine, a fresh subprocess from
import to first output (seconds) and its peak RSS. ``--profile``: torch.profiler table of one
ResNet-50 forward (exact and fast) and the achieved GFLOP/s against the CPU's fp32 peak and, for a
bf16 fast build, its bf16 peak (2x fp32 with AVX512-BF16's ``vdpbf16ps``).
Timings are ratios measured in one run on a shared CPU: read them as such.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CORPUS = (REPO / ".." / "shared" / "corpus").resolve()
NETS = {
    "caffenet": "2_bvlc_caffe/head/models/bvlc_reference_caffenet/deploy.prototxt",
    "googlenet": "2_bvlc_caffe/head/models/bvlc_googlenet/deploy.prototxt",
    "resnet50": "3_model_zoo/resnet_KaimingHe/prototxt/ResNet-50-deploy.prototxt",
    "squeezenet": "3_model_zoo/squeezenet_forresti/SqueezeNet_v1.1/deploy.prototxt",
    "mobilenet": "3_model_zoo/mobilenet_shicai/mobilenet_deploy.prototxt",
}
ENGINES = ["exact", "fast", "ort", "opencv"]
GOALS = {16: (1.2, 1.5), 1: (1.0, 1.0)}  # issue 12: fast / onnxruntime, fast / OpenCV dnn


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    got = np.asarray(got, np.float64).reshape(want.shape)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


class Engines:
    """The four engines on one net at one batch size, each a ``run(x) -> first output`` callable."""

    def __init__(self, name: str, batch: int, threads: int, workdir: Path, compile: bool | None,
                 only: str | None = None):
        from caffeport.export.common import load_deploy_net, randomize_weights
        from caffeport.export.onnx import net_to_onnx
        from caffeport.fast import build_fast

        want = set(ENGINES) if only is None else {only}
        self.prototxt = CORPUS / NETS[name]
        self.net = load_deploy_net(self.prototxt, None, batch=batch)
        randomize_weights(self.net, 0)  # seeded: every worker process gets the same weights
        self.input = self.net.inputs[0]
        self.output = self.net.outputs[0]
        self.caffemodel = workdir / f"{name}.caffemodel"
        if not self.caffemodel.exists():
            self.net.save(self.caffemodel)
        self.fast: Any = None
        self.fast_build_s = 0.0
        self.fast_report = ""
        if "fast" in want:
            t = time.perf_counter()
            self.fast = build_fast(self.net, compile=compile)
            self.fast_build_s = time.perf_counter() - t
            self.fast_report = self.fast.report.summary()
        if "ort" in want:
            import onnxruntime as ort

            export = net_to_onnx(self.net)
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            self.ort = ort.InferenceSession(export.model.SerializeToString(), so,
                                            providers=["CPUExecutionProvider"])
            self.ort_in = self.ort.get_inputs()[0].name
        if "opencv" in want:
            import cv2

            cv2.setNumThreads(threads)
            self.cv = cv2.dnn.readNetFromCaffe(str(self.prototxt), str(self.caffemodel))
            self.cv.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
            self.cv.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        self.shape = tuple(self.net.blobs[self.input].shape)

    def run(self, engine: str, x: np.ndarray) -> np.ndarray:
        if engine == "exact":
            with torch.no_grad():
                return self.net.module(**{self.input: torch.from_numpy(x)})[self.output].numpy()
        if engine == "fast":
            return self.fast(**{self.input: x})[self.output].numpy()
        if engine == "ort":
            return self.ort.run([self.output], {self.ort_in: x})[0]
        self.cv.setInput(x)
        return self.cv.forward(self.output)


def _worker(conn: Any, name: str, batch: int, threads: int, workdir: str, compile: bool | None,
            engine: str) -> None:
    """One engine in its own process (its thread pool cannot spin on the cores while another engine
    runs): answers ``("out",)`` with the output, ``("time", n)`` with the seconds of n forwards (after
    one untimed forward: the steady state, not the wake-up from the other engines' rounds)."""
    torch.set_num_threads(threads)
    try:
        eng = Engines(name, batch, threads, Path(workdir), compile, only=engine)
        x = np.random.default_rng(1).standard_normal(eng.shape).astype(np.float32)
        eng.run(engine, x)
        info = {"shape": eng.shape, "fast_build_s": eng.fast_build_s, "passes": eng.fast_report,
                "fast": "" if eng.fast is None else eng.fast.precision + ("+compile" if eng.fast.compiled else "")}
        conn.send(("ready", info))
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    while True:
        msg = conn.recv()
        if msg[0] == "out":
            conn.send(eng.run(engine, x))
        elif msg[0] == "time":
            eng.run(engine, x)  # untimed: wakes this engine's thread pool after the others' rounds
            t = time.perf_counter()
            for _ in range(msg[1]):
                eng.run(engine, x)
            conn.send(time.perf_counter() - t)
        else:
            return


class EngineProcs:
    """The four engines of one net and batch, one worker process each (started one after the other)."""

    def __init__(self, name: str, batch: int, threads: int, workdir: Path, compile: bool | None):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.procs: dict[str, Any] = {}
        self.conns: dict[str, Any] = {}
        self.info: dict[str, dict[str, Any]] = {}
        for e in ENGINES:  # exact first: it writes the caffemodel OpenCV reads
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, name, batch, threads, str(workdir), compile, e),
                               daemon=True)
            proc.start()
            self.procs[e], self.conns[e] = proc, parent
            kind, info = parent.recv()
            if kind != "ready":
                self.close()
                raise RuntimeError(f"{name} batch {batch}: engine {e} failed to start: {info}")
            self.info[e] = info
        self.prototxt = CORPUS / NETS[name]
        self.caffemodel = workdir / f"{name}.caffemodel"
        self.shape = self.info["exact"]["shape"]

    def out(self, engine: str) -> np.ndarray:
        self.conns[engine].send(("out",))
        return self.conns[engine].recv()

    def seconds(self, engine: str, n: int) -> float:
        self.conns[engine].send(("time", n))
        return self.conns[engine].recv()

    def close(self) -> None:
        for e, conn in self.conns.items():
            try:
                conn.send(("stop",))
            except OSError:
                pass
            self.procs[e].join(timeout=30)
            if self.procs[e].is_alive():
                self.procs[e].kill()


def caffemodel_load_ratio(path: Path, repeat: int = 3) -> float:
    """caffeport's ``load_caffemodel`` time / protobuf ``ParseFromString`` time (best of ``repeat``)."""
    from caffeport.io import load_caffemodel
    from caffeport.proto import caffe_pb2

    data = path.read_bytes()

    def best(fn: Any) -> float:
        out = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t)
        return out

    ours = best(lambda: load_caffemodel(path))
    theirs = best(lambda: caffe_pb2.NetParameter().ParseFromString(data))
    return ours / theirs


_COLD = r"""
import sys, time, json
t0 = time.perf_counter()
engine, prototxt, caffemodel, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
shape = tuple(int(d) for d in sys.argv[5].split(","))
import numpy as np
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
if engine == "opencv":
    import cv2
    cv2.setNumThreads(threads)
    net = cv2.dnn.readNetFromCaffe(prototxt, caffemodel)
    net.setInput(x)
    net.forward()
else:
    import torch
    torch.set_num_threads(threads)
    from caffeport.export.common import load_deploy_net
    n = load_deploy_net(prototxt, caffemodel, batch=shape[0])
    if engine == "exact":
        with torch.no_grad():
            n.module(torch.from_numpy(x))
    elif engine == "fast":
        from caffeport.fast import build_fast
        build_fast(n, compile=False)(torch.from_numpy(x))
    else:
        import onnxruntime as ort
        from caffeport.export.onnx import net_to_onnx
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        s = ort.InferenceSession(net_to_onnx(n).model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        s.run(None, {s.get_inputs()[0].name: x})
dt = time.perf_counter() - t0
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(json.dumps({"cold_s": dt, "rss_mb": int(hwm.split()[1]) / 1024}))
"""


def cold_start(engine: str, prototxt: Path, caffemodel: Path, shape: tuple[int, ...], threads: int
               ) -> dict[str, Any]:
    """One fresh process: import to first output (s) and peak RSS (MB)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _COLD, engine, str(prototxt), str(caffemodel), str(threads),
                          ",".join(str(d) for d in shape)], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0:
        return {"cold_s": float("nan"), "rss_mb": float("nan"), "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_fp32_peak_gflops(cores: int) -> tuple[float, str]:
    """cores x 2 FMA pipes x lanes x 2 flop x clock (from /proc/cpuinfo; AVX-512 or AVX2 lanes)."""
    mhz, flags = 0.0, ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("cpu MHz") and not mhz:
                mhz = float(line.split(":")[1])
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    # Zen 4 runs AVX-512 on two 256-bit FMA pipes: 16 fp32 FMA/cycle/core, as AVX2 with 2 pipes.
    lanes = 8
    peak = cores * 2 * lanes * 2 * mhz / 1e3
    return peak, f"{cores} cores x 2 FMA pipes x {lanes} fp32 lanes x 2 flop x {mhz / 1e3:.2f} GHz"


def profile_resnet50(threads: int, compile: bool | None) -> None:
    from torch.profiler import ProfilerActivity, profile

    from caffeport.export.common import load_deploy_net, randomize_weights
    from caffeport.fast import build_fast

    net = load_deploy_net(CORPUS / NETS["resnet50"], None, batch=16)
    randomize_weights(net, 0)
    x = torch.randn(16, 3, 224, 224)
    fast = build_fast(net, compile=compile)
    gflop = 7.72 * 16  # ResNet-50 at 224: 3.86 GMAC per image
    peak, how = cpu_fp32_peak_gflops(threads)
    for label, fn in [("exact", lambda: net.module(data=x)), ("fast", lambda: fast(data=x))]:
        with torch.no_grad():
            fn()
            fn()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t = time.perf_counter()
                fn()
                dt = time.perf_counter() - t
        kind = "fp32" if label == "exact" else fast.precision + ("+compile" if fast.compiled else "")
        bf16 = f", {gflop / dt / (2 * peak):.0%} of bf16 peak {2 * peak:.0f}" if "bf16" in kind else ""
        print(f"\n-- ResNet-50 batch 16, {label} ({kind}): {dt:.2f} s, {gflop / dt:.0f} GFLOP/s = "
              f"{gflop / dt / peak:.0%} of fp32 peak {peak:.0f} GFLOP/s ({how}){bf16}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=40))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench side_by_side")
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=2, help="forwards per engine per round (at least)")
    ap.add_argument("--min-round-s", type=float, default=0.3,
                    help="more forwards per round until one round of an engine lasts about this long")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="fast mode with/without torch.compile (default: as for users, compiled unless "
                         "CAFFEPORT_NO_COMPILE=1)")
    ap.add_argument("--quick", action="store_true", help="3 rounds x 1 forward (make bench)")
    ap.add_argument("--cold", action="store_true", help="cold start + peak RSS per engine (subprocesses)")
    ap.add_argument("--profile", action="store_true", help="profile one ResNet-50 forward")
    ap.add_argument("--omp-wait-policy", default="default", choices=["PASSIVE", "ACTIVE", "default"],
                    help="OMP_WAIT_POLICY of the engine processes (torch's OpenMP threads): default (as "
                         "inherited; OpenMP spins briefly, then sleeps) is what users get; PASSIVE sleeps at "
                         "once (better when other jobs hold the cores, slower at batch 1 otherwise); ACTIVE "
                         "always spins")
    args = ap.parse_args(argv if argv is not None else [])
    if args.omp_wait_policy != "default":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # read by the spawned engine processes
    if args.quick:
        args.rounds, args.iters = 3, 1
    torch.set_num_threads(args.threads)
    nets = [n for n in args.nets.split(",") if n]
    batches = [int(b) for b in args.batches.split(",") if b]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in nets:
            for batch in batches:
                eng = EngineProcs(name, batch, args.threads, work, args.compile)
                exact = eng.out("exact")
                errs, iters = {}, {}
                for e in ENGINES:  # each engine runs >= --min-round-s per round
                    errs[e] = _rel(eng.out(e), exact)
                    iters[e] = max(args.iters, math.ceil(args.min_round_s / max(eng.seconds(e, 1), 1e-6)))
                times: dict[str, list[float]] = {e: [] for e in ENGINES}
                for r in range(args.rounds):
                    order = ENGINES[r % len(ENGINES):] + ENGINES[:r % len(ENGINES)]
                    for e in order:
                        times[e].append(batch * iters[e] / eng.seconds(e, iters[e]))
                eng.close()
                ips = {e: statistics.median(v) for e, v in times.items()}
                fast_info = eng.info["fast"]
                row = {"net": name, "batch": batch, "ips": ips, "err": errs, "fast": fast_info["fast"],
                       "fast_build_s": fast_info["fast_build_s"], "passes": fast_info["passes"]}
                if batch == batches[0]:
                    row["load_ratio"] = caffemodel_load_ratio(eng.caffemodel)
                if args.cold and batch == batches[0]:
                    row["cold"] = {e: cold_start(e, eng.prototxt, eng.caffemodel, eng.shape, args.threads)
                                   for e in ENGINES}
                rows.append(row)
                f = ips["fast"]
                print(f"{name:10s} b{batch:<3d} img/s exact {ips['exact']:7.1f}  fast {f:7.1f} ({row['fast']})  "
                      f"ort {ips['ort']:7.1f}  opencv {ips['opencv']:7.1f} | fast/exact {f / ips['exact']:.2f}x  "
                      f"fast/ort {f / ips['ort']:.2f}x  fast/opencv {f / ips['opencv']:.2f}x | max rel err vs exact: "
                      + "  ".join(f"{e} {errs[e]:.1e}" for e in ENGINES[1:]), flush=True)
                if "load_ratio" in row:
                    print(f"{'':10s} caffemodel load: {row['load_ratio']:.2f}x protobuf ParseFromString; "
                          f"fast build {row['fast_build_s']:.1f} s ({row['passes']})", flush=True)
                if "cold" in row:
                    print(f"{'':10s} cold start / peak RSS: " + "  ".join(
                        f"{e} {c['cold_s']:.1f} s {c['rss_mb']:.0f} MB" for e, c in row["cold"].items()), flush=True)
                del eng
    if rows:
        print(f"\nfast vs the others (medians of {args.rounds} alternated rounds of >= {args.iters} forwards "
              f"and >= {args.min_round_s} s, "
              f"{args.threads} threads, OMP_WAIT_POLICY {args.omp_wait_policy}; a shared machine: other "
              "processes may be running). Goals: batch >= 16: "
              f"fast >= {GOALS[16][0]}x ort and >= {GOALS[16][1]}x opencv; batch 1: >= {GOALS[1][0]}x both")
        print(f"{'net':10s} {'batch':>5s} {'fast img/s':>10s} {'/exact':>7s} {'/ort':>6s} {'/opencv':>7s}  goal")
        for row in rows:
            ips, b = row["ips"], row["batch"]
            g_ort, g_cv = GOALS[16] if b >= 16 else GOALS[1]
            r_ort, r_cv = ips["fast"] / ips["ort"], ips["fast"] / ips["opencv"]
            print(f"{row['net']:10s} {b:5d} {ips['fast']:10.1f} {ips['fast'] / ips['exact']:6.2f}x {r_ort:5.2f}x "
                  f"{r_cv:6.2f}x  {'met' if r_ort >= g_ort and r_cv >= g_cv else 'MISSED'} ({row['fast']})")
    if args.profile:
        profile_resnet50(args.threads, args.compile)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
