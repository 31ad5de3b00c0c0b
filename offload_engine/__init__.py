"""A FlexGen-style offloading inference engine: OPT and Llama models on GPU, pinned CPU memory and disk."""
from .config import ModelConfig
from .engine import Engine, EngineOptions, GenerationResult
from .errors import EngineError
from .model_zoo import MODEL_CONFIGS, OPT_CONFIGS, resolve_model
from .sampling import GenerationConfig

__all__ = ["Engine", "EngineOptions", "GenerationResult", "GenerationConfig", "ModelConfig", "MODEL_CONFIGS",
           "OPT_CONFIGS", "EngineError", "resolve_model"]
