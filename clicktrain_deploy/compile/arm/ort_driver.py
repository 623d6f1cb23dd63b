"""Runs INSIDE qemu-aarch64, on the aarch64 CPython with onnxruntime's own aarch64 wheel.

usage: ort_driver.py model.onnx n_inputs runs   (in a folder holding in0.npy, in1.npy, ...)

Inputs ``in<i>.npy`` are in the model's input order (plain .npy, not .npz: a zip archive
carries the time of day, which made the count differ by a few hundred instructions). One
session, single-threaded (intra_op_num_threads=1, inter_op_num_threads=1, no spinning),
default graph optimisations;
``session.run`` is called ``runs`` times and the last outputs are saved as ``out0.npy, ...``
(none for ``runs=0``, which measures the start-up alone).
Not imported on the host: ``compile.arm.run_onnxruntime_arm`` launches it under qemu.
"""
import sys


def main(model: str, n_inputs: int, runs: int) -> None:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    arrays = [np.load(f"in{i}.npy") for i in range(n_inputs)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(arrays):
        raise SystemExit(f"model has {len(names)} inputs, got {len(arrays)}")
    feeds = dict(zip(names, arrays))
    result = []  # runs=0: start-up only, no outputs
    for _ in range(runs):
        result = session.run(None, feeds)
    for i, array in enumerate(result):
        np.save(f"out{i}.npy", array)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
