"""The compile cache: in-process reuse, reload from disk in a new process with no compile, safe
under concurrent processes, keyed by frozen configs."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fa3 import _compile

HERE = Path(__file__).parent
pytestmark = pytest.mark.compile


def _env(cache):
    return {**os.environ, "FA3_CACHE_DIR": str(cache), "PYTHONPATH": str(HERE)}


def test_memory_then_disk(tmp_path, monkeypatch):
    import _tiny_kernel as tk

    monkeypatch.setenv("FA3_CACHE_DIR", str(tmp_path))
    monkeypatch.syspath_prepend(str(HERE))
    _compile._MEM.clear()
    tk.BUILDS.clear()
    cfg = tk.TinyConfig(threads=64)
    f1 = tk.get(cfg)
    f2 = tk.get(cfg)
    assert f1 is f2 and tk.BUILDS == [cfg]
    files = list(_compile.cache_dir().glob("*.o"))
    assert len(files) == 1 and files[0].stat().st_size > 1000
    assert _compile.cache_info()["entries"] == 1

    # A new process loads the object file and never calls build().
    code = ("import _tiny_kernel as tk; f = tk.get(tk.TinyConfig(threads=64)); "
            "assert tk.BUILDS == [], tk.BUILDS; print(type(f).__name__)")
    r = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_corrupt_entry_is_rebuilt(tmp_path, monkeypatch):
    import _tiny_kernel as tk

    monkeypatch.setenv("FA3_CACHE_DIR", str(tmp_path))
    cfg = tk.TinyConfig(threads=32)
    name = f"fa3_tinyconfig_{_compile.config_digest(cfg)}.o"
    (_compile.cache_dir()).mkdir(parents=True, exist_ok=True)
    (_compile.cache_dir() / name).write_bytes(b"not an object file")
    _compile._MEM.clear()
    tk.BUILDS.clear()
    tk.get(cfg)
    assert tk.BUILDS == [cfg]
    assert (_compile.cache_dir() / name).stat().st_size > 1000


def test_concurrent_processes(tmp_path):
    code = "import _tiny_kernel as tk; tk.get(tk.TinyConfig(threads=256))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=_env(tmp_path),
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    d = next(tmp_path.iterdir())
    assert len(list(d.glob("*.o"))) == 1 and not list(d.glob("*.tmp"))


def test_key_changes_with_config_and_needs_frozen():
    import _tiny_kernel as tk

    assert _compile.config_digest(tk.TinyConfig(64)) != _compile.config_digest(tk.TinyConfig(128))
    assert _compile.config_digest(tk.TinyConfig(64)) != _compile.config_digest(tk.TinyConfig(64), "sm_80")

    @dataclasses.dataclass
    class Loose:
        x: int = 1

    with pytest.raises(TypeError, match="frozen"):
        _compile.config_digest(Loose())


def test_clear_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FA3_CACHE_DIR", str(tmp_path))
    d = _compile.cache_dir()
    d.mkdir(parents=True)
    (d / "a.o").write_bytes(b"x")
    assert _compile.clear_cache() == 1 and not list(d.iterdir())


def test_cli_cache_warm_compiles_every_variant(tmp_path, monkeypatch, capsys):
    from fa3 import cli
    from fa3.hopper import bwd_preprocess

    monkeypatch.setenv("FA3_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cli, "KERNEL_MODULES", (("fa3.hopper.bwd_preprocess", "sm_90a"),))
    assert cli.main(["cache", "warm", "--jobs", "2"]) == 0
    assert len(list(_compile.cache_dir().glob("*.o"))) == len(bwd_preprocess.variants())
