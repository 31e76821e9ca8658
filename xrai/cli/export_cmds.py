"""``python -m xrai export``: a run's model (or CV ensemble) as ONNX or TorchScript, with its sidecar JSON."""

from __future__ import annotations

from xrai.deploy.export import export_run

__all__ = ["cmd_export"]


def cmd_export(args) -> int:
    result = export_run(args.run, fmt=args.fmt, which=args.which, out=args.out)
    serve = f"; serve it with `python -m xrai serve --onnx {result.path}`" if args.fmt == "onnx" else ""
    print(f"wrote {result.path} and {result.sidecar.name} (largest difference from PyTorch "
          f"{result.max_difference:.1e}){serve}")
    return 0
