"""Runtime overhead of caffeport's ``Net`` vs a hand-written PyTorch CaffeNet.

caffeport builds ``models/bvlc_reference_caffenet/deploy.prototxt`` from the corpus (batch 32,
3x227x227); the hand-written module uses ``nn.Conv2d(groups=2)``, ``nn.LocalResponseNorm``,
``nn.MaxPool2d(ceil_mode=True)``, ``nn.Linear``, in-place ``nn.ReLU`` and ``nn.Dropout``. Both get the
same (random, fan-in scaled) weights, and the eval outputs are checked to agree (max abs diff).

Measured in one process, interleaved (A, B, A, B...) so that machine noise hits both alike:
- forward: ``torch.no_grad()``, eval / TEST-phase net, through ``net.module(data=x)``;
- forward+backward: train mode / TRAIN-phase net (dropout on), ``sum(outputs).backward()``.
Prints ms per iteration (median) and the ratio caffeport / hand-written (1.00 = no overhead). No asserts.
``--profile`` adds a torch.profiler table of both forwards (where the time goes, per op).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from caffeport.io import read_net
from caffeport.net import TEST, TRAIN, Net

DEPLOY = (Path(__file__).resolve().parents[1] / ".." / "shared" / "corpus" / "2_bvlc_caffe" / "head" / "models"
          / "bvlc_reference_caffenet" / "deploy.prototxt").resolve()


class HandCaffeNet(nn.Module):
    """CaffeNet as one would write it in PyTorch."""

    def __init__(self) -> None:
        super().__init__()
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
        lrn = lambda: nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, 11, stride=4), relu(), pool(), lrn(),
            nn.Conv2d(96, 256, 5, padding=2, groups=2), relu(), pool(), lrn(),
            nn.Conv2d(256, 384, 3, padding=1), relu(),
            nn.Conv2d(384, 384, 3, padding=1, groups=2), relu(),
            nn.Conv2d(384, 256, 3, padding=1, groups=2), relu(), pool(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(9216, 4096), relu(), nn.Dropout(0.5),
            nn.Linear(4096, 4096), relu(), nn.Dropout(0.5),
            nn.Linear(4096, 1000),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(torch.flatten(self.features(x), 1)), dim=1)


WEIGHTED = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]


def build_net(batch: int, phase: int) -> Net:
    msg = read_net(DEPLOY)
    for lp in msg.layer:
        if lp.type == "Input":
            lp.input_param.shape[0].dim[0] = batch
    return Net(msg, phase=phase)


def randomize(net: Net, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in WEIGHTED:
            w, b = net.layer_dict[name].blobs[:2]
            w.copy_(torch.randn(w.shape, generator=g) * (2.0 / np.prod(w.shape[1:])) ** 0.5)
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def copy_into(net: Net, hand: HandCaffeNet) -> None:
    mods = [m for m in hand.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for name, m in zip(WEIGHTED, mods):
            w, b = net.layer_dict[name].blobs[:2]
            m.weight.copy_(w.reshape(m.weight.shape))
            m.bias.copy_(b.reshape(m.bias.shape))


def share_weights(src: Net, dst: Net) -> None:
    with torch.no_grad():
        for name in WEIGHTED:
            for a, b in zip(src.layer_dict[name].blobs, dst.layer_dict[name].blobs):
                b.copy_(a)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fns: dict[str, callable], warmup: int, iters: int, device: torch.device) -> dict[str, float]:
    """Median ms per call of each fn, calls interleaved."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    test_net = build_net(args.batch, TEST)
    randomize(test_net)
    train_net = build_net(args.batch, TRAIN)
    share_weights(test_net, train_net)
    hand = HandCaffeNet()
    copy_into(test_net, hand)
    test_net.to(device)
    train_net.to(device)
    hand.to(device)
    x = torch.randn(args.batch, 3, 227, 227, device=device)

    # same numbers (eval: no dropout)
    hand.eval()
    test_net.module.eval()
    with torch.no_grad():
        ours = test_net.module(data=x)["prob"]
        theirs = hand(x)
    diff = float((ours - theirs).abs().max())
    print(f"CaffeNet batch {args.batch} on {device} ({torch.get_num_threads()} threads): "
          f"outputs agree, max abs diff {diff:.2e} (prob max {float(theirs.max()):.3f})")

    def fwd_caffeport() -> None:
        with torch.no_grad():
            test_net.module(data=x)

    def fwd_hand() -> None:
        with torch.no_grad():
            hand(x)

    def train_caffeport() -> None:
        out = train_net.module(data=x)
        sum(v.sum() for v in out.values()).backward()

    def train_hand() -> None:
        hand(x).sum().backward()

    fwd = timed({"caffeport": fwd_caffeport, "hand": fwd_hand}, args.warmup, args.iterations, device)
    hand.train()
    train_net.module.train()
    fb = timed({"caffeport": train_caffeport, "hand": train_hand}, args.warmup, args.iterations, device)
    for label, t in (("forward (no_grad)", fwd), ("forward+backward", fb)):
        print(f"{label:18s}: caffeport {t['caffeport']:9.1f} ms  hand-written {t['hand']:9.1f} ms  "
              f"ratio {t['caffeport'] / t['hand']:.3f}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        hand.eval()
        for name, fn in (("caffeport forward", fwd_caffeport), ("hand-written forward", fwd_hand),
                         ("caffeport forward+backward", train_caffeport), ("hand-written forward+backward",
                                                                          train_hand)):
            if "backward" in name:
                hand.train()
            with profile(activities=acts) as prof:
                fn()
                _sync(device)
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"--- {name}")
            print(prof.key_averages().table(sort_by=key, row_limit=14))


if __name__ == "__main__":
    main()
