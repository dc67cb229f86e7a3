"""The vLLM bridge without a GPU: the `vllm serve` command built from the registry (names, paths,
ranks, limits, keys), and `cogcore serve --engine vllm` through the real CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from serve_helpers import make_adapter

from cogcore.lora.registry import AdapterRegistry
from cogcore.serve.app import ServeConfig
from cogcore.serve.engine import EngineConfig
from cogcore.serve.vllm import vllm_command, vllm_rank
from cogcore.train.config import CogcoreError
from cogcore.train.model import ModelSpec, resolve


@pytest.fixture(scope="module")
def reg(tmp_path_factory, base):
    tmp = tmp_path_factory.mktemp("vllm-reg")
    reg = AdapterRegistry(tmp / "adapters")
    reg.publish("alice", make_adapter(base, tmp / "a1", seed=1, r=4), base_hash=base.base_hash)
    reg.publish("alice", make_adapter(base, tmp / "a2", seed=2, r=12), base_hash=base.base_hash)
    reg.publish("bob", make_adapter(base, tmp / "b1", seed=3, r=4), base_hash=base.base_hash)
    reg.publish("zed", make_adapter(base, tmp / "z1", seed=4, r=4), base_hash="f" * 64)  # another base
    return reg


def _modules(cmd: list[str]) -> dict[str, dict]:
    i = cmd.index("--lora-modules")
    mods = []
    for arg in cmd[i + 1:]:
        if arg.startswith("--"):
            break
        mods.append(json.loads(arg))
    return {m["name"]: m for m in mods}


def test_command_from_registry(reg, base):
    cfg = ServeConfig(engine=EngineConfig(model=ModelSpec("tiny-llama"), adapters_on_device=4, cpu_adapters=16,
                                          max_batch=48), host="0.0.0.0", port=9001)
    cmd, warnings = vllm_command(cfg, reg)
    base_dir = str(resolve(ModelSpec("tiny-llama")).resolve())
    assert cmd[:3] == ["vllm", "serve", base_dir]
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags["--served-model-name"] == "core" and flags["--host"] == "0.0.0.0" and flags["--port"] == "9001"
    assert "--enable-lora" in cmd and "--api-key" not in cmd and "--quantization" not in cmd
    i = cmd.index
    assert cmd[i("--max-loras") + 1] == "4" and cmd[i("--max-cpu-loras") + 1] == "16"
    assert cmd[i("--max-num-seqs") + 1] == "48"
    assert cmd[i("--max-lora-rank") + 1] == "16"  # rank 12 rounds up to a value vLLM accepts
    mods = _modules(cmd)
    assert sorted(mods) == ["alice@v1", "alice@v2", "bob@v1", "core:alice", "core:bob"]
    assert mods["core:alice"]["path"] == str(reg.get("alice", 2).path.resolve())  # LIVE at launch
    assert mods["alice@v1"]["path"] == str(reg.get("alice", 1).path.resolve())
    assert all(m["base_model_name"] == "core" and (Path(m["path"]) / "adapter_model.safetensors").is_file()
               for m in mods.values())
    assert len(warnings) == 1 and "zed@v1" in warnings[0] and "base" in warnings[0]


def test_ranks_keys_and_quantization(reg, monkeypatch):
    assert [vllm_rank(r) for r in (1, 2, 8, 9, 64, 65)] == [1, 8, 8, 16, 64, 128]
    with pytest.raises(CogcoreError, match="largest"):
        vllm_rank(1024)
    cfg = ServeConfig(engine=EngineConfig(model=ModelSpec("tiny-llama", quantize="nf4", dtype="bfloat16")))
    cmd, _ = vllm_command(cfg, reg, api_key="sk-ops")
    assert cmd[cmd.index("--quantization") + 1] == "bitsandbytes" and cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert cmd[cmd.index("--api-key") + 1] == "sk-ops"
    from cogcore.serve.vllm import _single_key
    monkeypatch.setenv("COGCORE_API_KEYS", "sk-a:alice,sk-ops:admin")
    with pytest.raises(CogcoreError, match="single API key"):
        _single_key(ServeConfig())
    monkeypatch.setenv("COGCORE_API_KEYS", "sk-ops:admin")
    assert _single_key(ServeConfig()) == "sk-ops"


def test_cli(cli, reg, tmp_path):
    r = cli("serve", "--help")
    assert r.returncode == 0 and "--adapters-on-device" in r.stdout and "--engine" in r.stdout
    r = cli("serve", "--model", "tiny-llama", "--engine", "vllm", "--print-command", "--adapters", str(reg.root),
            "--port", "8123", check=True)
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("vllm serve ") and "--enable-lora" in line and "core:alice" in line and "8123" in line
    assert "skipping zed@v1" in r.stderr
    if importlib.util.find_spec("vllm") is None:
        r = cli("serve", "--model", "tiny-llama", "--engine", "vllm", "--adapters", str(reg.root))
        assert r.returncode == 2 and "vLLM is not installed" in r.stderr
    from cogcore.serve.cli import main
    with pytest.raises(CogcoreError, match="max_batch must be >= 1"):
        main(["--model", "tiny-llama", "--max-batch", "0", "--port", "0"])
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys: [{key: k1}]\n")
    with pytest.raises(CogcoreError, match="needs 'key' and 'user'"):
        main(["--model", "tiny-llama", "--keys", str(keys), "--port", "0", "--adapters", str(reg.root)])
