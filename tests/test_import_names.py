"""The project owns one import name, `offload_engine`: nothing it installs or keeps at the
repository root shadows another distribution's top-level package (Hugging Face's `kernels`, which
transformers imports when a model module loads, is the one that bit)."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_transformers_models_and_the_engine_import_together_from_the_repository_root():
    code = """
import transformers.models.opt.modeling_opt as opt, transformers.models.llama.modeling_llama as llama
from transformers import LlamaForCausalLM, OPTForCausalLM
from offload_engine import Engine
from offload_engine.policies import Policy
import offload_engine.kernels.attention
import importlib.util, pathlib, sys
root = pathlib.Path.cwd().resolve()
for name in ("kernels", "policies"):
    spec = importlib.util.find_spec(name)
    origin = pathlib.Path(spec.origin).resolve() if spec and spec.origin else None
    assert origin is None or (root / name) not in origin.parents, f"{name} resolves to the repository's: {origin}"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_distribution_installs_only_its_own_top_level_name():
    names = {top for top, dists in importlib.metadata.packages_distributions().items() if "offload-engine" in dists}
    assert names == {"offload_engine"}
    assert not (ROOT / "kernels").exists() and not (ROOT / "policies").exists()


def test_the_wheel_holds_only_offload_engine(tmp_path):
    """What `pip install .` would write into site-packages, built the way pip builds it."""
    import os
    import zipfile

    import pytest
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("pyproject.toml needs setuptools >= 77 to build")
    from setuptools import build_meta
    import shutil
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the repository
    shutil.copytree(ROOT / "offload_engine", source / "offload_engine", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    cwd = os.getcwd()
    try:
        os.chdir(source)
        wheel = build_meta.build_wheel(str(tmp_path))
    finally:
        os.chdir(cwd)
    files = zipfile.ZipFile(tmp_path / wheel).namelist()
    assert {f.split("/")[0] for f in files if ".dist-info/" not in f} == {"offload_engine"}
    assert "offload_engine/kernels/csrc/cpu_attention.cpp" in files
