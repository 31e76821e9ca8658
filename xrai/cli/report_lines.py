"""The lines the commands print about a report: the headline figures, calibration, the screening point and the
explanation scores. Formatting only (the words for a calibration are xrai.evaluate.report's)."""

from __future__ import annotations

from xrai.evaluate.report import calibration_words, figure

__all__ = ["extras", "headline", "print_report"]


def headline(report: dict) -> str:
    """One line per report: image figures at the image threshold, study figures at the study threshold;
    the MURA baseline only on MURA runs, with what it was measured on."""
    image = report["image"]
    parts = [f"{report['split']}: n={image['n']}", f"AUROC {figure(image.get('auroc'), image.get('auroc_ci'))}",
             f"kappa {figure(image.get('kappa'), image.get('kappa_ci'))}",
             f"sensitivity {figure(image.get('sensitivity'))}", f"specificity {figure(image.get('specificity'))}",
             f"at image threshold {report['threshold']:.3f}"]
    if report.get("study"):
        parts.append(f"study kappa {figure(report['study'].get('kappa'), report['study'].get('kappa_ci'))} "
                     f"at study threshold {report['study_threshold']:.3f}")
    line = ", ".join(parts) + f" (chosen on {report['threshold_from']})"
    if report.get("baseline"):
        line += (f"\n  MURA DenseNet-169 baseline study kappa {report['baseline']['study_kappa']['overall']:.3f}: "
                 f"{report['baseline']['caveat']}")
    return line


def extras(report: dict) -> list[str]:
    """Calibration, the screening operating point and the explanation scores of a report, as lines."""
    lines = []
    cal = report.get("calibration")
    if cal:
        lines.append(f"  calibration: {calibration_words(cal)}; ECE ({cal['bins']} equal-width "
                     f"bins) {cal['ece']['uncalibrated']:.3f} uncalibrated -> {cal['ece']['calibrated']:.3f}")
    point = (report.get("operating_points") or {}).get("sensitivity")
    if point:
        lines.append(f"  screening point (sensitivity >= {point['target']:.2f} on valid): threshold "
                     f"{point['threshold']:.3f} -> sensitivity {figure(point['image']['sensitivity'])}, specificity "
                     f"{figure(point['image']['specificity'])}")
    block = report.get("explain")
    if block:
        for method, v in block["methods"].items():
            check = "passes" if v["randomisation"]["passes"] else "FAILS"
            point = v.get("pointing_game")
            lines.append(f"  {method}: ROAD {figure(v['road_combined']['mean'])}, randomisation check {check} "
                         f"(Spearman {figure(v['randomisation']['spearman_mean'])})"
                         + (f", pointing game {point['pointing_game']:.2f} (chance {point['chance']:.2f})"
                            if point else ""))
        lines.append(f"  (noise map ROAD {figure(block['noise_map']['road_combined']['mean'])}; "
                     f"{block['sample']['n_images']} images, seed {block['sample']['seed']})")
    return lines


def print_report(report: dict) -> None:
    """The headline and the extra lines of one report."""
    print(headline(report))
    print("\n".join(extras(report)))
