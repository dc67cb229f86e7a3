"""One workspace directory holds all of cogcore's state.

Chosen by ``--home DIR`` on the command line, else ``COGCORE_HOME``, else
``$XDG_DATA_HOME/cogcore`` (``~/.local/share/cogcore``). Everything that outlives a
process lives under it, in folders named for what they hold.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "COGCORE_HOME"


def default_home() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "cogcore"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def models(self) -> Path:
        """Converted / materialized models (embedded default, tiny presets) and hash cache."""
        return self.root / "models"

    @property
    def runs(self) -> Path:
        """Outputs of training runs (checkpoints, metrics, final models)."""
        return self.root / "runs"

    @property
    def teacher_cache(self) -> Path:
        """Cached top-k teacher log-probs for distillation."""
        return self.root / "teacher_cache"

    @property
    def experience(self) -> Path:
        """Per-user experience log (SQLite)."""
        return self.root / "experience"

    @property
    def consolidated(self) -> Path:
        """Versioned per-user consolidated training sets."""
        return self.root / "consolidated"

    @property
    def adapters(self) -> Path:
        """Adapter registry (user@vN, safetensors)."""
        return self.root / "adapters"

    def layout(self) -> dict[str, Path]:
        names = ["models", "runs", "teacher_cache", "experience", "consolidated", "adapters"]
        return {n: getattr(self, n) for n in names}


def get_workspace(home: str | os.PathLike | None = None) -> Workspace:
    root = Path(home).expanduser() if home else default_home()
    root.mkdir(parents=True, exist_ok=True)
    return Workspace(root.resolve())


def set_home(home: str | os.PathLike) -> None:
    """Make ``home`` the workspace for this process and the processes it launches."""
    os.environ[ENV_VAR] = str(Path(home).expanduser().resolve())


def run_dir(name: str, out: str = "") -> Path:
    """A run's directory: ``out`` when given, else ``<home>/runs/<name>``."""
    return Path(out).expanduser() if out else get_workspace().runs / name
