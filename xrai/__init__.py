"""X-RAI: musculoskeletal X-ray classifiers you can train, evaluate and explain on a free T4.

The package reads bottom-up (docs/design.md, "Layout"): ``config``, ``env``, ``errors``, ``fileio`` and
``labels`` need no torch; then ``data``, ``models``, ``runs``, ``explain``, ``evaluate``, ``train``,
``deploy``, ``bench`` and ``cli``; ``plots`` and ``widgets`` are the notebooks' helpers.
"""

from xrai._aliases import install as _install_aliases

__version__ = "0.2.0"

__all__ = ["__version__"]

_install_aliases()  # the flat layout's module names (xrai.inference, ...) for one more release
