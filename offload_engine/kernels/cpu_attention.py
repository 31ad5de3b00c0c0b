"""Decode attention on the CPU over a KV cache in host memory (`--cpu-cache-compute`).

With the cache in host memory, a decode step's attention only has to read every cached key and
value once: it is bound by host memory bandwidth. The engine's SDPA path reached ~25 GB/s in the
OPT-30B case on a host measured at ~64 GB/s (copy, read + write). Three implementations:
- C++ (kernels/csrc/cpu_attention.cpp): one OpenMP task per (sequence, KV head) reads its keys
  once for all the query heads that share them, keeps an fp32 (T, rep) score row in cache for a
  two-pass softmax, then reads its values once; fp16/bf16 -> fp32 conversion happens in
  registers (F16C / AVX-512). It is built on first use with the system C++ compiler
  (-O3 -march=native -fopenmp) and loaded through ctypes: no torch headers, so the build takes
  about a second, and ctypes releases the GIL during the call. Builds are cached under
  $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) in a file keyed by the source, the
  flags, the compiler and the CPU (a -march=native build must never run on another CPU).
  The same kernel reads a 4/8-bit packed cache (kernels/quant's records): each cached row is
  dequantized into an L1-resident fp32 row before use, 21x kernels/quant's PyTorch path at
  OPT-30B's shape on 2 cores (18.4 against 393 ms), 1.7x the fp16 kernel's time per element.
- PyTorch fallback, used when the build fails (one warning): SDPA in the cache dtype with the
  query heads of a KV head as its query rows (packed caches: kernels/quant's blockwise path).
- float64 reference, for tests.
A whole decode item (write the new token's k/v into the homes, then attend) is a `DecodeJob` of
kernels/cpu_decode_job.py, which offload_engine/kv/cpu_queue.py runs as a CUDA host function.
Measured on a shared 2-core Sapphire Rapids VM (noisy; the 16-core numbers come from
experiments/bench_cpu_attention.py), OPT-30B heads (H = 56, D = 128, T = 544, fp16):
C++ 8.4 GB/s vs SDPA 5.6 GB/s at B = 24 on 2 threads, next to a 9.3 GB/s copy (read + write);
per core with the cache in L2, C++ 17-19 GB/s vs SDPA 8.5 GB/s. A pure-PyTorch variant that
converts L2-sized blocks of (sequence, head) pairs to fp32 and runs two matmuls reached only
1.4-4.9 GB/s on one thread (SDPA: 7.6), since the fp32 copy is written and read again, so the
fallback is SDPA.

Layouts: q (B, Hq, D) on the CPU, already scaled; k, v (B, Hkv, T, D) views with a contiguous
head_dim. Head-major (each (b, h) has its T x D keys contiguous, e.g. `home[:, :, :t]` of a
(B, Hkv, T_max, D) buffer) is the layout the C++ path streams fastest; any (b, h, t) strides
work. Grouped-query attention: query head h reads KV head h // (Hq // Hkv). key_valid (B, T)
bool marks real tokens (False = left padding: the C++ kernel never reads those slots, so they may
hold anything; SDPA masks them but multiplies their values by 0, so there they must be finite).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_attention.cpp"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}   # enum Dtype in the .cpp
BACKEND_ENV = "OFFLOAD_ENGINE_CPU_ATTENTION"  # "torch": the fallback; "inline": C++, not queued (kv/cpu_queue.py)


# ----------------------------------------------------------------------------- validation

def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None) -> None:
    if q.dim() != 3 or q.dtype not in _FLOATS:
        raise ValueError(f"q must be a (B, Hq, D) float16/bfloat16/float32 tensor, got {q.dtype} {tuple(q.shape)}.")
    b, hq, d = q.shape
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 4 or x.shape[0] != b or x.shape[3] != d or x.shape[2] < 1:
            raise ValueError(f"{name} must be (B={b}, Hkv, T>=1, D={d}), got shape {tuple(x.shape)}; "
                             "pass the head-major cache view home[:, :, :t].")
        if x.dtype not in _FLOATS:
            raise ValueError(f"{name} must be float16/bfloat16/float32, got {x.dtype}.")
        if x.stride(-1) != 1 and d > 1:
            raise ValueError(f"{name} must have a contiguous head_dim (stride(-1) == 1), got strides "
                             f"{x.stride()}; permute only the leading dims of the cache.")
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"k {k.dtype} {tuple(k.shape)} and v {v.dtype} {tuple(v.shape)} must have the same "
                         "shape and dtype.")
    hkv = k.shape[1]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}; grouped-query attention needs that.")
    if any(x.device.type != "cpu" for x in (q, k, v)):
        raise ValueError(f"q, k and v must be CPU tensors, got {q.device}, {k.device}, {v.device}; "
                         "use kernels.attention.attention on the GPU.")
    if key_valid is not None:
        if key_valid.dtype != torch.bool or tuple(key_valid.shape) != (b, k.shape[2]) \
                or key_valid.device.type != "cpu":
            raise ValueError(f"key_valid must be a CPU bool ({b}, {k.shape[2]}) tensor, got {key_valid.dtype} "
                             f"{tuple(key_valid.shape)} on {key_valid.device}.")
        if not bool(key_valid.any(-1).all()):
            raise ValueError("key_valid leaves a sequence without any valid key; every row needs at least one.")


# ----------------------------------------------------------------------------- float64 reference

def cpu_decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 softmax(q K^T) V, dense, (B, Hq, D) float64. For tests."""
    _check(q, k, v, key_valid)
    rep = q.shape[1] // k.shape[1]
    kd, vd = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = torch.einsum("bhd,bhtd->bht", q.double(), kd)
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, :], float("-inf"))
        vd = vd.masked_fill(~key_valid[:, None, :, None], 0.0)     # padded slots may hold anything
    return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), vd)


# ----------------------------------------------------------------------------- PyTorch fallback

def cpu_decode_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA in the cache dtype (fp32 accumulation inside), the query heads of each KV head
    passed as that head's query rows: K and V are read once and never repeated for GQA.
    Padded slots are masked but still read, so they must hold finite values."""
    _check(q, k, v, key_valid)
    b, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d).to(k.dtype)
    mask = None if key_valid is None or bool(key_valid.all()) else key_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=1.0)
    return out.reshape(b, hq, d).to(q.dtype)


# ----------------------------------------------------------------------------- C++ path

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_fingerprint() -> str:
    """Model name and ISA flags: a -march=native build is only reused on the same kind of CPU."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return platform.machine() + "\n" + "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.machine() + platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch_extensions")
    return Path(root) / "offload_engine_cpu_attention"


def _compile(compiler: str, flags: list[str], target: Path) -> None:
    """Compile into a temporary file, then rename: concurrent processes never load a partial .so."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# Best first; -fopenmp alone still gives a multi-core build, the last one at least builds.
FLAG_SETS = (["-O3", "-std=c++17", "-march=native", "-fopenmp"], ["-O3", "-std=c++17", "-fopenmp"],
             ["-O3", "-std=c++17"])


def _build_and_load(flag_sets=FLAG_SETS) -> ctypes.CDLL:
    """The first of flag_sets that compiles and loads (tests also build other ISAs this way)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = SOURCE.read_bytes()
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                         _cpu_fingerprint().encode()])).hexdigest()[:20]
        target = _cache_dir() / f"cpu_attention_{key}.so"
        try:
            if not target.exists():
                _compile(compiler, flags, target)
            lib = ctypes.CDLL(str(target))
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            errors.append(str(e))
            continue
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.cpu_decode_attention.argtypes = [p] * 5 + [i64] * 12 + [ctypes.c_int, ctypes.c_int]
        lib.cpu_decode_attention.restype = ctypes.c_int
        lib.cpu_gather_attention.argtypes = [p] * 5 + [i64] * 13 + [ctypes.c_int, ctypes.c_int]
        lib.cpu_gather_attention.restype = ctypes.c_int
        lib.cpu_packed_decode_attention.argtypes = [p] * 5 + [i64] * 12 + [ctypes.c_int, i64, ctypes.c_int]
        lib.cpu_packed_decode_attention.restype = ctypes.c_int
        lib.cpu_slot_attention.argtypes = [p] * 6 + [i64] * 13 + [ctypes.c_int, ctypes.c_int]
        lib.cpu_slot_attention.restype = ctypes.c_int
        lib.cpu_decode_job.argtypes = [p]
        lib.cpu_decode_job.restype = None
        lib.cpu_h2o_job.argtypes = [p]
        lib.cpu_h2o_job.restype = None
        lib.cpu_h2o_scan_block.argtypes = [p] * 5 + [i64] * 7 + [ctypes.c_int, ctypes.c_float, ctypes.c_int]
        lib.cpu_h2o_scan_block.restype = ctypes.c_int
        lib.cpu_decode_attention_isa.restype = ctypes.c_char_p
        return lib
    raise RuntimeError("; ".join(errors))


def library() -> ctypes.CDLL | None:
    """The built kernel, or None (after one warning) when it cannot be built here."""
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = _build_and_load()
                except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
                    warnings.warn(f"kernels.cpu_attention: the C++ kernel could not be built ({e}); "
                                  "decode attention on the CPU uses the slower PyTorch path.", RuntimeWarning,
                                  stacklevel=3)
                _tried = True
    return _lib


def cpp_backend() -> str | None:
    """What the C++ kernel was built with ("avx512+openmp", "avx2+openmp", "scalar", ...), or None."""
    lib = library()
    return lib.cpu_decode_attention_isa().decode() if lib is not None else None


def cpu_decode_attention_cpp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             key_valid: torch.Tensor | None = None, out: torch.Tensor | None = None,
                             num_threads: int | None = None) -> torch.Tensor:
    """The C++ kernel (RuntimeError if it could not be built). `out`: an optional contiguous
    (B, Hq, D) float32 buffer it writes; num_threads defaults to torch.get_num_threads()."""
    _check(q, k, v, key_valid)
    lib = library()
    if lib is None:
        raise RuntimeError("the C++ CPU attention kernel is not available here; use cpu_decode_attention, "
                           "which falls back to PyTorch.")
    b, hq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    qf = q.float().contiguous()
    if out is None:
        out = torch.empty(b, hq, d, dtype=torch.float32)
    elif (out.dtype != torch.float32 or tuple(out.shape) != (b, hq, d) or not out.is_contiguous()
          or out.device.type != "cpu"):
        raise ValueError(f"out must be a contiguous CPU float32 ({b}, {hq}, {d}) tensor, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}.")
    valid_ptr, valid_stride = None, 0
    if key_valid is not None:
        kv = key_valid if key_valid.stride(-1) == 1 else key_valid.contiguous()
        kv = kv.view(torch.uint8)  # bool is one byte: same memory, readable from C
        valid_ptr, valid_stride = kv.data_ptr(), kv.stride(0)
    threads = num_threads or torch.get_num_threads()
    rc = lib.cpu_decode_attention(
        qf.data_ptr(), k.data_ptr(), v.data_ptr(), valid_ptr, out.data_ptr(), b, hq, hkv, t, d,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), valid_stride,
        DTYPE_CODE[k.dtype], threads)
    if rc:
        raise RuntimeError(f"cpu_decode_attention C++ kernel failed with code {rc}.")
    return out.to(q.dtype)


def cpu_packed_decode_attention_cpp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bits: int, group_size: int,
                                    key_valid: torch.Tensor | None = None, num_threads: int | None = None) -> torch.Tensor:
    """Decode attention over a 4/8-bit packed cache (kernels/quant's format): q (B, Hq, D) already
    scaled; k, v (B, Hkv, T, G, R) uint8 views, each token's (G, R) records contiguous, e.g. the
    head-major home[:, :, :t]. Out (B, Hq, D) in q.dtype, the float32 values kernels/quant's
    paths give. ValueError for shapes that do not match; RuntimeError if the C++ kernel could
    not be built."""
    lib = library()
    if lib is None:
        raise RuntimeError("the C++ CPU attention kernel is not available here.")
    if q.dim() != 3 or not q.is_floating_point() or bits not in (4, 8) or group_size < 2 or group_size % 2:
        raise ValueError(f"q must be a float (B, Hq, D) tensor and bits 4 or 8 with an even group size, got q "
                         f"{q.dtype} {tuple(q.shape)}, bits {bits}, group size {group_size}.")
    b, hq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    records = (-(-d // group_size), 4 + group_size * bits // 8)  # (G, R) of a token's D elements
    for name, x in (("k", k), ("v", v)):
        if x.dtype != torch.uint8 or x.dim() != 5 or x.stride(4) != 1 or x.stride(3) != x.shape[4]:
            raise ValueError(f"{name} must be a uint8 (B, Hkv, T, G, R) view with each token's records "
                             f"contiguous, got {x.dtype} {tuple(x.shape)} strides {x.stride()}.")
        if x.shape != (b, hkv, t, *records) or x.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU ({b}, {hkv}, {t}, {records[0]}, {records[1]}) packed cache for "
                             f"q {tuple(q.shape)} at {bits} bits in groups of {group_size}, got {tuple(x.shape)} "
                             f"on {x.device}.")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}; grouped-query attention needs that.")
    if key_valid is not None and (key_valid.dtype != torch.bool or tuple(key_valid.shape) != (b, t)):
        raise ValueError(f"key_valid must be a bool ({b}, {t}) tensor, got {key_valid.dtype} {tuple(key_valid.shape)}.")
    qf = q.float().contiguous()
    out = torch.empty(b, hq, d, dtype=torch.float32)
    valid_ptr, valid_stride = None, 0
    if key_valid is not None:
        kv = (key_valid if key_valid.stride(-1) == 1 else key_valid.contiguous()).view(torch.uint8)
        valid_ptr, valid_stride = kv.data_ptr(), kv.stride(0)
    rc = lib.cpu_packed_decode_attention(
        qf.data_ptr(), k.data_ptr(), v.data_ptr(), valid_ptr, out.data_ptr(), b, hq, hkv, t, d,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), valid_stride,
        bits, group_size, num_threads or torch.get_num_threads())
    if rc:
        raise RuntimeError(f"cpu_packed_decode_attention C++ kernel failed with code {rc}.")
    return out.to(q.dtype)


def cpu_gather_attention_cpp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor,
                             num_threads: int | None = None) -> torch.Tensor:
    """One query per (sequence, query head) over its own list of cached tokens (HiP's selection on
    a CPU cache): q (B, Hq, D) already scaled, k/v (B, Hkv, T, D), tokens (B, Hq, L) integer token
    indices, -1 for none (a row with none gives 0). Out (B, Hq, D) in q.dtype. RuntimeError if the
    C++ kernel could not be built; the caller falls back to its PyTorch path."""
    _check(q, k, v, None)
    lib = library()
    if lib is None:
        raise RuntimeError("the C++ CPU attention kernel is not available here.")
    b, hq, d = q.shape
    if tokens.dim() != 3 or tuple(tokens.shape[:2]) != (b, hq) or tokens.is_floating_point():
        raise ValueError(f"tokens must be an integer ({b}, {hq}, L) tensor, got {tokens.dtype} {tuple(tokens.shape)}.")
    if tokens.numel() and int(tokens.max()) >= k.shape[2]:
        raise ValueError(f"a token index {int(tokens.max())} is beyond the {k.shape[2]} cached tokens.")
    tok = tokens.to(torch.int32).contiguous()
    qf = q.float().contiguous()
    out = torch.empty(b, hq, d, dtype=torch.float32)
    rc = lib.cpu_gather_attention(
        qf.data_ptr(), k.data_ptr(), v.data_ptr(), tok.data_ptr(), out.data_ptr(), b, hq, k.shape[1], tok.shape[2], d,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), tok.stride(0), tok.stride(1),
        DTYPE_CODE[k.dtype], num_threads or torch.get_num_threads())
    if rc:
        raise RuntimeError(f"cpu_gather_attention C++ kernel failed with code {rc}.")
    return out.to(q.dtype)


def use_cpp() -> bool:
    """Whether the C++ kernels serve CPU attention (built, and not forced off by the env)."""
    return os.environ.get(BACKEND_ENV) != "torch" and library() is not None


# ----------------------------------------------------------------------------- entry point

def cpu_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q K^T) V for one new query per sequence: out (B, Hq, D) in q.dtype, fp32 inside.

    The C++ kernel when it builds here, else the PyTorch path; OFFLOAD_ENGINE_CPU_ATTENTION=torch
    forces the latter (for comparisons).
    """
    if use_cpp():
        return cpu_decode_attention_cpp(q, k, v, key_valid)
    return cpu_decode_attention_torch(q, k, v, key_valid)
