"""Tokenizers: a checkpoint's ``tokenizer.json`` through the ``tokenizers`` library, or bytes as a fallback.

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``eos_token_ids`` and a streaming
``TextStreamer`` that turns tokens into text pieces without splitting a UTF-8 character.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class HFTokenizer:
    def __init__(self, directory: str | os.PathLike):
        from tokenizers import Tokenizer

        directory = Path(directory)
        self._tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.eos_token_ids: tuple[int, ...] = ()
        cfg_path = directory / "tokenizer_config.json"
        if cfg_path.exists():
            eos = json.loads(cfg_path.read_text()).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and self._tok.token_to_id(eos) is not None:
                self.eos_token_ids = (self._tok.token_to_id(eos),)
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (for models with random weights and no tokenizer.json)."""

    eos_token_ids: tuple[int, ...] = ()
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def load_tokenizer(model_dir: str | os.PathLike | None):
    """The directory's tokenizer.json when present, else bytes."""
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").exists():
        return HFTokenizer(model_dir)
    return ByteTokenizer()


class TextStreamer:
    """Accumulates token ids and returns only the newly completed text each time."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
