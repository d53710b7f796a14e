"""Test-session settings shared by every test file."""

from __future__ import annotations

import os

import torch

# Under pytest-xdist (`pytest -n N`), each worker gets its share of the CPU cores, so that N workers do not run
# N x (all cores) torch threads on the same cores. Tests that want one thread still set it themselves.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
