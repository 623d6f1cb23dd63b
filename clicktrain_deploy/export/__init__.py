"""Export: ONNX models with pattern metadata, checked against the weights and onnxruntime.

Entry points live in ``clicktrain_deploy.export.onnx_export`` (export, load) and
``clicktrain_deploy.export.check`` (onnxruntime against PyTorch).
"""
