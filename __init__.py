"""cogcore: distill, personalize and serve small cognitive-core language models."""

import os as _os
import sys as _sys

__version__ = "0.1.0"


def _keep_own_directory_off_sys_path() -> None:
    """Drop this package's own directory from `sys.path`.

    The repository root *is* the `cogcore` package, so `python -m cogcore...` run from a checkout
    puts it on `sys.path` (as the current directory), and its subpackages become importable
    under bare names too. `kernels` then shadows the Hugging Face `kernels` package that
    transformers >= 5.25 imports on its own, and every model load fails. cogcore itself is
    found through its install, never through this entry, so removing it loses nothing.
    """
    here = _os.path.realpath(_os.path.dirname(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != here]


_keep_own_directory_off_sys_path()
