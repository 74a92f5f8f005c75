import os

import torch
from hypothesis import settings


# Triton kernels run on the CPU through the interpreter when there is no GPU; the variable
# must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI runs the property tests on a fixed sequence of examples (a submission's CI must be repeatable);
# local runs draw fresh examples each time and keep searching.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
