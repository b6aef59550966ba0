"""Deploy ONNX -> compiled module: the pipeline, its passes and schedules, tuning, target, int8."""
