import os
import sys

import matplotlib
import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter, which is chosen when
# normfree.agc.gpu_kernel is first imported: set it before any test imports normfree.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
matplotlib.use("Agg")
sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
