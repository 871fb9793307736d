"""A tokenizer with one id per byte, for benchmark tests on the tiny random presets (vocabulary 512):
text in, byte ids out; ids a random model emits past 255 are dropped on decode."""

from __future__ import annotations


class ByteTokenizer:
    eos_token_id = 2

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")
