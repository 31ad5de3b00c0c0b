"""The disk tier, offload folders and output files when something is wrong with them: a disk that
fills up mid-run, a dead run's folder, a path that is no writable folder, sizes at any scale, the
permissions of result files, and folders left behind."""
from __future__ import annotations

import errno
import itertools
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from offload_engine.cli import main
from offload_engine.engine import Engine, EngineOptions
from offload_engine.errors import format_size
from offload_engine.metrics import write_json_atomic
from offload_engine.policies.memory import Workload

from test_new_user import DISK, ROOT, TINY, cli_error, engine_files


@pytest.fixture
def disk_run(opt_checkpoints) -> list[str]:
    """`run` on a tiny checkpoint with weights, KV cache and activations all on disk (a second)."""
    folder = opt_checkpoints[True][1]
    return ["run", "--quiet", "--model", str(folder), "--percent", "0", "0", "0", "0", "0", "0",
            "--prompt-len", "4", "--gen-len", "2", "--gpu-batch-size", "2"]


def fake_free_space(monkeypatch, free) -> None:
    """shutil.disk_usage reports `free` bytes (a number, or a function of the path)."""
    real = shutil.disk_usage

    def usage(path):
        u = real(path)
        n = free(path) if callable(free) else free
        return type(u)(u.total, u.total - n, n)

    monkeypatch.setattr(shutil, "disk_usage", usage)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- a disk that fills up

def test_a_full_disk_is_one_line_and_leaves_the_offload_folder_empty(capsys, tmp_path, monkeypatch, disk_run):
    real, calls = os.posix_fallocate, itertools.count(1)

    def filling_up(fd, offset, length):  # the disk fills up after the third file
        if next(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", filling_up)
    offload, out = tmp_path / "o", tmp_path / "r.json"
    offload.mkdir()
    line = cli_error(capsys, *disk_run, "--offload-dir", str(offload), "--json", str(out))
    assert "ran out of space" in line and "pick another --offload-dir" in line and "Free space" in line
    assert re.search(r"needs [0-9.]+ (KiB|MiB) but only [0-9.]+ (KiB|MiB|GiB) are available", line), line
    assert list(offload.iterdir()) == [] and not out.exists()


@pytest.mark.parametrize("refusal", ["unsupported", "missing"])
def test_space_is_reserved_where_posix_fallocate_is_not_available(tmp_path, monkeypatch, refusal):
    from offload_engine.io.tiers import reserve_space

    if refusal == "missing":
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
    else:
        def unsupported(fd, offset, length):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        monkeypatch.setattr(os, "posix_fallocate", unsupported)
    path, nbytes = tmp_path / "t.bin", (9 << 20) + 5  # more than one chunk of zeros
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        reserve_space(fd, nbytes)
    finally:
        os.close(fd)
    st = os.stat(path)
    assert st.st_size == nbytes and st.st_blocks * 512 >= nbytes  # blocks allocated, not a sparse file


def _mount_tmpfs(folder: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_a_real_full_tmpfs_is_an_error_not_a_bus_error(tmp_path, opt_checkpoints):
    """The disk is taken after the plan was checked (the plan sees 1 GiB free in a 16 KiB tmpfs):
    creating the disk tier must end in one error line, not SIGBUS (or a traceback)."""
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "16k"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        code = ("import shutil, sys; real = shutil.disk_usage\n"
                "shutil.disk_usage = lambda p: real(p)._replace(free=1 << 30)\n"
                "from offload_engine.cli import main; sys.exit(main(sys.argv[1:]))")
        args = ["run", "--quiet", "--model", str(opt_checkpoints[True][1]), "--percent", "0", "0", "0", "0", "0",
                "0", "--prompt-len", "4", "--gen-len", "2", "--gpu-batch-size", "2", "--offload-dir", str(small)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                              timeout=120)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and "ran out of space" in errors[0], proc.stderr
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


# ----------------------------------------------------------------------------- a dead run's folder

def test_a_dead_runs_folder_is_reclaimed_before_the_space_check(tmp_path, monkeypatch):
    stale = tmp_path / f"engine-{dead_pid()}-x1"
    stale.mkdir()
    (stale / "w.bin").write_bytes(b"0123")
    fake_free_space(monkeypatch, lambda path: 0 if stale.exists() else 1 << 30)  # its files fill the disk
    with Engine(TINY, DISK, Workload(5, 3), EngineOptions(offload_dir=tmp_path, progress=False)):
        assert not stale.exists() and engine_files(tmp_path)


# ----------------------------------------------------------------------------- paths that are no writable folder

@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc")
def test_an_offload_dir_in_proc_says_it_is_not_writable(capsys, disk_run):
    line = cli_error(capsys, *disk_run, "--offload-dir", "/proc")
    assert "offload directory /proc is not writable" in line and "No such file" not in line


def test_a_file_in_the_way_is_named(capsys, tmp_path, disk_run):
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = cli_error(capsys, "run", "--quiet", "--json", str(afile / "x.json"), "--offload-dir", str(tmp_path / "o"))
    assert f"{afile} is a file, not a folder" in line and "does not exist" not in line and "--json" in line
    line = cli_error(capsys, *disk_run, "--offload-dir", str(afile / "sub"))
    assert f"{afile} is a file, not a folder" in line and "--offload-dir" in line
    assert afile.read_text() == "x"


# ----------------------------------------------------------------------------- sizes at any scale

@pytest.mark.parametrize("nbytes,text", [(3 << 30, "3.00 GiB"), (2 << 20, "2.0 MiB"), (1536, "1.5 KiB"),
                                         (100, "100 bytes"), (-(5 << 20), "-5.0 MiB")])
def test_sizes_read_at_any_scale(nbytes, text):
    assert format_size(nbytes) == text


def test_a_small_disk_is_refused_in_mib(capsys, tmp_path, monkeypatch):
    fake_free_space(monkeypatch, 2 << 20)  # a 2 MiB tmpfs; the KV cache on disk needs tens of MiB
    line = cli_error(capsys, "run", "--quiet", "--percent", "100", "0", "0", "0", "100", "0", "--prompt-len", "256",
                     "--offload-dir", str(tmp_path))
    assert "2.0 MiB are available" in line and re.search(r"[0-9.]+ MiB short", line) and "0.00 GiB" not in line


def test_the_profile_disk_check_reads_in_kib(capsys, tmp_path, monkeypatch):
    fake_free_space(monkeypatch, 300 << 10)
    line = cli_error(capsys, "profile", "--out", str(tmp_path / "hw.json"), "--device", "cpu", "--disk-mib", "1",
                     "--offload-dir", str(tmp_path))
    assert "has 300.0 KiB free" in line and "needs 2.0 MiB" in line


# ----------------------------------------------------------------------------- result files

@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_result_files_get_the_permissions_of_the_umask(tmp_path, mask, mode):
    previous = os.umask(mask)
    try:
        write_json_atomic(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_an_interrupted_result_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    write_json_atomic(tmp_path / "r.json", {"a": 1})

    def interrupted(data, f, **kw):
        f.write('{"a": ')
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(tmp_path / "r.json", {"a": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert (tmp_path / "r.json").read_text() == '{\n "a": 1\n}'


# ----------------------------------------------------------------------------- folders left behind

def test_a_disk_run_leaves_no_default_offload_dir_behind(capsys, tmp_path, monkeypatch, disk_run):
    monkeypatch.chdir(tmp_path)
    assert main(disk_run) == 0
    assert list(tmp_path.iterdir()) == []


def test_an_offload_dir_the_user_had_stays(capsys, tmp_path, monkeypatch, disk_run):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "offload_dir").mkdir()
    assert main([*disk_run, "--offload-dir", "offload_dir"]) == 0
    assert list(tmp_path.iterdir()) == [tmp_path / "offload_dir"] and not any((tmp_path / "offload_dir").iterdir())


def test_created_parents_go_too_and_a_refused_run_leaves_nothing(capsys, tmp_path, disk_run):
    nested = tmp_path / "a" / "b" / "c"
    assert main([*disk_run, "--offload-dir", str(nested)]) == 0
    assert list(tmp_path.iterdir()) == []
    cli_error(capsys, *disk_run, "--gpu-batch-size", "100000000", "--offload-dir", str(nested))
    assert list(tmp_path.iterdir()) == []


def test_profile_leaves_no_default_offload_dir_behind(capsys, tmp_path, monkeypatch):
    import offload_engine.hardware_probe as probe

    # Everything but the disk test (which writes into the folder) is replaced by a constant: fast.
    for name in ("matmul_flops", "gemv_read_rate", "host_read_rate", "cpu_packed_attention_rate"):
        monkeypatch.setattr(probe, name, lambda *a, **k: 1e9)
    monkeypatch.setattr(probe, "cpu_attention_rate", lambda *a, **k: (1e9, "torch"))
    monkeypatch.setattr(probe, "eager_layer_overhead",
                        lambda *a, **k: {"per_layer_s": 1e-4, "step_s": 1e-3, "layers": 4, "model_layers": 2})
    monkeypatch.chdir(tmp_path)
    previous = os.umask(0o022)
    try:
        code = main(["profile", "--out", "hw.json", "--quick", "--device", "cpu", "--disk-mib", "1"])
    finally:
        os.umask(previous)
    assert code == 0 and [p.name for p in tmp_path.iterdir()] == ["hw.json"]
    assert stat.S_IMODE((tmp_path / "hw.json").stat().st_mode) == 0o644
