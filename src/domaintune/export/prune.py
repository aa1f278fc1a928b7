"""Magnitude pruning: zero the smallest-magnitude weights of every decoder Linear layer."""

from __future__ import annotations


def magnitude_prune(model, sparsity: float) -> dict[str, float]:
    """Prune each decoder nn.Linear (not the embeddings / lm_head) to `sparsity` zeros, in place.

    Uses torch.nn.utils.prune's L1 (magnitude) criterion per layer and makes the mask permanent,
    so the saved weights are ordinary dense tensors with zeros. Returns the measured sparsity.
    """
    import torch
    from torch.nn.utils import prune

    output = model.get_output_embeddings()
    pruned, zeros, total = 0, 0, 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not output:
            prune.l1_unstructured(module, name="weight", amount=sparsity)
            prune.remove(module, "weight")
            pruned += 1
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return {"target": sparsity, "achieved": zeros / total if total else 0.0, "layers": pruned, "weights": total}
