"""Compile: pattern-sparse and dense convs as generated TVM kernels on NCHW[L]c activations."""
