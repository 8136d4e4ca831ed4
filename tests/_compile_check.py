"""The check the CPU compile tests share: build a config with the PTX kept, look for the
instructions the kernel must contain, and (when ptxas is on PATH) assemble it for sm_90a and read
its report: spills within a limit, no serialized wgmma (C7519, C7512), no ignored setmaxnreg (C7508),
and a setmaxnreg split that fits the registers the CTA launches with."""
import glob
import re
import shutil
import subprocess


def compile_ptx(build, cfg, tmp_path):
    """(compiled, path of the kept PTX, its text)."""
    compiled = build(cfg, extra_options=f"--keep-ptx --dump-dir {tmp_path}")
    assert compiled is not None
    ptx_files = glob.glob(str(tmp_path / "*.ptx"))
    assert ptx_files, "no PTX kept"
    return compiled, ptx_files[0], open(ptx_files[0]).read()


def check_ptx(ptx_path, ptx, tmp_path, needles=(), spill_limit=0):
    """Every needle in the PTX, no local memory in it, and ptxas's checks (spills <= spill_limit
    bytes per kernel, stores and loads)."""
    for needle in needles:
        assert needle in ptx, f"{needle} missing from the PTX"
    assert "ld.local" not in ptx and "st.local" not in ptx
    check_register_pool(ptx)  # at most 64K / threads each: also where ptxas is absent (CI)
    ptxas = shutil.which("ptxas")
    if not ptxas:
        return
    rep = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx_path, "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr[-2000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", rep.stderr)
    assert spills and all(int(st) <= spill_limit and int(ld) <= spill_limit for st, ld in spills), \
        rep.stderr[-2000:]
    assert "C7519" not in rep.stderr, "ptxas serialized wgmmas (register operand defined late)"
    # each wgmma then waits for the last (hd128 backward at 80 query rows with stats_early:
    # 68 warpgroup waits per m block instead of 10, 0.86x)
    assert "C7512" not in rep.stderr, "ptxas serialized wgmmas (insufficient registers)"
    assert "C7508" not in rep.stderr, "setmaxnreg ignored"
    check_register_pool(ptx, rep.stderr)


def check_register_pool(ptx, ptxas_report=None):
    """With one setmaxnreg.dec (the producer warpgroup) and one .inc (every other warpgroup), their
    sum over the CTA's warpgroups must fit what it launched with: 65536 / threads registers a
    thread at most (a multiple of 8), or ptxas's count when its report is given. A consumer's
    .inc past that never returns (s12's 32 / 240 / 240 hung the backward on an H100)."""
    dec = set(re.findall(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+(\d+)", ptx))
    inc = set(re.findall(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+(\d+)", ptx))
    if not dec and not inc:
        return
    assert len(dec) == len(inc) == 1, (dec, inc)
    threads = re.findall(r"\.reqntid\s+(\d+)", ptx)
    assert len(threads) == 1, threads
    warpgroups = int(threads[0]) // 128
    launch = 65536 // int(threads[0]) // 8 * 8
    if ptxas_report is not None:
        used = re.findall(r"Used (\d+) registers", ptxas_report)
        assert len(used) == 1, used
        launch = min(launch, int(used[0]))
    need = int(dec.pop()) + (warpgroups - 1) * int(inc.pop())
    assert need <= launch * warpgroups, (need, launch, warpgroups)


def check_varlen_coverage(varlen_cfgs, dense_cfgs, seqused_alone):
    """A family's varlen build list: no repeats, every switch on in some build, ``seqused_alone``
    ("seqused_q" / "seqused_k") once without cu_seqlens, and no shipped dense build switched."""
    assert len(varlen_cfgs) == len(set(varlen_cfgs))
    for name in ("varlen", "seqused_q", "seqused_k", "local", "softcap", "causal"):
        assert any(getattr(c, name) for c in varlen_cfgs), name
    assert any(getattr(c, seqused_alone) and not c.varlen for c in varlen_cfgs)
    assert not any(c.varlen or c.seqused_q or c.seqused_k for c in dense_cfgs)
