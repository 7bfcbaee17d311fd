"""The small PyTorch models the lorakern.torch tests share (one factory, as lorakern.testing is
for arrays): a 2-layer tanh MLP, and the same MLP with lorakern's LoRALinear adapters; and the
devices their tests run on (DEVICES: the CPU, and CUDA where a GPU is lent, else skipped)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakern
from lorakern.torch import LoRALinear


def cuda_ready() -> bool:
    """A CUDA GPU that PyTorch and lorakern (CuPy) both see."""
    return torch.cuda.is_available() and "cuda" in lorakern.devices()


#: parametrize a torch test over these; ``-k cuda`` selects the GPU cases (ci/gpu.sh's torch step)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not cuda_ready(), reason="needs a CUDA GPU visible to both PyTorch and CuPy"))]


class MLP(nn.Module):
    def __init__(self, n=7, hidden=11, m=4, dtype=torch.float64):
        super().__init__()
        self.fc1 = nn.Linear(n, hidden, dtype=dtype)
        self.fc2 = nn.Linear(hidden, m, dtype=dtype)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def lora_mlp(seed=0, dtype=torch.float64):
    """MLP with LoRALinear adapters (ranks 2 and 3, scalings 3 and 0.5) whose B are not zero,
    so that both ∇_B and ∇_A are non-zero at the first step."""
    torch.manual_seed(seed)
    model = MLP(dtype=dtype)
    model.fc1 = LoRALinear.from_linear(model.fc1, 2, alpha=6)
    model.fc2 = LoRALinear.from_linear(model.fc2, 3, alpha=1.5)
    with torch.no_grad():
        model.fc1.lora_B.normal_(0.0, 0.5)
        model.fc2.lora_B.normal_(0.0, 0.5)
    return model
