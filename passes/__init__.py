"""Graph passes between stages: ONNX passes (onnx-graphsurgeon) and TVM Relax passes."""
