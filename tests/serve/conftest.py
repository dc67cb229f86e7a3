"""Fixtures of the serve tests: the tiny-llama core and a registry with three published adapters."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import publish_all

from cogcore.lora.registry import AdapterRegistry
from cogcore.train.model import load_model


@pytest.fixture(scope="session")
def base():
    torch.set_num_threads(1)
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def registry(tmp_path_factory, base):
    tmp = tmp_path_factory.mktemp("serve-reg")
    reg = AdapterRegistry(tmp / "adapters")
    publish_all(reg, base, tmp)
    return reg
