"""One autograd node per LoRA linear layer for CPU training.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as five autograd nodes. On a CPU each full-size
intermediate is a separate pass over memory: the rank-r product lora_B(...) is written out, scaled in a second
pass and added to the base output in a third; backward scales the incoming gradient, multiplies by the dropout
mask and adds the two input gradients, each a pass of its own. With LoRA on every linear layer that is ~210
layers per step on the bundled model.

`LoraLinearFunction` does the same arithmetic with the rank-r update folded into GEMM epilogues:

    forward:  y = x W^T (+ b);  xd = x * mask;  a = xd A^T;  y += scaling * a B^T        (addmm_, in place)
    backward: dx = g W + scaling * ((g B) A) * mask                                        (addmm_/addcmul_)
              dA = scaling * (g B)^T xd;  dB = scaling * g^T a

Everything runs in the autocast dtype (as peft under autocast: the frozen weight and the adapters are cast to
it) and the adapter gradients come back in the adapters' dtype. The dropout mask is `fast_dropout`'s
(same law as nn.Dropout). Only the plain case is fused: one active vanilla LoRA adapter, unmerged, on an
`nn.Linear` base, in training mode, on a CPU, with no extra forward arguments; every other call (DoRA and other
variants, several adapters, eval, GPU) goes to peft's own forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from domaintune.train.speed.fast_dropout import CheapMaskDropout, cheap_keep_mask


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, drop_p: float, dtype):
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            w = weight.to(dtype)
            a_w, b_w = lora_a.to(dtype), lora_b.to(dtype)
            y = nn.functional.linear(xc, w, None if bias is None else bias.to(dtype))
            mask = cheap_keep_mask(xc, drop_p) if drop_p > 0.0 else None
            xd = xc * mask if mask is not None else xc
            xd2 = xd.reshape(-1, xd.shape[-1])
            a = xd2 @ a_w.t()  # [tokens, r]
            y.view(-1, y.shape[-1]).addmm_(a, b_w.t(), alpha=scaling)
        ctx.save_for_backward(w, a_w, b_w, xd2, a, mask)
        ctx.scaling = scaling
        ctx.x_meta = (x.shape, x.dtype)
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        w, a_w, b_w, xd2, a, mask = ctx.saved_tensors
        s = ctx.scaling
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(w.dtype)
        gb = g @ b_w  # [tokens, r]: gradient of a, before scaling
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[4]:
            grad_b = torch.mm(g.t(), a).mul_(s).to(ctx.param_dtypes[1])
        if ctx.needs_input_grad[3]:
            grad_a = torch.mm(gb.t(), xd2).mul_(s).to(ctx.param_dtypes[0])
        if ctx.needs_input_grad[0]:
            grad_x = g @ w
            if mask is None:
                grad_x.addmm_(gb, a_w, alpha=s)
            else:
                grad_x.addcmul_(torch.mm(gb, a_w), mask.reshape(-1, mask.shape[-1]), value=s)
            shape, dtype = ctx.x_meta
            grad_x = grad_x.view(shape).to(dtype)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def _fused_forward(self, x, *args, **kwargs):
    adapter = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    dropout = self.lora_dropout[adapter] if adapter in self.lora_dropout else None  # noqa: SIM401 (ModuleDict has no get)
    plain = (
        not args
        and not kwargs
        and self.training
        and x.device.type == "cpu"
        and not self.disable_adapters
        and not self.merged
        and adapter in self.lora_A
        and adapter not in getattr(self, "lora_variant", {})
        and not getattr(self, "lora_bias", {}).get(adapter, False)
        and not getattr(self, "fan_in_fan_out", False)
        and type(self.base_layer) is nn.Linear
        and not self.base_layer.weight.requires_grad
        and (self.base_layer.bias is None or not self.base_layer.bias.requires_grad)
        and (isinstance(dropout, nn.Identity) or type(dropout) is CheapMaskDropout)
    )
    if not plain:
        return type(self).forward(self, x, *args, **kwargs)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    drop_p = dropout.p if isinstance(dropout, CheapMaskDropout) else 0.0
    base = self.base_layer
    return LoraLinearFunction.apply(
        x,
        base.weight,
        base.bias,
        self.lora_A[adapter].weight,
        self.lora_B[adapter].weight,
        float(self.scaling[adapter]),
        drop_p,
        dtype,
    )


def use_fused_lora_linear(model) -> int:
    """Route every peft `lora.Linear` of `model` through `LoraLinearFunction` when its call is the plain case."""
    from peft.tuners.lora import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and type(module) is LoraLinear:
            # An instance attribute shadows the class's forward for this layer only (nn.Module keeps plain
            # attributes in the instance dict), so peft's own forward stays reachable as type(self).forward.
            object.__setattr__(module, "forward", types.MethodType(_fused_forward, module))
            n += 1
    return n
