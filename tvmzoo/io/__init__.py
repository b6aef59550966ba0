"""Files in and out: checkpoint readers, the ONNX graph builder, atomic writes, images and labels."""
