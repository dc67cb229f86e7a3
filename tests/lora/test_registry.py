"""AdapterRegistry: publish / get / list / rollback / gc / forget, atomicity under kill -9, refusals,
and that a published version is a plain PEFT directory."""

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cogcore.lora.registry import CONFIG, LIVE, META, WEIGHTS, AdapterRegistry, write_adapter_dir
from cogcore.train.config import CogcoreError
from cogcore.train.model import load_model
from cogcore.train.sft import LoraConfig, add_lora

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)
    return load_model("tiny-llama")


def make_adapter(base_model, out: Path, seed: int) -> Path:
    """A tiny-llama PEFT adapter with non-zero B (so it changes the output), saved the PEFT way."""
    model = add_lora(copy.deepcopy(base_model), LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture
def reg(tmp_path):
    return AdapterRegistry(tmp_path / "adapters")


def test_publish_get_list_rollback_gc(reg, base, tmp_path):
    a1 = make_adapter(base, tmp_path / "a1", 1)
    a2 = make_adapter(base, tmp_path / "a2", 2)
    a3 = make_adapter(base, tmp_path / "a3", 3)
    v1 = reg.publish("alice", a1, base_hash=base.base_hash, lineage={"set_version": 1}, gate={"passed": True})
    assert (v1.name, reg.live_version("alice")) == ("alice@v1", 1)
    v2 = reg.publish("alice", a2, base_hash=base.base_hash, lineage={"set_version": 2}, gate={"passed": True})
    assert v2.version == 2 and reg.get("alice").version == 2 and reg.resolve("alice@v1").sha256 == v1.sha256
    assert reg.resolve("alice").version == 2 and reg.resolve("alice@2").version == 2
    assert v2.lineage == {"set_version": 2} and v2.peft_config["r"] == 4 and v2.peft_config["lora_alpha"] == 8
    reg.publish("bob", a3, base_hash=base.base_hash)
    assert [a.name for a in reg.list()] == ["alice@v1", "alice@v2", "bob@v1"]
    assert [a.name for a in reg.list("alice")] == ["alice@v1", "alice@v2"]

    assert reg.rollback("alice").version == 1 and reg.live_version("alice") == 1
    with pytest.raises(CogcoreError, match="no version older than v1"):
        reg.rollback("alice")
    assert reg.rollback("alice", to=2).version == 2

    v3 = reg.publish("alice", a3, base_hash=base.base_hash)
    assert v3.version == 3
    reg.rollback("alice", to=1)  # LIVE = v1: gc keeps it even though it is not among the newest 2
    removed = reg.gc(keep=1)
    assert [a.name for a in reg.list("alice")] == ["alice@v1", "alice@v3"]
    assert [p.name for p in removed] == ["v2"]
    with pytest.raises(CogcoreError, match=r"alice@v2 does not exist \(published versions: alice@v1, alice@v3\)"):
        reg.get("alice", 2)

    assert reg.forget("alice") == 2 and reg.list("alice") == [] and reg.live_version("alice") is None
    with pytest.raises(CogcoreError, match="no live adapter for alice"):
        reg.get("alice")


def test_publish_is_idempotent(reg, base, tmp_path):
    a1, a2 = make_adapter(base, tmp_path / "a1", 1), make_adapter(base, tmp_path / "a2", 2)
    first = reg.publish("alice", a1, base_hash=base.base_hash)
    again = reg.publish("alice", a1, base_hash=base.base_hash)
    assert again.version == first.version == 1 and len(reg.list("alice")) == 1
    reg.publish("alice", a2, base_hash=base.base_hash)
    back = reg.publish("alice", a1, base_hash=base.base_hash)  # same weights again: v1 becomes LIVE, no v3
    assert back.version == 1 and reg.live_version("alice") == 1 and len(reg.list("alice")) == 2
    other_base = reg.publish("alice", a1, base_hash="0" * 64)  # same weights for another base are a new version
    assert other_base.version == 3


def test_published_dir_loads_with_peft_and_matches(reg, base, tmp_path):
    from peft import PeftModel
    src = make_adapter(base, tmp_path / "a1", 1)
    art = reg.publish("alice", src, base_hash=base.base_hash)
    assert sorted(p.name for p in art.path.iterdir()) == sorted([CONFIG, WEIGHTS, META])
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    with torch.no_grad():
        plain = base(ids).logits
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), art.path)
        tuned = loaded(ids).logits
    assert not torch.allclose(plain, tuned, atol=1e-4)  # the adapter does something
    weights = reg.load_weights(art, base.base_hash)
    assert any(k.endswith("q_proj.lora_A.weight") for k in weights)
    # the same tensors written through write_adapter_dir (the grouped trainer's path) load identically
    rewritten = write_adapter_dir(tmp_path / "rewritten", weights, art.peft_config)
    with torch.no_grad():
        again = PeftModel.from_pretrained(copy.deepcopy(base), rewritten)(ids).logits
    torch.testing.assert_close(again, tuned)


def test_refusals_wrong_base_checksum_pickle(reg, base, tmp_path):
    art = reg.publish("alice", make_adapter(base, tmp_path / "a1", 1), base_hash=base.base_hash)
    with pytest.raises(CogcoreError, match=r"adapter alice@v1 was trained for base .{12}…, the server runs base "
                                           r"41aa.*refresh alice or serve the matching base"):
        reg.load_weights(art, "41aa" + "0" * 60)

    weights = art.path / WEIGHTS
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(CogcoreError, match="alice@v1 is corrupt: adapter_model.safetensors has sha256"):
        reg.load_weights(art, base.base_hash)

    art2 = reg.publish("alice", make_adapter(base, tmp_path / "a2", 2), base_hash=base.base_hash)
    torch.save({"x": torch.zeros(1)}, art2.path / "adapter_model.bin")
    with pytest.raises(CogcoreError, match=r"holds pickled weights \(adapter_model.bin\)"):
        reg.load_weights(art2, base.base_hash)
    (art2.path / "adapter_model.bin").unlink()
    (art2.path / WEIGHTS).unlink()
    with pytest.raises(CogcoreError, match="has no adapter_model.safetensors"):
        reg.load_weights(art2, base.base_hash)

    pickled = make_adapter(base, tmp_path / "p", 3)
    torch.save({}, pickled / "adapter_model.bin")
    with pytest.raises(CogcoreError, match="takes safetensors only"):
        reg.publish("alice", pickled, base_hash=base.base_hash)
    with pytest.raises(CogcoreError, match="not a PEFT adapter directory"):
        reg.publish("alice", tmp_path, base_hash=base.base_hash)
    with pytest.raises(CogcoreError, match="invalid user id"):
        reg.publish("../evil", pickled, base_hash=base.base_hash)


def test_half_written_versions_are_never_listed_and_gc_removes_them(reg, base, tmp_path):
    reg.publish("alice", make_adapter(base, tmp_path / "a1", 1), base_hash=base.base_hash)
    user = reg.root / "alice"
    (user / ".tmp-v2-deadbeef").mkdir()
    (user / ".tmp-v2-deadbeef" / WEIGHTS).write_bytes(b"half")
    (user / "v7").mkdir()  # no cogcore.json: not a version
    (user / ".LIVE.tmp-cafe").write_text("v7\n")
    assert [a.name for a in reg.list()] == ["alice@v1"]
    nxt = reg.publish("alice", make_adapter(base, tmp_path / "a2", 2), base_hash=base.base_hash)
    assert nxt.version == 2
    removed = {p.name for p in reg.gc(keep=2)}
    assert removed == {".tmp-v2-deadbeef", "v7", ".LIVE.tmp-cafe"}
    assert sorted(p.name for p in user.iterdir()) == ["LIVE", "v1", "v2"]


CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import cogcore.lora.registry as R
    stage, root, src, base_hash, ready = sys.argv[1:]

    def block():
        Path(ready).write_text("here")
        time.sleep(600)

    # stop the publish at one point and wait there to be killed
    if stage == "copy":            # weights half copied
        real = R.shutil.copyfile
        def copyfile(a, b):
            if str(a).endswith(R.WEIGHTS):
                data = Path(a).read_bytes()
                Path(b).write_bytes(data[: len(data) // 2])
                block()
            return real(a, b)
        R.shutil.copyfile = copyfile
    elif stage == "rename":        # complete temp dir, not renamed yet
        real_rename = R.os.rename
        R.os.rename = lambda a, b: block()
    elif stage == "live":          # version renamed into place, LIVE not replaced yet
        R.os.replace = lambda a, b: block()
    R.AdapterRegistry(root).publish("alice", src, base_hash=base_hash, lineage={"set_version": 2})
""")


@pytest.mark.parametrize("stage", ["copy", "rename", "live"])
def test_kill_9_mid_publish_keeps_the_previous_version_live(reg, base, tmp_path, stage):
    from peft import PeftModel
    v1 = reg.publish("alice", make_adapter(base, tmp_path / "a1", 1), base_hash=base.base_hash)
    src = make_adapter(base, tmp_path / "a2", 2)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, str(script), stage, str(reg.root), str(src), base.base_hash, str(ready)],
                             cwd=ROOT, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 60
    while not ready.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert ready.exists(), child.stderr.read().decode()[-2000:]
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()

    # after the kill: either v1 is still LIVE, or (killed after the rename) v2 is complete but not LIVE
    assert reg.live_version("alice") == 1
    listed = [a.name for a in reg.list("alice")]
    assert listed == (["alice@v1", "alice@v2"] if stage == "live" else ["alice@v1"])
    with torch.no_grad():
        PeftModel.from_pretrained(copy.deepcopy(base), reg.get("alice").path)
    reg.load_weights(reg.get("alice"), base.base_hash)

    # a rerun completes: v2 live, exactly one copy of it
    again = reg.publish("alice", src, base_hash=base.base_hash, lineage={"set_version": 2})
    assert again.version == 2 and reg.live_version("alice") == 2
    assert [a.name for a in reg.list("alice")] == ["alice@v1", "alice@v2"]
    reg.gc(keep=5)
    assert sorted(p.name for p in (reg.root / "alice").iterdir()) == [LIVE, "v1", "v2"]
    assert json.loads((reg.root / "alice" / "v2" / META).read_text())["sha256"] == again.sha256
    assert v1.sha256 != again.sha256


def test_publish_lock_times_out_cleanly(reg):
    with reg.lock("alice", "refresh"):
        with pytest.raises(CogcoreError, match=r"refresh of alice is already running \(pid \d+"):
            with reg.lock("alice", "refresh", timeout=0.2):
                pass
    with reg.lock("alice", "refresh", timeout=0):  # released on exit
        pass
