"""X-RAI: musculoskeletal X-ray classifiers you can train, evaluate and explain on a free T4."""

__version__ = "0.1.0"

__all__ = ["__version__"]
