"""``python -m xrai serve | wheelhouse``: serving a run or an ONNX export, and the offline wheelhouse.

No torch and no pandas here: ``serve --onnx`` runs in the Dockerfile's ``onnx`` image, which has neither
(``xrai.deploy.server`` imports torch only for a run folder).
"""

from __future__ import annotations

from pathlib import Path

from xrai.deploy.server import serve
from xrai.deploy.wheelhouse import DEFAULT_WEIGHTS, add_weights, build_wheelhouse

__all__ = ["cmd_serve", "cmd_wheelhouse"]


def cmd_serve(args) -> int:
    for flag, value in (("--threads", args.threads), ("--torch-threads", args.torch_threads)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    threads = {} if args.threads is None else {"threads": args.threads}
    serve(args.run, onnx=args.onnx, host=args.host, port=args.port, torch_threads=args.torch_threads,
          debug=args.debug, **threads)
    return 0


def cmd_wheelhouse(args) -> int:
    # The weights first: a bad model name fails before pip's slow downloads.
    names = None if args.weights is None else [n.strip() for n in args.weights.split(",") if n.strip()]
    files = add_weights(args.out, names or DEFAULT_WEIGHTS) if names is not None else []
    # pip's own failure (no network, no wheel for the platform) is a WheelhouseError: main() makes it one line.
    wheels = build_wheelhouse(args.out, python_version=args.python_version, platform=args.platform,
                              xrai_only=args.xrai_only)
    print(f"wrote {len(wheels)} wheels to {args.out}: {', '.join(w.name for w in wheels)}")
    if files:
        print(f"wrote {len(files)} weights files and their SHA256SUMS to {Path(args.out, 'weights')}: "
              f"{', '.join(f.name for f in files)}")
    print("next: upload the folder as a Kaggle dataset and attach it to each notebook (README: Kaggle, Internet off)")
    return 0
