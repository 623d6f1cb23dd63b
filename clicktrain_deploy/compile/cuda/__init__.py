"""CUDA target: GPU schedules of the generated kernels, nvcc device build, GPU runtime helpers."""
