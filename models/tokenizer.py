"""Tokenizers: a checkpoint's own `tokenizer.json` (the `tokenizers` library) or plain bytes.

Both expose `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, and `bos_id`,
`eos_id`, `pad_id` (None when the tokenizer has none). Nothing is fetched from a hub.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

from models.errors import CheckpointError, CheckpointFileNotFoundError


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then BOS=256, EOS=257, PAD=258 (vocab 259): the embedded demo's
    tokenizer, which needs no file. Tiny configs have vocab 512, so every id fits."""

    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258
    add_bos: bool = False

    @property
    def vocab_size(self) -> int:
        return 259

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if (add_special_tokens and self.add_bos) else ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json` (BPE of GPT-2 / Llama 3, ...) with its special tokens.

    Special tokens come from `tokenizer_config.json` / `special_tokens_map.json` beside it, else
    from `config.json`'s `bos_token_id` / `eos_token_id` / `pad_token_id`.
    """

    def __init__(self, directory: str | os.PathLike):
        from tokenizers import Tokenizer  # imported here: the byte fallback needs no library

        directory = Path(directory)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise CheckpointFileNotFoundError(
                f"{file}: not found; pass the directory holding tokenizer.json, or use "
                "load_tokenizer(None) for the byte-level tokenizer")
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as err:  # the tokenizers library raises a bare Exception
            raise CheckpointError(f"{file}: not a readable tokenizer.json ({err})") from err
        specials = _special_tokens(directory)
        config = _read_json(directory / "config.json")
        self.bos_id = self._id(specials.get("bos_token"), config.get("bos_token_id"))
        self.eos_id = self._id(specials.get("eos_token"), config.get("eos_token_id"))
        self.pad_id = self._id(specials.get("pad_token"), config.get("pad_token_id"))

    def _id(self, token: Any, fallback: Any) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and self._tok.token_to_id(token) is not None:
            return self._tok.token_to_id(token)
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        return fallback

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids; `add_special_tokens` runs the file's post-processor (e.g. Llama 3's BOS)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _read_json(file: Path) -> dict:
    """A JSON object file's contents ({} if there is no such file); errors name the file."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: not a valid JSON text file ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: holds a JSON {type(data).__name__}, not an object")
    return data


def _special_tokens(directory: Path) -> dict:
    found = _read_json(directory / "special_tokens_map.json")
    found.update({k: v for k, v in _read_json(directory / "tokenizer_config.json").items()
                  if k in ("bos_token", "eos_token", "pad_token") and v is not None})
    return found


def load_tokenizer(path: str | os.PathLike | None) -> HFTokenizer | ByteTokenizer:
    """The tokenizer of a checkpoint directory; `None` gives the byte-level `ByteTokenizer`.

    Example:
      >>> tok = load_tokenizer("/ckpt/Llama-3.2-1B")
      >>> tok.decode(tok.encode("hello"))
    """
    return ByteTokenizer() if path is None else HFTokenizer(path)
