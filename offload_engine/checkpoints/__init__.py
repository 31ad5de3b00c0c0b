"""Reading model checkpoints: Hugging Face folders and GGUF files, and their tokenizers.

Both kinds present the same interface to the engine: a `ModelConfig`, and a checkpoint object
whose `get(key)` returns one tensor at a time in the Hugging Face layout (and, for GGUF,
`get_packed(key)` hands 4/8-bit blocks over without a float round trip).
"""
from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig
from ..errors import EngineError


def is_gguf(path: Path) -> bool:
    return Path(path).is_file() and Path(path).suffix.lower() == ".gguf"


def load_config(path: Path) -> ModelConfig:
    path = Path(path)
    if is_gguf(path):
        from .gguf import read_gguf_config
        from .hf import config_from_dict
        return config_from_dict(read_gguf_config(path), path.stem, str(path))
    if path.is_dir():
        from .hf import from_hf_config
        return from_hf_config(path)
    raise EngineError(f"--model {path}: expected a checkpoint folder (config.json + weights) or a .gguf file.")


def open_checkpoint(path: Path):
    """An object with `keys()` and `get(key) -> tensor | None` for a folder or a GGUF file."""
    path = Path(path)
    if is_gguf(path):
        from .gguf import GGUFCheckpoint
        return GGUFCheckpoint(path)
    from .hf import HFCheckpoint
    return HFCheckpoint(path)


def packed_formats(path: Path) -> dict[str, tuple[int, int]]:
    """(bits, group size) per key of the tensors a checkpoint stores in the engine's packed format
    (a GGUF file's Q4_0/Q4_1/Q8_0 blocks); {} for other checkpoints."""
    if not is_gguf(Path(path)):
        return {}
    from .gguf import GGUFCheckpoint
    return {key.removeprefix("model."): fmt for key, fmt in GGUFCheckpoint(path).packed_formats().items()}
