"""Helpers of the serve tests (fixtures are in conftest.py): real PEFT adapters on a tiny-llama core,
published through the registry, and PEFT's greedy output as the reference."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from cogcore.lora.registry import AdapterRegistry
from cogcore.train.model import ModelSpec, load_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (user, rank, alpha, targets, use_rslora, layers): ranks differ (zero padding), targets differ (untargeted
# layers stay zero), one uses rsLoRA scaling and adapts only the last decoder layer (layers_to_transform)
ADAPTERS = [("alice", 4, 8.0, ["q_proj", "v_proj"], False, None),
            ("bob", 8, 16.0, ALL, False, None),
            ("carol", 2, 4.0, ["q_proj", "k_proj", "o_proj", "down_proj"], True, [1])]
PROMPTS = ["Hello there, how are", "The capital of France is", "abc", "once upon a time, in a land far away,"]



def make_adapter(base_model, out: Path, seed: int, r: int = 4, alpha: float = 8.0, targets=("q_proj", "v_proj"),
                 rslora: bool = False, std: float = 0.5, layers: list[int] | None = None) -> Path:
    """A real PEFT adapter with random non-zero B (so it changes the output), saved the PEFT way."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    cfg = PeftLoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                         layers_to_transform=layers, task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base_model), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(out)
    return out


def publish_all(registry: AdapterRegistry, base_model, tmp: Path, seed0: int = 1) -> None:
    for i, (user, r, alpha, targets, rslora, layers) in enumerate(ADAPTERS):
        registry.publish(user, make_adapter(base_model, tmp / f"{user}-{i}", seed0 + i, r, alpha, targets, rslora,
                                            layers=layers), base_hash=base_model.base_hash)



def fresh_model():
    m = load_model("tiny-llama")
    return m


SPEC = ModelSpec(source="tiny-llama")


def peft_greedy(base_model, adapter_dir, prompt_ids: list[int], max_new: int, stop_ids, pad_id) -> list[int]:
    """The reference: PEFT's model (or the plain base) through transformers' generate, greedy."""
    from peft import PeftModel

    model = copy.deepcopy(base_model)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, eos_token_id=sorted(stop_ids), pad_token_id=pad_id)
    new = out[0, ids.shape[1]:].tolist()
    while new and new[-1] in stop_ids:  # generate keeps the EOS token; the server does not return it
        new.pop()
    return new
