"""Fixtures for the kernel tests: per-dtype closeness and a tiny Llama built in code."""

import pytest
import torch

# max |actual - expected| / max |expected| allowed, per dtype (values and gradients alike)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _assert_close(actual, expected, dtype, what=""):
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().clamp_min(1e-6)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:.1g} ({dtype})"


def _tiny_llama(seed=0, vocab=320, hidden=64, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a shared 2-core box an OpenMP
    region waiting for a descheduled second thread costs ~10 ms per op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def assert_close():
    """assert_close(actual, expected, dtype, what): relative max error within TOL[dtype]."""
    return _assert_close


@pytest.fixture
def make_llama():
    """make_llama(seed=0, vocab=320, hidden=64, layers=2) -> a fresh LlamaForCausalLM."""
    return _tiny_llama
