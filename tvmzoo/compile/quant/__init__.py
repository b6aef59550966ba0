"""int8: calibration, quantization, per-layer fallback and report."""
