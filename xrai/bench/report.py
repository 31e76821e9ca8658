"""The bench's tables from a result dict (a run's, or a saved bench JSON): the plain-text table printed
after `python -m xrai bench` and the README's markdown table (`python -m xrai bench --markdown FILE`).

Standard library only, so formatting a saved JSON needs no torch; `xrai.bench.run` re-exports these.
"""

from __future__ import annotations

import os

__all__ = ["LOADER_WORKERS", "format_table", "load_average", "markdown_table", "scaling_lines"]

LOADER_WORKERS = 2  # Colab's and Kaggle's 2 vCPUs; the classic path and the seeds' loader both get them


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): how busy the machine was."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _head(result: dict) -> str:
    m, load = result["machine"], result.get("load_average") or {}
    busy = (f" (load average {load['start']:.1f} at the start, {load['end']:.1f} at the end)"
            if load.get("start") is not None and load.get("end") is not None else "")
    return (f"{result['data']}" + (f" ({result['images']:,} images)" if "images" in result else "")
            + f", {result['model']} at {result['img_size']} px"
            + (f", batch {result['batch_size']}" if "batch_size" in result else "")
            + f"; device {result['device']}: {m['cpu']}, {m['cores']} cores{busy}, GPU {m['gpu'] or 'none'}")


def format_table(result: dict) -> str:
    """The bench's plain-text table, as printed after a run."""
    ready, feed, train = result["ready_img_s"], result["feed_img_s"], result["train_img_s"]
    lines = [_head(result),
             f"{'images/s':<36}{'cached':>10}{'classic':>10}{'seeds':>10}",
             f"{'ready batches on ' + result['device']:<36}{ready['cached']:>10,.0f}{ready['classic']:>10,.0f}"
             f"{ready['seeds']:>10,.0f}",
             f"{'  of which host side only':<36}{feed['cached']:>10,.0f}{feed['classic']:>10,.0f}",
             f"{'training step fed by it':<36}{train['cached']:>10,.1f}{train['classic']:>10,.1f}",
             f"{'model-only ceiling':<36}{train['ceiling']:>10,.1f}",
             f"{'cache build (one-time)':<36}{result['cache_build_img_s']:>10,.0f}",
             f"predict + Grad-CAM, one 512 px image: median {result['predict_gradcam_ms']['median']:.0f} ms, "
             f"p90 {result['predict_gradcam_ms']['p90']:.0f} ms"]
    if result.get("predict_ms"):
        lines.append(f"predict, one image, CPU: {_cpu_predict(result['predict_ms'])}")
    if "scaling" in result:
        lines += scaling_lines(result["scaling"], ceiling=train["ceiling"], device=result["device"])
    return "\n".join(lines)


def scaling_lines(scaling: dict, *, ceiling: float | None = None, device: str = "cuda") -> list[str]:
    """The bench table's lines for the scaling figures (``xrai.bench.scaling.measure_scaling``'s)."""
    n = scaling["nproc"]
    lines = [f"{'training, 1 process':<28}{scaling['img_s_1']:>10,.1f}   (batch {scaling['per_process_batch']})",
             f"{f'training, {n} processes':<28}{scaling['img_s_n']:>10,.1f}   "
             f"(batch {scaling['per_process_batch']} each, {n * scaling['per_process_batch']} in all)",
             f"{'scaling efficiency':<28}{scaling['efficiency']:>10.2f}   "
             + ("(processes share this CPU's cores: reported, not judged)" if device == "cpu"
                else "(the target on two T4s: >= 0.85)")]
    if ceiling:
        lines.append(f"{'single-device ceiling':<28}{ceiling:>10,.1f}   (model alone, batch already on the device)")
    return lines


def _cpu_predict(cpu: dict) -> str:
    onnx = cpu.get("onnxruntime_cpu")
    return (f"PyTorch median {cpu['torch_cpu']['median']:.1f} ms, onnxruntime "
            + (f"median {onnx['median']:.1f} ms" if onnx else 'not timed (onnx=False, or no "xrai[onnx]")'))


def markdown_table(result: dict) -> str:
    """The README's performance table from one bench JSON: every figure and ratio from that one run."""
    ready, feed, train = result["ready_img_s"], result["feed_img_s"], result["train_img_s"]
    ms = result["predict_gradcam_ms"]
    rows = [
        ("Ready-to-train batches on the device (decoded, resized, augmented, normalised, channels_last)",
         f"cached {ready['cached']:,.0f} img/s, classic {ready['classic']:,.0f} img/s, seeds' loader "
         f"{ready['seeds']:,.0f} img/s: cached {ready['cached'] / ready['classic']:.1f}x classic, "
         f"{ready['cached'] / ready['seeds']:.1f}x the seeds'"),
        ("&nbsp;&nbsp;of which the host side only (uint8 batches, before device and augmentation)",
         f"cached gather {feed['cached']:,.0f} img/s, classic decode + letterbox in {LOADER_WORKERS} workers "
         f"{feed['classic']:,.0f} img/s"),
        ("Training step fed by each path",
         f"cached {train['cached']:,.1f} img/s, classic {train['classic']:,.1f} img/s; model-only ceiling "
         f"{train['ceiling']:,.1f} img/s (cached = {100 * train['cached'] / train['ceiling']:.0f}% of it)"),
        ("Cache build (one-time decode)", f"{result['cache_build_img_s']:,.0f} img/s"),
        ("Predict + Grad-CAM, one 512 px image", f"median {ms['median']:.0f} ms, p90 {ms['p90']:.0f} ms after warm-up"),
    ]
    if result.get("predict_ms"):
        rows.append(("Predict, one image, CPU, no Grad-CAM (same threads)", _cpu_predict(result["predict_ms"])))
    if "scaling" in result:
        sc = result["scaling"]
        rows.append((f"Training on 1 and {sc['nproc']} processes (batch {sc['per_process_batch']} each)",
                     f"{sc['img_s_1']:,.1f} and {sc['img_s_n']:,.1f} img/s: scaling efficiency {sc['efficiency']:.2f}"
                     + (" (the processes share the CPU's cores: reported, not judged)" if result["device"] == "cpu"
                        else "")))
    lines = [f"`python -m xrai bench` in one run: {_head(result)}.", "", "| What | Figure |", "|---|---|",
             *(f"| {what} | {figure} |" for what, figure in rows)]
    return "\n".join(lines)
