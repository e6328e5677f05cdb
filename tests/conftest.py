"""Session-wide test setup. Environment first: Triton reads TRITON_INTERPRET
when a kernel is defined, so it must be set before any kernel module loads."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RAY_TMPDIR", "/tmp/bdlora-ray-tests")
