"""Tokenizers for checkpoints: a Hugging Face folder or the vocabulary inside a GGUF file.

Both are built by transformers (offline: local files only); a GGUF carries its vocabulary,
merges and special ids in its metadata, which transformers turns into a fast tokenizer. The
engine sees only the thin `Tokenizer` wrapper, so it does not depend on transformers' object.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import EngineError

_FOLDER_FILES = ("tokenizer.json", "tokenizer_config.json")


class Tokenizer:
    """encode/decode plus the bos/eos ids: all the engine needs from a tokenizer."""

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens (the caller adds bos if it wants one)."""
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face checkpoint folder or of a .gguf file."""
    path = Path(path)
    if path.is_dir():
        if not any((path / name).is_file() for name in _FOLDER_FILES):
            raise EngineError(f"no tokenizer in {path}: expected {' or '.join(_FOLDER_FILES)}.",
                              "Copy the tokenizer files next to the weights, or pass token ids directly.")
        folder, kwargs = path, {}
    elif path.is_file() and path.suffix == ".gguf":
        folder, kwargs = path.parent, {"gguf_file": path.name}
    else:
        raise EngineError(f"no tokenizer at {path}: expected a checkpoint folder or a .gguf file.", "Check the path.")
    try:
        from transformers import AutoTokenizer
        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except Exception as e:  # transformers fails in many ways on a bad file; one line for the user
        detail = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise EngineError(f"cannot build the tokenizer from {path.name}: {detail}",
                          "The tokenizer files may be truncated or corrupt; re-download them.") from None
    return Tokenizer(hf)
