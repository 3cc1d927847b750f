"""The one exception type of lora_jax: every message says what is wrong and how to fix it."""


class LoraError(ValueError):
    """Bad LoRA input: a config, a target that matches nothing, a shape that does not fit."""
