"""Which modules are LoRA layers: ``LoRALinear`` and PEFT's LoRA layers, with their (B, A, s)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .._validate import positive_float, positive_int


class LoRALinear(nn.Module):
    """A linear layer with a LoRA adapter: y = x W0^T + b + s x A^T B^T (W0, b frozen).

    Parameters
    ----------
    in_features, out_features, rank : positive integers (n, m, r).
    alpha : the LoRA alpha; the scaling is s = alpha / rank (default alpha = rank: s = 1).
    bias : whether the frozen layer has a bias.
    weight : optional (m, n) tensor for W0 (copied); default Kaiming-uniform as nn.Linear.
    dtype, device : of the parameters.

    Attributes
    ----------
    weight, bias : frozen (requires_grad False).
    lora_A : (r, n) Parameter, Gaussian with standard deviation 1/sqrt(n) (as
        ``lorakern.init_adapters``); lora_B : (m, r) Parameter, zeros: BA = 0 at the start.
    scaling : s.

    Raises
    ------
    TypeError, ValueError : sizes that are not positive integers, a non-positive alpha, or
        a weight whose shape is not (out_features, in_features), named.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, alpha=None,
                 bias: bool = True, weight=None, dtype=None, device=None):
        in_features = positive_int("in_features", in_features)
        out_features = positive_int("out_features", out_features)
        rank = positive_int("rank", rank)
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
        if weight is not None:
            weight = torch.as_tensor(weight)
            if tuple(weight.shape) != (out_features, in_features):
                raise ValueError(f"weight must be (out_features, in_features) = "
                                 f"({out_features}, {in_features}), got shape "
                                 f"{tuple(weight.shape)}")
            with torch.no_grad():
                base.weight.copy_(weight)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = (nn.Parameter(base.bias.detach().clone(), requires_grad=False)
                     if bias else None)
        self.scaling = (1.0 if alpha is None else positive_float("alpha", alpha) / rank)
        kw = dict(dtype=self.weight.dtype, device=self.weight.device)
        self.lora_A = nn.Parameter(torch.randn(rank, in_features, **kw) / math.sqrt(in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **kw))

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, *, alpha=None) -> "LoRALinear":
        """A LoRALinear whose frozen weight and bias are copies of ``linear``'s."""
        layer = cls(linear.in_features, linear.out_features, rank, alpha=alpha,
                    bias=linear.bias is not None, weight=linear.weight.detach(),
                    dtype=linear.weight.dtype, device=linear.weight.device)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x):
        y = nn.functional.linear(x, self.weight, self.bias)
        return y + self.scaling * nn.functional.linear(nn.functional.linear(x, self.lora_A),
                                                       self.lora_B)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, scaling={self.scaling:g}")


def lora_layers(model: nn.Module, adapter: str | None = None) -> list[tuple[str, nn.Module, list]]:
    """The LoRA layers of ``model``: (name, module, [(B, A, scaling), ...]).

    Parameters
    ----------
    model : the module to search (``named_modules``).
    adapter : a PEFT adapter name, or None for each layer's active adapters.

    Returns
    -------
    One entry per adapted layer: lorakern's ``LoRALinear`` (its ``lora_B``, ``lora_A``,
    ``scaling``) and PEFT's LoRA layers (``lora_B[adapter].weight`` m x r,
    ``lora_A[adapter].weight`` r x n, ``scaling[adapter]``: alpha / r, or alpha / sqrt(r)
    with rsLoRA). Several adapters on one layer are several pairs of one entry.

    Raises
    ------
    ValueError : a layer the theory does not cover (module docstring).
    """
    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            found.append((name, module, [(module.lora_B, module.lora_A, float(module.scaling))]))
            continue
        if not (hasattr(module, "lora_A") and hasattr(module, "lora_B")
                and hasattr(module, "scaling")):
            continue
        if isinstance(module.lora_A, nn.Parameter):
            continue  # a LoRALinear-like module of someone else's: not a PEFT layer
        pairs = _peft_pairs(name, module, adapter)
        if pairs:
            found.append((name, module, pairs))
    return found


def _peft_pairs(name, module, adapter):
    what = f"layer {name!r} ({type(module).__name__})"
    if len(getattr(module, "lora_embedding_A", {}) or {}):
        raise ValueError(f"{what} adapts an embedding (lora_embedding_A): lorakern's step "
                         f"covers LoRA of linear layers only (G = Delta^T X)")
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or "Conv" in type(module).__name__ \
            and type(base).__name__ != "Conv1D":
        raise ValueError(f"{what} adapts a convolution: lorakern's step covers LoRA of linear "
                         f"layers only (G = Delta^T X)")
    if isinstance(base, nn.Embedding):
        raise ValueError(f"{what} adapts an embedding: lorakern's step covers LoRA of linear "
                         f"layers only")
    if getattr(module, "merged", False) or getattr(module, "merged_adapters", None):
        raise ValueError(f"{what} has merged adapters: unmerge them (model.unmerge_adapter()) "
                         f"before training")
    active = getattr(module, "active_adapters", None) or list(module.lora_A.keys())
    if isinstance(active, str):
        active = [active]
    names = [a for a in active if a in module.lora_A and (adapter is None or a == adapter)]
    pairs = []
    for a in names:
        if getattr(module, "use_dora", {}).get(a, False):
            raise ValueError(f"{what}, adapter {a!r}: DoRA (use_dora) normalises the weight, "
                             f"so the layer is not W0 + s BA and the paper's step does not apply")
        lin_A, lin_B = module.lora_A[a], module.lora_B[a]
        if getattr(lin_A, "bias", None) is not None or getattr(lin_B, "bias", None) is not None:
            raise ValueError(f"{what}, adapter {a!r}: a LoRA bias (lora_bias) is not covered "
                             f"by the theory; use lora_bias=False")
        if not isinstance(lin_A, nn.Linear) or not isinstance(lin_B, nn.Linear):
            raise ValueError(f"{what}, adapter {a!r}: lora_A/lora_B are "
                             f"{type(lin_A).__name__}/{type(lin_B).__name__}, not linear "
                             f"(a convolution?); only LoRA of linear layers is covered")
        pairs.append((lin_B.weight, lin_A.weight, float(module.scaling[a])))
    return pairs


def tap_groups(model: nn.Module, adapter: str | None = None) -> list[tuple]:
    """The LoRA layers of ``model`` as tap groups: (name, module, pairs, x_module, tap_module,
    scale), one per set of pairs that read one input X (capture.py's docstring).

    ``LoRALinear``: X is the layer's input and the tap its output (x_module = tap_module = the
    layer, scale 1). PEFT: the active adapters without dropout form one group (X = the first
    one's ``lora_A`` input, the tap on its ``lora_B``, scale 1 / its s); each adapter with
    dropout p > 0 is a group of its own (X~ = its ``lora_A``'s input, the dropped-out x).
    """
    groups = []
    for name, module, pairs in lora_layers(model, adapter):
        if isinstance(module, LoRALinear):
            groups.append((name, module, pairs, module, module, 1.0))
            continue
        shared, own = [], []
        for B, A, s in pairs:
            a = next(k for k in module.lora_A if module.lora_A[k].weight is A)
            dropout = module.lora_dropout[a] if a in getattr(module, "lora_dropout", {}) else None
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            (own if p > 0 else shared).append((a, (B, A, s)))
        if shared:
            a0, (_, _, s0) = shared[0]
            groups.append((name, module, [pair for _, pair in shared], module.lora_A[a0],
                           module.lora_B[a0], 1.0 / s0))
        for a, pair in own:
            groups.append((f"{name}[{a}]", module, [pair], module.lora_A[a], module.lora_B[a],
                           1.0 / pair[2]))
    return groups
