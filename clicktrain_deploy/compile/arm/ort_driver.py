"""Runs INSIDE qemu-aarch64, on the aarch64 CPython with onnxruntime's own aarch64 wheel.

usage: ort_driver.py model.onnx in.npz out.npz runs

Inputs are ``arr_0, arr_1, ...`` in the model's input order. One session, single-threaded
(intra_op_num_threads=1, inter_op_num_threads=1, no spinning), default graph optimisations;
``session.run`` is called ``runs`` times and the last outputs are saved as ``arr_0, ...``.
Not imported on the host: ``compile.arm.run_onnxruntime_arm`` launches it under qemu.
"""
import sys


def main(model: str, inputs: str, outputs: str, runs: int) -> None:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    with np.load(inputs) as archive:
        arrays = [archive[f"arr_{i}"] for i in range(len(archive.files))]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(arrays):
        raise SystemExit(f"model has {len(names)} inputs, got {len(arrays)}")
    feeds = dict(zip(names, arrays))
    result = None
    for _ in range(runs):
        result = session.run(None, feeds)
    np.savez(outputs, *result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
