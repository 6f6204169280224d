"""Whether a calibrated profile can be trusted: its held-out error and how many serving-loop steps it saw.

A fit is poorly calibrated when its held-out MAPE is above MAX_HELDOUT_MAPE, or when it saw fewer than
MIN_SERVING_STEPS steps of the engine serving arrivals (a profile's serving phase or a real run's steps: the
grid alone does not teach the serving loop's eager-step cost). Such a profile is still written and still
usable, but it says so in its fit report ("calibration_quality"), it is warned about when written and when
used, and runs and plan rows it predicts carry the verdict.
"""

from __future__ import annotations

import math
import warnings

MAX_HELDOUT_MAPE = 0.10
MIN_SERVING_STEPS = 100


class PoorCalibrationWarning(UserWarning):
    """A calibrated profile failed a quality gate."""


def assess(fit_report: dict) -> dict:
    """{"poorly_calibrated": bool, "reasons": [...]} of a fit report; a criterion the report lacks data for (a
    profile fitted before serving steps were counted) is not held against it."""
    reasons = []
    heldout = fit_report.get("heldout_mape")
    if heldout is None or (isinstance(heldout, float) and math.isnan(heldout)):
        reasons.append("no held-out error (no steps were held out)")
    elif heldout > MAX_HELDOUT_MAPE:
        reasons.append(f"held-out MAPE {heldout:.0%} is above {MAX_HELDOUT_MAPE:.0%}")
    serving = fit_report.get("num_serving_steps")
    if serving is not None and serving < MIN_SERVING_STEPS:
        reasons.append(f"only {serving} serving-loop steps (at least {MIN_SERVING_STEPS}: profile with "
                       "--serving-seconds, or calibrate with a real run's folder too)")
    return {"poorly_calibrated": bool(reasons), "reasons": reasons}


def quality_of(cost_model) -> dict | None:
    """The verdict stored in a calibrated cost model's fit report (assessed now for older profiles); None for
    composed and roofline models, which have no fit."""
    if getattr(cost_model, "provenance", None) != "calibrated":
        return None
    report = getattr(cost_model, "fit_report", None) or {}
    return report.get("calibration_quality") or assess(report)


def describe(cost_model) -> str:
    """'poorly calibrated: REASONS' for a poor calibrated model; '' otherwise."""
    quality = quality_of(cost_model)
    if not quality or not quality["poorly_calibrated"]:
        return ""
    return "poorly calibrated: " + "; ".join(quality["reasons"])


def warn_if_poor(cost_model, when: str) -> None:
    """A warning naming the profile and why it is poor; `when` says what is being done with it."""
    text = describe(cost_model)
    if text:
        warnings.warn(f"{cost_model.label} is {text} ({when}); its predictions may be far off",
                      PoorCalibrationWarning, stacklevel=3)
