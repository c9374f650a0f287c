"""Bottom layer of C-GSPN: the GSPN operator and its benchmark. Imports only torch, triton, numpy, matplotlib.

Without a GPU, Triton kernels run only in Triton's interpreter, which must be chosen (TRITON_INTERPRET=1)
before triton is first imported; this package does that on CPU-only machines unless the variable is set.
"""
import os
import sys

import torch

TRITON_IMPORTED_EARLY = "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
