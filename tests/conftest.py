import os

import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU; the variable
# must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
