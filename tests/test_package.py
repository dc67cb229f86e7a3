"""The checkout's root is the `cogcore` package; it must never also be an import root."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_running_from_the_checkout_does_not_expose_subpackages_under_bare_names():
    # `python -c` (like `python -m`) puts the current directory first on sys.path; from the
    # checkout that made `kernels` resolve to cogcore/kernels and shadow the Hugging Face
    # `kernels` package, which transformers >= 5.25 imports while loading any model.
    code = (
        "import importlib.util, os, sys, cogcore\n"
        "root = os.path.realpath(os.path.dirname(cogcore.__file__))\n"
        "assert root not in [os.path.realpath(p or '.') for p in sys.path], sys.path\n"
        "for name in ('kernels', 'train', 'serve', 'memory'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    own = os.path.join(root, name, '__init__.py')\n"
        "    assert spec is None or os.path.realpath(spec.origin or '') != own, (name, spec.origin)\n"
        "import cogcore.kernels\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
