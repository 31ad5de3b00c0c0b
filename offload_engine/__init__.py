"""A FlexGen-style offloading inference engine: OPT models on GPU, pinned CPU memory and disk."""
from .config import OPT_CONFIGS, ModelConfig, resolve_model
from .engine import Engine, EngineOptions, GenerationResult
from .errors import EngineError
from .sampling import GenerationConfig

__all__ = ["Engine", "EngineOptions", "GenerationResult", "GenerationConfig", "ModelConfig", "OPT_CONFIGS",
           "EngineError", "resolve_model"]
