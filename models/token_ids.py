"""Special token ids (bos / eos / pad) checked against the vocabulary.

transformers loads a checkpoint whose `config.json` names a special id outside the vocabulary
(configs copied from a tokenizer with added tokens, or a trimmed embedding), and so do we, with
a warning: the id is only metadata until something feeds or compares it. Generation does both
(it stops at eos and feeds pad back into the model), so `generate` refuses such ids.
"""
from __future__ import annotations

import warnings
from typing import Any

SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def outside_vocab(ids: Any, vocab_size: int) -> list[int]:
    """The ids of `ids` (None, one id, or a sequence) that do not index the vocabulary."""
    ids = ids if isinstance(ids, (tuple, list)) else (ids,)
    return [i for i in ids if i is not None and not 0 <= int(i) < vocab_size]


def warn_special_ids(config: Any) -> None:
    """Warn for each of the config's bos/eos/pad ids that lies outside its vocabulary.

    Example:
      >>> warn_special_ids(GPT2Config.tiny(bos_token_id=50256))   # UserWarning, no error
    """
    for name in SPECIAL_IDS:
        value = getattr(config, name)
        if outside_vocab(value, config.vocab_size):
            warnings.warn(f"{name}={value} is outside the vocabulary (vocab_size="
                          f"{config.vocab_size}); loading anyway, as transformers does, but "
                          "generation refuses it as an eos or pad id", stacklevel=4)


def check_generation_ids(vocab_size: int, **ids: Any) -> None:
    """Raise ValueError if an id generation uses (`eos_token_id=`, `pad_token_id=`) is outside
    the vocabulary: an eos that can never be sampled, a pad the model cannot embed."""
    for name, value in ids.items():
        bad = outside_vocab(value, vocab_size)
        if bad:
            raise ValueError(f"{name}={value} is outside the model's vocabulary (vocab_size="
                             f"{vocab_size}): generation cannot use it; pass {name}= an id "
                             f"below {vocab_size} (the tokenizer's own)")
