"""Every shipped Hopper forward variant compiles for sm_90a on the CPU, and the PTX is the FA3 kind:
wgmma, TMA (cp.async.bulk.tensor), setmaxnreg, mbarriers; no local-memory spills (when ptxas is
on PATH to report them; hd64 causal with three consumer warpgroups at 160 registers keeps one
4-byte value in local memory across a tile, outside the main loop, which is tolerated)."""
import glob
import re
import shutil
import subprocess

import pytest

from fa3.hopper.flash_fwd import FEATURES, build, variants

pytestmark = pytest.mark.compile

VARIANTS = list(variants())


def _id(cfg):
    flags = "".join(n[0] for n in ("overlap", "pingpong", "persistent") if getattr(cfg, n))
    feats = "".join(f"-{n}" for n in FEATURES if getattr(cfg, n))
    hd = f"hd{cfg.d}" + (f"v{cfg.dv}" if cfg.dv != cfg.d else "")
    return f"{hd}-{cfg.dtype}-{'causal' if cfg.causal else 'full'}-{cfg.tile_m}x{cfg.tile_n}-{flags or 'none'}{feats}"


@pytest.mark.parametrize("cfg", VARIANTS, ids=_id)
def test_compile_fwd(cfg, tmp_path):
    compiled = build(cfg, extra_options=f"--keep-ptx --dump-dir {tmp_path}")
    ptx_files = glob.glob(str(tmp_path / "*.ptx"))
    assert ptx_files, "no PTX kept"
    ptx = open(ptx_files[0]).read()
    for needle in ("wgmma.mma_async", "cp.async.bulk.tensor", "setmaxnreg", "mbarrier"):
        assert needle in ptx, f"{needle} missing from the PTX"
    assert "ld.local" not in ptx and "st.local" not in ptx
    assert compiled is not None
    ptxas = shutil.which("ptxas")
    if ptxas:
        rep = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx_files[0], "-o", str(tmp_path / "k.cubin")],
                             capture_output=True, text=True)
        assert rep.returncode == 0, rep.stderr[-2000:]
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", rep.stderr)
        assert spills and all(int(st) <= 8 and int(ld) <= 8 for st, ld in spills), rep.stderr[-2000:]
        assert "C7519" not in rep.stderr, "ptxas serialized wgmmas (register operand defined late)"
        assert "C7508" not in rep.stderr, "setmaxnreg ignored"
