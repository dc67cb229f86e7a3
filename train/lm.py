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
        from ..kernels import linear_cross_entropy
        hidden = decoder_hidden(self.model, batch)
        H = hidden.shape[-1]
        weights = batch["target_weights"].reshape(-1)
        keep = weights > 0  # only positions that carry loss go through the lm_head
        loss_sum = linear_cross_entropy(hidden.reshape(-1, H)[keep], output_weight(self.model),
                                        batch["target_ids"].reshape(-1)[keep], weights[keep],
                                        chunk_size=self.chunk_size)
        return {"loss_sum": loss_sum, "weight": weights.sum()}
