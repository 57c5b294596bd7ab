"""Training throughput: caffeport's Solver on CaffeNet vs a hand-written PyTorch CaffeNet.

Both train ``bvlc_reference_caffenet`` (batch 32, 3x227x227, LRN, grouped convs, dropout) on the
same synthetic batch with SGD (momentum 0.9, weight decay 5e-4), in the same process: caffeport
through ``get_solver`` on a ``net_param`` with Input layers, PyTorch with ``torch.optim.SGD``.
Prints iterations/s for each and the ratio (caffeport / PyTorch; 1.0 = no overhead). A few
iterations only (``--iterations``), after one warm-up iteration each. No asserts.

Then exact vs fast training (``caffeport.fast_train``: channels_last, bf16 conv/fc on AVX512-BF16/AMX
CPUs, torch.compile): two Solvers on the same net, seeds and batch, one iteration each in turn
(``--rounds``), medians of the per-iteration times, the ratio fast / exact throughput, and the
first-batch check. The fast solver's first iteration (check + compile) is timed apart.
``--fast-only`` skips the PyTorch comparison; ``--no-compile`` measures eager fast mode
(as ``CAFFEPORT_NO_COMPILE=1``); the default (``make bench``) is eager (compiling CaffeNet's
training graph takes minutes on 2 cores), ``--compile`` compiles.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch
from google.protobuf import text_format
from torch import nn

from caffeport.proto import caffe_pb2
from caffeport.solver import get_solver


def _conv(name: str, bottom: str, n: int, k: int, s: int = 1, p: int = 0, g: int = 1, bias: float = 0.0) -> str:
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
            f'param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }} '
            f'convolution_param {{ num_output: {n} kernel_size: {k} stride: {s} pad: {p} group: {g} '
            f'weight_filler {{ type: "gaussian" std: 0.01 }} bias_filler {{ type: "constant" value: {bias} }} }} }}\n'
            f'layer {{ name: "relu_{name}" type: "ReLU" bottom: "{name}" top: "{name}" }}\n')


def _pool(name: str, bottom: str) -> str:
    return (f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}" '
            f'pooling_param {{ pool: MAX kernel_size: 3 stride: 2 }} }}\n')


def _lrn(name: str, bottom: str) -> str:
    return (f'layer {{ name: "{name}" type: "LRN" bottom: "{bottom}" top: "{name}" '
            f'lrn_param {{ local_size: 5 alpha: 0.0001 beta: 0.75 }} }}\n')


def _fc(name: str, bottom: str, n: int, std: float, bias: float, relu_drop: bool) -> str:
    s = (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
         f'param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }} '
         f'inner_product_param {{ num_output: {n} weight_filler {{ type: "gaussian" std: {std} }} '
         f'bias_filler {{ type: "constant" value: {bias} }} }} }}\n')
    if relu_drop:
        s += (f'layer {{ name: "relu_{name}" type: "ReLU" bottom: "{name}" top: "{name}" }}\n'
              f'layer {{ name: "drop_{name}" type: "Dropout" bottom: "{name}" top: "{name}" '
              f'dropout_param {{ dropout_ratio: 0.5 }} }}\n')
    return s


def caffenet_prototxt(batch: int) -> str:
    return (
        'name: "CaffeNet"\n'
        f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: {batch} dim: 3 dim: 227 '
        'dim: 227 } } }\n'
        f'layer {{ name: "label" type: "Input" top: "label" input_param {{ shape {{ dim: {batch} }} }} }}\n'
        + _conv("conv1", "data", 96, 11, s=4) + _pool("pool1", "conv1") + _lrn("norm1", "pool1")
        + _conv("conv2", "norm1", 256, 5, p=2, g=2, bias=1) + _pool("pool2", "conv2") + _lrn("norm2", "pool2")
        + _conv("conv3", "norm2", 384, 3, p=1) + _conv("conv4", "conv3", 384, 3, p=1, g=2, bias=1)
        + _conv("conv5", "conv4", 256, 3, p=1, g=2, bias=1) + _pool("pool5", "conv5")
        + _fc("fc6", "pool5", 4096, 0.005, 1, True) + _fc("fc7", "fc6", 4096, 0.005, 1, True)
        + _fc("fc8", "fc7", 1000, 0.01, 0, False)
        + 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc8" bottom: "label" top: "loss" }\n'
    )


class TorchCaffeNet(nn.Module):
    """CaffeNet by hand: ceil-mode pooling and LRN as Caffe's ACROSS_CHANNELS."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, 11, 4), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True), nn.LocalResponseNorm(5, 1e-4, 0.75),
            nn.Conv2d(96, 256, 5, 1, 2, groups=2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.LocalResponseNorm(5, 1e-4, 0.75),
            nn.Conv2d(256, 384, 3, 1, 1), nn.ReLU(), nn.Conv2d(384, 384, 3, 1, 1, groups=2), nn.ReLU(),
            nn.Conv2d(384, 256, 3, 1, 1, groups=2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(9216, 4096), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(),
            nn.Dropout(0.5), nn.Linear(4096, 1000),
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _solver(batch: int, x: np.ndarray, y: np.ndarray, device: str | torch.device | None = None) -> Any:
    torch.manual_seed(0)
    param = caffe_pb2.SolverParameter(base_lr=0.01, momentum=0.9, weight_decay=5e-4, lr_policy="fixed",
                                      max_iter=10**6, display=0, snapshot=0, snapshot_after_train=False)
    text_format.Parse(caffenet_prototxt(batch), param.net_param)
    solver = get_solver(param, device=device)
    solver.net.blobs["data"].data[...] = x
    solver.net.blobs["label"].data[...] = y
    return solver


def exact_vs_fast(batch: int, rounds: int, compile: bool) -> float:
    """Exact vs fast CaffeNet training, alternated; prints and returns the throughput ratio."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(batch, 3, 227, 227)).astype(np.float32)
    y = rng.integers(0, 1000, size=batch).astype(np.float32)
    exact, fast = _solver(batch, x, y), _solver(batch, x, y)
    fast.enable_fast(compile=compile)
    exact.step(1)
    t = time.perf_counter()
    fast.step(1)
    first = time.perf_counter() - t
    times: dict[str, list[float]] = {"exact": [], "fast": []}
    for _ in range(rounds):
        for name, s in (("exact", exact), ("fast", fast)):
            t = time.perf_counter()
            s.step(1)
            times[name].append(time.perf_counter() - t)
    te, tf = statistics.median(times["exact"]), statistics.median(times["fast"])
    print(f"CaffeNet training exact vs fast, batch {batch}, {rounds} alternated rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"  fast mode: {fast.fast.summary()}")
    print(f"  fast first iteration (check{' + compile' if compile else ''}): {first:.1f} s")
    print(f"  exact: {1 / te:.3f} iter/s   fast: {1 / tf:.3f} iter/s   ratio fast / exact: {te / tf:.2f}")
    print(f"  loss after {rounds + 1} iterations: exact {exact.last_loss:.4f}, fast {fast.last_loss:.4f}")
    return te / tf


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4, help="exact/fast alternated rounds")
    ap.add_argument("--fast-only", action="store_true")
    ap.add_argument("--compile", action="store_true", help="compile the fast net (minutes on 2 cores)")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv or [])
    if not args.fast_only:
        vs_pytorch(args)
    exact_vs_fast(args.batch, args.rounds, args.compile and not args.no_compile)


def vs_pytorch(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, 3, 227, 227)).astype(np.float32)
    y = rng.integers(0, 1000, size=args.batch).astype(np.float32)

    param = caffe_pb2.SolverParameter(base_lr=0.01, momentum=0.9, weight_decay=5e-4, lr_policy="fixed",
                                      max_iter=10**6, display=0, snapshot=0, snapshot_after_train=False)
    text_format.Parse(caffenet_prototxt(args.batch), param.net_param)
    solver = get_solver(param)
    solver.net.blobs["data"].data[...] = x
    solver.net.blobs["label"].data[...] = y
    model = TorchCaffeNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()

    def torch_step() -> None:
        opt.zero_grad(set_to_none=False)
        loss = nn.functional.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()

    # Interleaved, one iteration at a time, so machine noise hits both sides alike.
    solver.step(1)
    torch_step()
    t_ours = t_ref = 0.0
    for _ in range(args.iterations):
        t = time.perf_counter()
        solver.step(1)
        t_ours += time.perf_counter() - t
        t = time.perf_counter()
        torch_step()
        t_ref += time.perf_counter() - t
    ours, ref = args.iterations / t_ours, args.iterations / t_ref
    print(f"CaffeNet training, batch {args.batch}, {args.iterations} iterations, {torch.get_num_threads()} threads")
    print(f"  caffeport Solver (SGD):        {ours:.3f} iter/s")
    print(f"  hand-written PyTorch + SGD:    {ref:.3f} iter/s")
    print(f"  ratio caffeport / PyTorch:     {ours / ref:.2f}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
