"""Errors of the models package: each names the file, the tensor and what was expected."""


class CheckpointError(ValueError):
    """A Hugging Face checkpoint directory that cannot be loaded as it is: unsupported model type,
    a tensor with the wrong shape, a missing or unexpected tensor, a malformed config."""


class CheckpointFileNotFoundError(CheckpointError, FileNotFoundError):
    """A file the checkpoint needs (config.json, a *.safetensors shard) is not there."""
