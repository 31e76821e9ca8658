"""Make the packages named in $XRAI_BLOCK_IMPORTS (comma-separated) unimportable, as if not installed.

Put this folder first on PYTHONPATH of a subprocess: Python imports ``sitecustomize`` at start-up,
before any test code, so ``import torch`` (or ``import pylibjpeg``) then fails with ImportError.
"""

import os
import sys

_BLOCKED = {name.strip() for name in os.environ.get("XRAI_BLOCK_IMPORTS", "").split(",") if name.strip()}


class _Blocker:
    """A meta-path finder that refuses the blocked top-level packages and everything under them."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".", 1)[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by the test)", name=fullname)
        return None


if _BLOCKED:
    sys.meta_path.insert(0, _Blocker())
