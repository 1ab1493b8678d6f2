"""Text <-> token ids for the runtime, from the artifact's tokenizer.json (the `tokenizers` library
alone: fast to load, no model code)."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from ..artifact import ArtifactError


class TextTokenizer:
    """encode(text) applies the tokenizer's post-processor (e.g. BOS) as HF's fast tokenizer does."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(model_dir: Path) -> TextTokenizer:
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ArtifactError(f"{path}: the artifact has no tokenizer.json; pass token ids (prompt lists of ints) "
                            "or compile from a checkpoint with a fast tokenizer")
    return TextTokenizer(Tokenizer.from_file(str(path)))


class Detokenizer:
    """Incremental text of one request's generated tokens. A trailing U+FFFD (an unfinished UTF-8
    sequence of byte tokens) is held back until the next token completes it."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.checked = 0  # how much of `text` stop strings have been searched in

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        full = self.tokenizer.decode(self.ids)
        if full.endswith("\ufffd"):
            return ""
        delta = full[len(self.text):] if full.startswith(self.text) else full
        self.text = full
        return delta

    def truncate(self, length: int) -> None:
        self.text = self.text[:length]
