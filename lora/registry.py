"""The adapter registry: every user's published LoRA adapters, versioned, on disk.

Layout (``root`` = ``<home>/adapters`` by default)::

    <root>/<user>/v<N>/adapter_config.json         PEFT's own files: PEFT, vLLM and LoRAX load
    <root>/<user>/v<N>/adapter_model.safetensors   the directory unchanged
    <root>/<user>/v<N>/cogcore.json                user, version, base_hash, sha256, lineage, gate, ...
    <root>/<user>/LIVE                             "v<N>": the version ``core:<user>`` serves
    <root>/.locks/<user>.<purpose>.lock            flock files (publish, refresh)

A version exists only once its directory holds ``cogcore.json``: publishing builds the whole
directory in a hidden temp sibling, fsyncs it and renames it into place, then replaces LIVE
the same way. A process killed at any point leaves the previous LIVE version loadable and no
half version listed; ``gc`` sweeps the leftovers. Loading verifies the weights' sha256 and
the base model's hash, and only safetensors are ever read (no pickles).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from cogcore.train.config import CogcoreError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
META = "cogcore.json"
LIVE = "LIVE"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VERSION_DIR = re.compile(r"^v(\d+)$")
_NAME = re.compile(r"^(?P<user>[^@]+)(?:@(?:v)?(?P<version>\d+|live))?$")


def check_user(user: str) -> str:
    """The registry's user ids are the experience log's (letters, digits, _ . -; no '..')."""
    if not isinstance(user, str) or not _USER.match(user) or ".." in user:
        raise CogcoreError(f"invalid user id {user!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a "
                           "letter or digit")
    return user


def short(h: str | None) -> str:
    return (h or "?")[:12] + "…"


@dataclass
class AdapterArtifact:
    """One published adapter version: a PEFT directory plus what it was made from."""

    user: str
    version: int
    path: Path
    base_hash: str
    sha256: str
    lineage: dict = field(default_factory=dict)   # which consolidated set / run / warm start it came from
    gate: dict = field(default_factory=dict)      # the eval gate's report that let it through
    created: float = 0.0                          # unix seconds
    peft_config: dict = field(default_factory=dict)  # r, lora_alpha, target_modules, use_rslora, ...

    @property
    def name(self) -> str:
        return f"{self.user}@v{self.version}"

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["name"] = self.name
        return d


# ----------------------------------------------------------------------------- file helpers

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def pickled_files(directory: Path) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)


@contextlib.contextmanager
def file_lock(path: Path, *, timeout: float | None, what: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``: wait up to ``timeout`` seconds (None = forever, 0 = don't
    wait), else raise a one-line CogcoreError. The kernel drops it when the holder dies (kill -9)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    waited = f" after waiting {timeout:g} s" if timeout else ""
                    raise CogcoreError(f"{what} is already running ({holder}){waited}; wait for it to finish "
                                       "or raise the lock timeout") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def write_adapter_dir(out_dir: str | Path, weights: dict, peft_config: dict) -> Path:
    """Write a PEFT adapter directory from a state dict in PEFT's key layout (as ``save_pretrained`` does).

    ``peft_config`` holds peft.LoraConfig fields (r, lora_alpha, target_modules, use_rslora, ...).
    Used for adapters that were not trained inside a PeftModel (the grouped trainer).
    """
    from peft import LoraConfig as PeftLoraConfig
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(peft_config)
    cfg.setdefault("task_type", "CAUSAL_LM")
    cfg.pop("peft_type", None)
    allowed = set(PeftLoraConfig.__dataclass_fields__)
    PeftLoraConfig(**{k: v for k, v in cfg.items() if k in allowed}).save_pretrained(str(out))
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(out / WEIGHTS),
              metadata={"format": "pt"})
    return out


# ----------------------------------------------------------------------------- the registry

class AdapterRegistry:
    """Publish (atomic, idempotent), get, list, roll back, gc and forget users' adapters."""

    def __init__(self, root: str | Path | None = None):
        if root is None:
            from cogcore.train.workspace import get_workspace
            root = get_workspace().adapters
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"AdapterRegistry({str(self.root)!r})"

    # -- locks

    def lock(self, user: str, purpose: str = "publish", timeout: float | None = None) -> contextlib.AbstractContextManager:
        """The per-user lock: ``publish`` guards version numbers and LIVE, ``refresh`` guards training."""
        check_user(user)
        return file_lock(self.root / ".locks" / f"{user}.{purpose}.lock", timeout=timeout,
                         what=f"{purpose} of {user}")

    # -- reading

    def _user_dir(self, user: str) -> Path:
        return self.root / check_user(user)

    def _read(self, user: str, version_dir: Path) -> AdapterArtifact | None:
        """The artifact in ``version_dir``, or None when it is not a complete version."""
        m = _VERSION_DIR.match(version_dir.name)
        meta_path = version_dir / META
        if not m or not version_dir.is_dir() or not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return AdapterArtifact(user=user, version=int(m.group(1)), path=version_dir, base_hash=meta.get("base_hash", ""),
                               sha256=meta.get("sha256", ""), lineage=meta.get("lineage") or {},
                               gate=meta.get("gate") or {}, created=float(meta.get("created", 0.0)),
                               peft_config=meta.get("peft_config") or {})

    def versions(self, user: str) -> list[AdapterArtifact]:
        d = self._user_dir(user)
        if not d.is_dir():
            return []
        arts = [a for a in (self._read(user, p) for p in d.iterdir()) if a is not None]
        return sorted(arts, key=lambda a: a.version)

    def users(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and _USER.match(p.name) and self.versions(p.name))

    def list(self, user: str | None = None) -> list[AdapterArtifact]:
        users = [user] if user is not None else self.users()
        return [a for u in users for a in self.versions(u)]

    def live_version(self, user: str) -> int | None:
        path = self._user_dir(user) / LIVE
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return None
        m = _VERSION_DIR.match(text)
        if not m or self._read(user, path.parent / text) is None:
            return None  # LIVE names a version that is not (or no longer) complete
        return int(m.group(1))

    def get(self, user: str, version: int | None = None) -> AdapterArtifact:
        """``user@v<version>``, or the LIVE version when ``version`` is None."""
        if version is None:
            version = self.live_version(user)
            if version is None:
                raise CogcoreError(f"no live adapter for {user}: none was published yet (run `cogcore refresh --user "
                                   f"{user}`) or all were forgotten")
        art = self._read(check_user(user), self._user_dir(user) / f"v{int(version)}")
        if art is None:
            have = ", ".join(a.name for a in self.versions(user)) or "none"
            raise CogcoreError(f"adapter {user}@v{version} does not exist (published versions: {have})")
        return art

    def resolve(self, name: str) -> AdapterArtifact:
        """``alice`` / ``alice@live`` (the LIVE version), ``alice@v3`` or ``alice@3``."""
        m = _NAME.match(name.strip())
        if not m:
            raise CogcoreError(f"adapter name {name!r} is not 'user' or 'user@vN'")
        v = m.group("version")
        return self.get(m.group("user"), None if v in (None, "live") else int(v))

    # -- publishing

    def publish(self, user: str, adapter_dir: str | Path, *, base_hash: str, lineage: dict | None = None,
                gate: dict | None = None) -> AdapterArtifact:
        """Copy a PEFT adapter directory in as the user's next version and make it LIVE.

        Idempotent: the same weights (sha256) for the same base come back as the version that
        already holds them (made LIVE again), so a rerun after a crash publishes nothing twice.
        """
        check_user(user)
        src = Path(adapter_dir)
        if not (src / WEIGHTS).is_file() or not (src / CONFIG).is_file():
            raise CogcoreError(f"{src} is not a PEFT adapter directory: it needs {CONFIG} and {WEIGHTS} "
                               "(save it with save_pretrained(..., safe_serialization=True))")
        if pickled_files(src):
            raise CogcoreError(f"{src} holds pickled weights ({', '.join(pickled_files(src))}); the registry takes "
                               "safetensors only: remove them and save with safe_serialization=True")
        if not base_hash:
            raise CogcoreError("publish needs the base_hash of the model the adapter was trained on")
        digest = sha256_file(src / WEIGHTS)
        peft_config = json.loads((src / CONFIG).read_text())
        user_dir = self._user_dir(user)
        with self.lock(user, "publish"):
            user_dir.mkdir(parents=True, exist_ok=True)
            for art in self.versions(user):
                if art.sha256 == digest and art.base_hash == base_hash:
                    self._set_live(user, art.version)
                    return art
            version = max([a.version for a in self.versions(user)] + [0]) + 1
            final = user_dir / f"v{version}"
            if final.exists():  # an incomplete dir someone left by hand: not a version, replace it
                shutil.rmtree(final)
            tmp = user_dir / f".tmp-v{version}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            for name in (CONFIG, WEIGHTS):
                shutil.copyfile(src / name, tmp / name)
                _fsync_file(tmp / name)
            if sha256_file(tmp / WEIGHTS) != digest:
                shutil.rmtree(tmp, ignore_errors=True)
                raise CogcoreError(f"{src / WEIGHTS} changed while it was being published; publish again")
            meta = {"user": user, "version": version, "base_hash": base_hash, "sha256": digest,
                    "lineage": lineage or {}, "gate": gate or {}, "created": time.time(),
                    "peft_config": {k: peft_config.get(k) for k in ("r", "lora_alpha", "target_modules", "use_rslora",
                                                                    "layers_to_transform", "lora_dropout", "bias",
                                                                    "base_model_name_or_path")}}
            _write_durable(tmp / META, json.dumps(meta, indent=1, sort_keys=True))  # last: marks it complete
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(user_dir)
            self._set_live(user, version)
            return self.get(user, version)

    def _set_live(self, user: str, version: int) -> None:
        user_dir = self._user_dir(user)
        tmp = user_dir / f".LIVE.tmp-{uuid.uuid4().hex[:8]}"
        _write_durable(tmp, f"v{version}\n")
        os.replace(tmp, user_dir / LIVE)
        _fsync_dir(user_dir)

    def rollback(self, user: str, to: int | None = None) -> AdapterArtifact:
        """Make ``to`` (default: the newest version older than LIVE) the LIVE version."""
        with self.lock(user, "publish"):
            live = self.live_version(user)
            if to is None:
                older = [a for a in self.versions(user) if live is None or a.version < live]
                if not older:
                    raise CogcoreError(f"{user} has no version older than v{live} to roll back to"
                                       if live else f"{user} has no published adapter to roll back to")
                art = older[-1]
            else:
                art = self.get(user, to)
            self._set_live(user, art.version)
            return art

    # -- cleaning

    def gc(self, keep: int = 2) -> list[Path]:
        """Remove half-written leftovers and all but the newest ``keep`` versions (LIVE is always kept)."""
        if keep < 1:
            raise CogcoreError(f"gc keep={keep}: keep at least 1 version per user")
        removed: list[Path] = []
        for user_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            user = user_dir.name
            if not _USER.match(user):
                continue
            with self.lock(user, "publish"):
                live = self.live_version(user)
                complete = self.versions(user)
                keep_versions = {a.version for a in complete[-keep:]} | ({live} if live else set())
                for p in sorted(user_dir.iterdir()):
                    if p.name == LIVE:
                        continue
                    art = self._read(user, p)
                    if art is not None and art.version in keep_versions:
                        continue
                    removed.append(p)
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                if live is None and not complete and (user_dir / LIVE).exists():
                    removed.append(user_dir / LIVE)
                    (user_dir / LIVE).unlink()
        return removed

    def forget(self, user: str) -> int:
        """Delete every version of ``user`` (privacy); returns how many versions there were."""
        with self.lock(user, "publish"):
            n = len(self.versions(user))
            d = self._user_dir(user)
            if d.exists():
                # rename first so a reader never sees a half-deleted user
                gone = self.root / f".forget-{user}-{uuid.uuid4().hex[:8]}"
                os.rename(d, gone)
                shutil.rmtree(gone)
            return n

    # -- loading

    def verify(self, artifact: AdapterArtifact, expected_base_hash: str | None) -> None:
        """Raise a CogcoreError unless the artifact holds safetensors weights with its recorded
        sha256, made for ``expected_base_hash`` (None skips the base check)."""
        path = Path(artifact.path)
        if not path.is_dir():
            raise CogcoreError(f"adapter {artifact.name}: {path} is gone (garbage-collected or forgotten?)")
        bad = pickled_files(path)
        if bad:
            raise CogcoreError(f"adapter {artifact.name} holds pickled weights ({', '.join(bad)}), which cogcore never "
                               f"loads (they can run code): republish it as {WEIGHTS}")
        if not (path / WEIGHTS).is_file():
            raise CogcoreError(f"adapter {artifact.name} has no {WEIGHTS} in {path}: refresh {artifact.user} or roll "
                               "back to another version")
        got = sha256_file(path / WEIGHTS)
        if got != artifact.sha256:
            raise CogcoreError(f"adapter {artifact.name} is corrupt: {WEIGHTS} has sha256 {short(got)}, its {META} "
                               f"records {short(artifact.sha256)}: roll back (`cogcore adapters rollback "
                               f"{artifact.user}`) or refresh {artifact.user}")
        if expected_base_hash is not None and artifact.base_hash != expected_base_hash:
            raise CogcoreError(f"adapter {artifact.name} was trained for base {short(artifact.base_hash)}, the server "
                               f"runs base {short(expected_base_hash)}: refresh {artifact.user} or serve the "
                               "matching base")

    def load_weights(self, artifact: AdapterArtifact, expected_base_hash: str | None) -> dict:
        """The adapter's tensors in PEFT's key layout, after :meth:`verify`."""
        from safetensors.torch import load_file
        self.verify(artifact, expected_base_hash)
        return load_file(str(Path(artifact.path) / WEIGHTS))
