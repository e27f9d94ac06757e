"""GPTQ (Frantar et al. 2022): round Linear weights to the int8 grid PT2E chose so the layer's
output, not each weight, stays close to float.

Nearest rounding treats every weight alone. GPTQ rounds the input columns one at a time and
spreads each column's rounding error over the columns not yet rounded, weighted by the inverse of
the inputs' second moments H = 2/n Σ xᵀx: correlated inputs let later columns cancel earlier
errors. The scales (and so the graph) stay PT2E's; only which code each weight gets changes.
"""
from __future__ import annotations

import torch
import torch.fx

from ..graph_utils import LINEAR_OPS
from .bias_correction import observe_layer_inputs, quantized_layers
from .patterns import WeightQDQ


def _round(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Nearest codes, as `quantize_per_channel` computes them (multiplying by the inverse scale)."""
    return torch.clamp(torch.round(w * (1.0 / scale)), -qmax, qmax)


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of H⁻¹ (damped by `damp` x mean diagonal): its row i holds the
    weights with which column i's error moves the columns after it. In float64: H of many correlated
    inputs is ill-conditioned, and the factorisation runs once per layer."""
    h = hessian.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, qmax: int, *,
               block_size: int = 128, damp: float = 0.01) -> torch.Tensor:
    """Integer codes (a float tensor of integers in [-qmax, qmax]) for `weight` [out, in] on the
    symmetric grid `codes * scale[:, None]`, rounded by GPTQ against the input Hessian [in, in].

    Columns go in their natural order: no act_order (rounding columns by decreasing H_ii, then undoing
    the permutation), kept out for simplicity; it matters most with grouped scales, and PT2E's are one
    per output channel. Columns of inputs that were always 0
    (H_ii = 0) get code 0. Updates to the columns after a block are applied once per block (GPTQ's
    lazy batch updates). With H = I this is nearest rounding.
    """
    scale = scale.reshape(-1, 1).to(torch.float32)
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h_inv = _inverse_hessian_factor(h, damp).to(w.dtype)
    codes = torch.zeros_like(w)
    columns = w.shape[1]
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block, block_inv = w[:, start:end].clone(), h_inv[start:end, start:end]
        errors = torch.zeros_like(block)
        for i in range(end - start):
            q = _round(block[:, i:i + 1], scale, qmax)
            codes[:, start + i:start + i + 1] = q
            error = (block[:, i:i + 1] - q * scale) / block_inv[i, i]
            block[:, i:] -= error @ block_inv[i:i + 1, i:]
            errors[:, i:i + 1] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return codes


def _is_gptq_layer(layer: WeightQDQ) -> bool:
    return layer.layer.target in LINEAR_OPS and layer.per_channel_symmetric


def apply_gptq(gm: torch.fx.GraphModule, batches: list[tuple], *, block_size: int = 128,
               damp: float = 0.01) -> int:
    """Re-round the weight of every aten.linear whose weight passes through a per-channel symmetric
    quantize-dequantize pair (`weight_qdq`, axis 0, zero point 0, range [-qmax, qmax]) with GPTQ, on
    the scale and range of that pair. In place; returns how many Linears were re-rounded.

    The Hessians come from the layers' actual inputs in the quantized graph, all layers in ONE run
    over `batches` (GPTQ's paper quantizes layer by layer, each on the outputs of the ones already
    re-rounded: one run per layer, layers x batches forward passes). Linears reading one input share
    its Hessian. Memory: one [in, in] float32 matrix per distinct input, all at once.

    The float weight is replaced by `codes * scale`, exactly on the grid, so the graph's own quantize
    reproduces the codes; the new weight is a new attribute (the old one may be the caller's
    parameter and stays until `remove_unused_attributes`). Convolutions are left as they are (their
    Hessian is over unfolded patches: not done here); so are per-tensor or asymmetric weights.
    """
    layers = quantized_layers(gm, _is_gptq_layer)
    readers = {}  # one Hessian per input node, measured at the first Linear reading it
    for layer in layers:
        readers.setdefault(layer.layer.args[0], layer)
    gram: dict[torch.fx.Node, torch.Tensor] = {}
    rows: dict[torch.fx.Node, int] = {}

    def accumulate(layer: WeightQDQ, x: torch.Tensor) -> None:
        source, x = layer.layer.args[0], x.reshape(-1, x.shape[-1]).to(torch.float32)
        gram[source] = gram.get(source, 0) + x.T @ x
        rows[source] = rows.get(source, 0) + x.shape[0]

    observe_layer_inputs(gm, list(readers.values()), batches, accumulate, needed_by="gptq")
    for layer in layers:
        source = layer.layer.args[0]
        hessian = 2.0 / rows[source] * gram[source]
        scale = layer.scale.to(torch.float32)
        weight = layer.float_weight(gm)
        codes = gptq_round(weight, hessian, scale, layer.qmax, block_size=block_size, damp=damp)
        layer.replace_weight(gm, (codes * scale[:, None]).to(weight.dtype), f"{layer.weight.name}_gptq")
    if layers:
        gm.recompile()
    return len(layers)
