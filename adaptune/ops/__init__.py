"""The op functions adaptune's components call. One dispatch point per op.

| op         | math                                                          |
|------------|---------------------------------------------------------------|
| lora       | y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ                              |
| dora       | y = (m / n) ⊙ (x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ) + b, n = ‖W + s·B·A‖ rows |
| dora_norm  | n by the factored formula (no out×in temporary)               |
| bottleneck | y = residual + s·up(act(down(x)))                              |

Every op runs its pure-PyTorch reference (`adaptune.ops.reference`), which is also the oracle
that compiled kernels are tested against.
"""
from . import reference
from .reference import ACTIVATIONS

lora = reference.lora
dora = reference.dora
dora_norm = reference.dora_norm
bottleneck = reference.bottleneck

__all__ = ["ACTIVATIONS", "bottleneck", "dora", "dora_norm", "lora", "reference"]
