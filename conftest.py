"""Test set-up shared by every test module.

Without a GPU the Triton kernels run in the Triton interpreter, which must be
switched on before any kernel is defined, so before refinestyle_kernels is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
