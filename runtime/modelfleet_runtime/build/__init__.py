"""Engine builds (`modelfleet build`): options, cache key and failure classes, importable without ONNX.

The operator image imports `modelfleet_runtime.build`, `.options` and `.key` to compute the same cache
key as the build Job; it has no onnx, onnxruntime, numpy or tensorrt, so this module and those two stay
on pydantic and the standard library. The heavy steps live in `fetch`, `validate`, `ort`, `trt`,
`accuracy`, `store` and `cli`, imported only by the build itself.

Exit codes of `modelfleet build` (the `reason` is also written to the termination message):

| code | reason               | meaning                                                          |
|------|----------------------|------------------------------------------------------------------|
| 0    | -                    | built and published, or a valid artifact was already there       |
| 1    | InternalError        | an unexpected bug; the message holds the exception               |
| 2    | InvalidOptions       | bad flags (argparse usage errors also exit 2)                    |
| 3    | FetchFailed          | the model or calibration data could not be read or downloaded    |
| 4    | DigestMismatch       | sha256 missing for https, or the bytes do not match the sha256   |
| 5    | InvalidModel         | not a valid ONNX model, opset out of range, no batch axis, ...   |
| 6    | Unsupported          | backend/precision/architecture combination this build cannot do  |
| 7    | BuildFailed          | the backend (TensorRT parser/builder, ORT) failed to build       |
| 8    | AccuracyGateFailed   | the built artifact is outside the accuracy gate; nothing published |
| 9    | PublishFailed        | the store could not be written                                   |
"""

from __future__ import annotations


class BuildError(Exception):
    """A build failure with the reason and exit code the operator sees."""

    reason = "InternalError"
    exit_code = 1


class InvalidOptions(BuildError):
    reason = "InvalidOptions"
    exit_code = 2


class FetchFailed(BuildError):
    reason = "FetchFailed"
    exit_code = 3


class DigestMismatch(BuildError):
    reason = "DigestMismatch"
    exit_code = 4


class InvalidModel(BuildError):
    reason = "InvalidModel"
    exit_code = 5


class Unsupported(BuildError):
    reason = "Unsupported"
    exit_code = 6


class BuildFailed(BuildError):
    reason = "BuildFailed"
    exit_code = 7


class AccuracyGateFailed(BuildError):
    reason = "AccuracyGateFailed"
    exit_code = 8


class PublishFailed(BuildError):
    reason = "PublishFailed"
    exit_code = 9


EXIT_CODES: dict[str, int] = {
    cls.reason: cls.exit_code
    for cls in (
        BuildError,
        InvalidOptions,
        FetchFailed,
        DigestMismatch,
        InvalidModel,
        Unsupported,
        BuildFailed,
        AccuracyGateFailed,
        PublishFailed,
    )
}

__all__ = [
    "EXIT_CODES",
    "AccuracyGateFailed",
    "BuildError",
    "BuildFailed",
    "DigestMismatch",
    "FetchFailed",
    "InvalidModel",
    "InvalidOptions",
    "PublishFailed",
    "Unsupported",
]
