"""Every test starts from the same global random state (torch, numpy, random), whatever ran before
it on the same xdist worker: layers that draw from the global generators (data shuffles, window
sampling, fillers) then give each test one fixed draw instead of a new one per run."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _fixed_global_rng() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
