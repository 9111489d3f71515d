"""Match probabilities for single (image, text) pairs: the calibration file and the formula.

``p(match) = sigmoid(scale * cosine(image, text) + bias)``. ``scale`` and ``bias`` come from a
calibration file (``ccj-eval calibrate``: Platt scaling on a held-out set's matched and sampled
mismatched pairs) or, for a model trained with the sigmoid loss, from the model itself
(``exp(logit_scale)`` and its learned ``logit_bias``). The file is JSON; this module reads it
(the evaluation package writes it), so inference never imports evaluation::

    {"format": "ccj-calibration/1", "scale": 31.2, "bias": -8.4, "temperature": 0.032, ...}

Every other key (ECE before/after, pair counts, base rate, model, data) is a record for people.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

__all__ = ["CALIBRATION_FORMAT", "Calibration", "CalibrationError", "read_calibration", "match_probability"]

CALIBRATION_FORMAT = "ccj-calibration/1"


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Calibration:
    """``p = sigmoid(scale * cosine + bias)``; ``source``: where the numbers came from."""

    scale: float
    bias: float
    source: str = ""

    def probability(self, cosine) -> np.ndarray:
        return match_probability(cosine, self.scale, self.bias)


def match_probability(cosine, scale: float, bias: float) -> np.ndarray:
    """``sigmoid(scale * cosine + bias)`` in float64, without overflow; returns float32."""
    z = scale * np.asarray(cosine, np.float64) + bias
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)


def read_calibration(path: str | os.PathLike) -> Calibration:
    """Reads a ``ccj-eval calibrate`` file; ``CalibrationError`` (one line, naming the file) if
    it is missing, not JSON, of another format, or its scale/bias are not finite numbers."""
    from ..io import as_path

    p = as_path(path, what="calibration file")
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise CalibrationError(f"calibration file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"calibration file {p} cannot be read ({type(e).__name__})") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise CalibrationError(f"calibration file {p} is not JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CalibrationError(
            f"calibration file {p} is not a {CALIBRATION_FORMAT!r} file (format: {found!r}); "
            "write one with `ccj-eval calibrate`"
        )
    values = {}
    for key in ("scale", "bias"):
        v = data.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise CalibrationError(f"calibration file {p}: {key!r} must be a finite number, got {v!r}")
        values[key] = float(v)
    return Calibration(values["scale"], values["bias"], source=str(p))
