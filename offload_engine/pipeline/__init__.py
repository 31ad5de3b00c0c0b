"""Pipeline parallelism: the layers split into stages, one process (and GPU) per stage, each
stage offloading with its own placement policy."""
from .launch import launched_by_torchrun, run_pipeline
from .split import balanced_split, layer_parameters
from .stage import PipelineJob

__all__ = ["PipelineJob", "balanced_split", "launched_by_torchrun", "layer_parameters", "run_pipeline"]
