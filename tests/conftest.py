import os

# On a machine shared with other work, OpenMP threads that spin while they wait for each other take
# the cores the other thread needs; sleeping waiters halve the suite's time there (and cost a little
# on an idle machine). Read when torch loads OpenMP, so before the import; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
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
