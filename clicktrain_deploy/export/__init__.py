"""Export: ONNX models with pattern metadata, checked against the weights and onnxruntime.

Entry points live in ``clicktrain_deploy.export.onnx_export`` (export, inspect) and
``clicktrain_deploy.export.check`` (onnxruntime against PyTorch); the metadata schema and
``load_onnx`` in ``clicktrain_deploy.contract``, which the compiler reads without torch.
"""
