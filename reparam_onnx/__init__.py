"""reparam-onnx: fuse structurally re-parameterizable blocks in ONNX graphs into single Convs.

    from reparam_onnx import fuse, fuse_with_report
    deploy = fuse("model_train.onnx")                 # onnx.ModelProto
    result = fuse_with_report(model_proto)            # .model, .report (see report.py)
"""
from .api import FuseResult, fuse, fuse_with_report
from .errors import InputError, ReparamError, VerificationError
from .report import BlockReport, Report, Verification

__version__ = "0.1.0"

__all__ = ["fuse", "fuse_with_report", "FuseResult", "Report", "BlockReport", "Verification",
           "ReparamError", "InputError", "VerificationError", "__version__"]
