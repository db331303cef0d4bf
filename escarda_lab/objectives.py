"""Total loss = Σ_objectives weight × term + Σ_plugin aux weight × term; every term by name."""

from __future__ import annotations

from torch import Tensor

from escarda_lab.model import EscardaLM, ModelOutput


def total_loss(model: EscardaLM, batch: dict, out: ModelOutput) -> tuple[Tensor, dict[str, Tensor]]:
    """Returns (total, {term name: unweighted term}). The `cross_entropy` term is the LM loss."""
    terms: dict[str, Tensor] = {}
    total = 0.0
    for name, objective in model.objectives.items():
        terms[name] = objective(batch, out)
        total = total + objective.weight * terms[name]
    for name, (term, weight) in out.aux_losses.items():
        terms[name] = term
        total = total + weight * term
    return total, terms
