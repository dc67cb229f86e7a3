"""A small junk classifier over the core's own hidden states: the model score of the junk gate.

The named rules (memory/junk.py) catch the junk they were written for and about half of a junk set
written after them. Perplexity and relevance under the core help a little: fluent ads, scam lines
and channel intros are neither unlikely nor irrelevant enough. What does generalise is the core's
own reading of a text: the hidden state at the text's last token (which has seen the whole text) in
a middle and in the last layer, fed to a logistic regression trained on the labelled sets of
memory/junk_examples.py (plus the user's own labels, if given). The core stays frozen; only
2 x hidden + 1 numbers are fitted.

An action is read as the reply to its request (the chat template, as the core sees it when it
serves), a request on its own: "49" after "What's 7 squared?" is a good answer, "mood" after a
refund request is not, and only the request can tell them apart.

How it got here (bench/bench_memory.py, every step measured on sets written before it): mean-pooled
states kept 0.70 of good exchanges from unseen domains; last-token states and more everyday good
examples 0.89 (junk of unseen kinds: 0.98 removed); terse code / formula / foreign-language answers
were still taken for chatter until the action was read after its request.

    clf = JunkClassifier.train(model, tok)                  # ~2,500 texts; a few min on 2 CPU cores (135M)
    clf.save(path)                                          # safetensors + the base_hash it belongs to
    clf = JunkClassifier.load(path, model)                  # refuses a file made for another base
    clf.probabilities(model, tok, ["49", "mood"], requests=["What's 7 squared?"] * 2)   # P(junk) per text

Consolidation (``junk_classifier=true``) trains one on first use, keeps it in the workspace next to
the experience log, named by the base hash, and drops an episode whose request or action scores
above ``junk_threshold``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..train.config import CogcoreError

FORMAT_VERSION = 3   # 3: actions read after their request (2: texts alone, 1: mean-pooled)
MAX_TOKENS = 64      # junk is short; a long good text is judged by its first 64 tokens
PROMPT_TOKENS = 96   # the end of the rendered request an action is read after


def _layers(model) -> tuple[int, int]:
    """Which hidden states are read: the middle layer's and the last layer's."""
    n = model.config.num_hidden_layers
    return n // 2, n


def embed(model, tok, texts: list[str], requests: list[str | None] | None = None, batch_size: int = 32,
          progress: str = "") -> torch.Tensor:
    """(len(texts), 2 * hidden) float64: two hidden states at each text's last token.

    ``requests[i]``: the request text ``i`` answers; it is then read as the assistant's reply to it
    (the chat template); None (or no ``requests``): the text is read on its own."""
    from tqdm import tqdm

    from .formats import policy_messages, render_prompt
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    middle, last = _layers(model)
    device = next(model.parameters()).device
    encode = lambda t: tok(t, add_special_tokens=False).input_ids   # noqa: E731
    prompts: dict[str, list[int]] = {}
    ids = []
    for i, text in enumerate(texts):
        request = requests[i] if requests else None
        prefix = []
        if request is not None:
            if request not in prompts:
                prompts[request] = encode(render_prompt(tok, policy_messages(request)))[-PROMPT_TOKENS:]
            prefix = prompts[request]
        ids.append(prefix + (encode(text)[:MAX_TOKENS] or [pad]))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))     # similar lengths share a batch: less padding
    out = torch.zeros(len(ids), 2 * model.config.hidden_size, dtype=torch.float64)
    bar = tqdm(total=len(ids), desc=progress, unit="text", leave=False, disable=not progress)
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b: b + batch_size]
            T = max(len(ids[i]) for i in idx)
            x = torch.full((len(idx), T), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for r, i in enumerate(idx):
                x[r, : len(ids[i])] = torch.tensor(ids[i])
                mask[r, : len(ids[i])] = 1
            hs = model(input_ids=x.to(device), attention_mask=mask.to(device), output_hidden_states=True).hidden_states
            rows, ends = torch.arange(len(idx), device=device), mask.sum(1).to(device) - 1
            out[idx] = torch.cat([hs[k][rows, ends].float() for k in (middle, last)], -1).double().cpu()
            bar.update(len(idx))
    bar.close()
    return out


class JunkClassifier:
    """Logistic regression on standardised last-token hidden states of one base model."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 threshold: float, info: dict):
        self.mean, self.std, self.weight, self.bias = mean, std, weight, bias
        self.threshold, self.info = threshold, info

    # ------------------------------------------------------------------ training

    @classmethod
    def train(cls, model, tok, texts: list[str] | None = None, labels: list[int] | None = None,
              requests: list[str | None] | None = None, l2: float = 1e-3, threshold: float = 0.5, seed: int = 0,
              progress: bool = False) -> JunkClassifier:
        """Fit on ``texts``/``labels`` (1 = junk), each read after ``requests[i]`` when given (None: on
        its own); by default on memory/junk_examples.training_examples.

        Deterministic: full-batch L-BFGS in float64 from zeros, no sampling. Junk and good carry equal
        total weight whatever their counts, so the default threshold 0.5 means "more junk than good"."""
        if texts is None:
            from .junk_examples import training_examples
            requests, texts, labels = map(list, zip(*training_examples(seed)))
        if labels is None or len(labels) != len(texts) or (requests is not None and len(requests) != len(texts)):
            raise CogcoreError("junk classifier: give one label (1 = junk, 0 = good), and one request or None if "
                               "requests are given, per text")
        n_junk = sum(1 for y in labels if y)
        if n_junk == 0 or n_junk == len(labels):
            raise CogcoreError(f"junk classifier: the training texts need both junk and good examples "
                               f"(got {n_junk} junk of {len(labels)})")
        X = embed(model, tok, texts, requests, progress="junk classifier: embedding" if progress else "")
        y = torch.tensor([float(bool(v)) for v in labels], dtype=torch.float64)
        mean, std = X.mean(0), X.std(0).clamp(min=1e-6)
        Z = (X - mean) / std
        per_example = torch.where(y > 0, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
        w = torch.zeros(Z.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

        def loss_fn():
            opt.zero_grad()
            bce = torch.nn.functional.binary_cross_entropy_with_logits(Z @ w + b, y, reduction="none")
            loss = (per_example * bce).mean() + l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(loss_fn)
        with torch.no_grad():
            p = torch.sigmoid(Z @ w + b)
            loss = float((per_example * torch.nn.functional.binary_cross_entropy(p, y, reduction="none")).mean()
                         + l2 * (w * w).sum())
            train_acc = float(((p > threshold).double() == y).double().mean())
        info = {"base_hash": getattr(model, "base_hash", ""), "hidden_layers": list(_layers(model)),
                "n_junk": n_junk, "n_good": len(labels) - n_junk, "l2": l2, "seed": seed,
                "train_loss": round(loss, 5), "train_accuracy": round(train_acc, 4)}
        return cls(mean, std, w.detach(), b.detach(), threshold, info)

    # ------------------------------------------------------------------ use

    def probabilities(self, model, tok, texts: list[str], requests: list[str | None] | None = None,
                      progress: str = "") -> list[float]:
        """P(junk) per text under ``model`` (the base this classifier was trained on); ``requests[i]``:
        the request text ``i`` answers (None: a request, or a text read on its own)."""
        self._check_model(model)
        if not texts:
            return []
        Z = (embed(model, tok, texts, requests, progress=progress) - self.mean) / self.std
        return torch.sigmoid(Z @ self.weight + self.bias).tolist()

    def _check_model(self, model) -> None:
        want, have = self.info.get("base_hash", ""), getattr(model, "base_hash", "")
        if want and have and want != have:
            raise CogcoreError(f"this junk classifier was trained on base {want[:12]}, not on {have[:12]}: its "
                               "features are that model's hidden states; train one for this model "
                               "(cogcore memory junk-classifier --model ...)")
        if self.mean.numel() != 2 * model.config.hidden_size:
            raise CogcoreError(f"this junk classifier expects hidden size {self.mean.numel() // 2}, the model has "
                               f"{model.config.hidden_size}; train one for this model")

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> Path:
        """Atomically: a reader sees the old file or the new one, never half of one."""
        from safetensors.torch import save_file
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        meta = {"format_version": str(FORMAT_VERSION), "threshold": repr(self.threshold), "info": json.dumps(self.info)}
        save_file({"mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias}, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, model=None) -> JunkClassifier:
        """Read a saved classifier; with ``model``, also check that it was trained on that base."""
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise CogcoreError(f"no junk classifier at {path}; train one with cogcore memory junk-classifier")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in ("mean", "std", "weight", "bias")}
            version = int(meta.get("format_version", "0"))
            threshold, info = float(meta["threshold"]), json.loads(meta["info"])
        except Exception as e:  # truncated file, not safetensors, missing tensors or keys
            raise CogcoreError(f"junk classifier {path} is unreadable ({type(e).__name__}: {str(e)[:120]}); delete it "
                               "and train it again (cogcore memory junk-classifier)") from None
        if version != FORMAT_VERSION:
            raise CogcoreError(f"junk classifier {path} has format {version}, this cogcore reads {FORMAT_VERSION}; "
                               "train it again")
        clf = cls(tensors["mean"], tensors["std"], tensors["weight"], tensors["bias"], threshold, info)
        if model is not None:
            clf._check_model(model)
        return clf


def default_path(base_hash: str, root: str | Path | None = None) -> Path:
    """Where consolidation keeps the classifier of one base: next to the experience log."""
    if root is None:
        from ..train.workspace import get_workspace
        root = get_workspace().experience
    return Path(root) / "junk-classifier" / f"{base_hash[:16]}.safetensors"


def load_or_train(model, tok, root: str | Path | None = None, progress: bool = False) -> JunkClassifier:
    """The workspace's classifier for ``model``'s base; trained (and saved) on first use."""
    path = default_path(model.base_hash, root)
    if path.is_file():
        return JunkClassifier.load(path, model)
    clf = JunkClassifier.train(model, tok, progress=progress)
    clf.save(path)
    return clf
