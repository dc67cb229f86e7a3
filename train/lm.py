"""Forward passes shared by recipes: final hidden states of a causal LM, and its weighted CE."""

from __future__ import annotations

import torch
from torch import nn


def decoder_hidden(lm: nn.Module, batch: dict) -> torch.Tensor:
    """(B, T, H) final hidden states (after the last norm), without computing the logits.

    Recipes compute the loss from these and the lm_head weight in chunks, so the
    (B·T × vocab) logits never exist in memory at once.
    """
    # No mask for packed rows: transformers finds the documents from the restarting position ids.
    out = lm.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           attention_mask=batch.get("attention_mask"), use_cache=False)
    return out.last_hidden_state


def output_weight(lm: nn.Module) -> torch.Tensor:
    return lm.get_output_embeddings().weight


class CausalLMLoss(nn.Module):
    """Next-token cross-entropy weighted per token: the SFT / pretraining objective."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: dict) -> dict:
        hidden = decoder_hidden(self.model, batch)
        loss_sum = causal_ce_sum(hidden, output_weight(self.model), batch["target_ids"], batch["target_weights"],
                                 self.chunk_size)
        return {"loss_sum": loss_sum, "weight": batch["target_weights"].reshape(-1).sum()}


def causal_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, target_ids: torch.Tensor,
                  target_weights: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """sum_i w_i * CE_i over the tokens with w_i > 0, from final hidden states and the lm_head
    weight; only positions that carry loss go through the lm_head (zero, with a graph, if none)."""
    from ..kernels import linear_cross_entropy
    w = target_weights.reshape(-1)
    keep = w > 0
    if not bool(keep.any()):
        return hidden.new_zeros((), dtype=torch.float32) + 0 * hidden.sum()
    H = hidden.shape[-1]
    return linear_cross_entropy(hidden.reshape(-1, H)[keep], weight, target_ids.reshape(-1)[keep], w[keep],
                                chunk_size=chunk_size)
