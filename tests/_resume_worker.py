"""Runs fit() for tests/test_resume.py in its own process, so the test can SIGKILL it mid-epoch.

python tests/_resume_worker.py SYNTHETIC_ROOT RUN_DIR [--resume] [--hang-epoch K --marker FILE]

With --hang-epoch, the training source touches MARKER after the first two batches of epoch K have
trained and then sleeps, so the kill lands inside epoch K at a known point (the weights in memory
have moved past checkpoints/last.pt, which still holds epoch K-1).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--hang-epoch", type=int, default=0)
    parser.add_argument("--marker", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same thread count in every process keeps CPU kernels bit-identical

    import xrai.data.dataset as dataset
    from xrai.config import TrainConfig
    from xrai.data import load
    from xrai.train.trainer import fit

    if args.hang_epoch:
        original = dataset.ClassicBatches.epoch

        def epoch(self, k):
            for i, batch in enumerate(original(self, k)):
                if self.train and k == args.hang_epoch and i == 2:
                    Path(args.marker).touch()
                    time.sleep(600)
                yield batch

        dataset.ClassicBatches.epoch = epoch

    manifest = load("synthetic", root=args.root, progress=False)
    config = TrainConfig(data="synthetic", root=args.root, pretrained=False, epochs=4, img_size=64, batch_size=8,
                         num_workers=0, input_path="classic", dropout=0.2, patience=0, seed=0)
    fit(config, manifest, args.run_dir, resume=args.resume, progress=False)


if __name__ == "__main__":
    main()
