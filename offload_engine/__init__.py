"""A FlexGen-style offloading inference engine: OPT and Llama models on GPU, pinned CPU memory and disk.

The public names are loaded on first use, so that importing a leaf module (the errors, the
config) does not pull in the whole engine, and `policies`, which the engine imports, can import
those leaves without a cycle.
"""
from importlib import import_module

_PUBLIC = {
    "Engine": "engine", "EngineOptions": "engine", "GenerationResult": "engine",
    "EngineError": "errors", "ModelConfig": "config", "GenerationConfig": "sampling",
    "MODEL_CONFIGS": "model_zoo", "OPT_CONFIGS": "model_zoo", "resolve_model": "model_zoo",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
