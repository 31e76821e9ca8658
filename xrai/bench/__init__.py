"""``python -m xrai bench``: input paths, training step, latency, memory and scaling, measured in one run."""
