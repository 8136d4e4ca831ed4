"""CPU tests for the benchmark's pure helpers (benchmarks/bench_utils.py) and its no-GPU behaviour."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_utils as U  # noqa: E402


# --- FLOPs ------------------------------------------------------------------------------------
def test_fwd_flops_noncausal():
    # 4 * b * h * sq * sk * d
    assert U.attn_flops(2, 1024, 2048, 16, 128, False) == 4 * 2 * 16 * 1024 * 2048 * 128


def test_causal_square_is_half():
    full = U.attn_flops(8, 2048, 2048, 16, 128, False)
    assert U.attn_flops(8, 2048, 2048, 16, 128, True) == full / 2


def test_bwd_is_2p5_fwd():
    for causal in (False, True):
        f = U.attn_flops(1, 512, 512, 8, 64, causal, "fwd")
        assert U.attn_flops(1, 512, 512, 8, 64, causal, "bwd") == 2.5 * f


def brute_pairs(sq, sk):
    # FA's bottom-right causal mask: query i sees key j iff j <= i + sk - sq
    return sum(1 for i in range(sq) for j in range(sk) if j <= i + sk - sq)


@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 100), (3, 7), (64, 256), (256, 64), (100, 37)])
def test_causal_pairs_rectangular_exact(sq, sk):
    if sq == sk:
        assert U.causal_pairs(sq, sk) == sq * sk / 2
    else:
        assert U.causal_pairs(sq, sk) == brute_pairs(sq, sk)


def test_causal_decode_sees_all_keys():
    # one query at the end of 4096 keys attends to all of them
    assert U.attn_flops(1, 1, 4096, 1, 128, True) == 4 * 4096 * 128


def test_tflops_units():
    assert U.tflops(1e12, 1000.0) == pytest.approx(1.0)
    assert U.tflops(4e12, 2.0) == pytest.approx(2000.0)


def test_bad_mode_raises():
    with pytest.raises(ValueError):
        U.attn_flops(1, 1, 1, 1, 64, False, "both")


# --- shapes -----------------------------------------------------------------------------------
def test_parse_shape_with_causal():
    assert U.parse_shape("2,8192,8192,16,4,128,1") == [U.Shape(2, 8192, 8192, 16, 4, 128, True)]
    assert U.parse_shape(" 1, 512, 1024, 8, 8, 64, 0 ") == [U.Shape(1, 512, 1024, 8, 8, 64, False)]


def test_parse_shape_without_causal_expands():
    got = U.parse_shape("2,128,128,4,4,64", default_causal=(False, True))
    assert [s.causal for s in got] == [False, True]
    assert all(s.d == 64 and s.h_kv == 4 for s in got)


@pytest.mark.parametrize("bad", [
    "2,128,128,4,4",           # too few fields
    "2,128,128,4,4,64,1,9",    # too many
    "2,128,x,4,4,64",          # not an integer
    "2,128,128,4,3,64",        # h not a multiple of h_kv
    "0,128,128,4,4,64",        # non-positive
    "2,128,128,4,4,64,maybe",  # bad causal
    "",
])
def test_parse_shape_bad_raises(bad):
    with pytest.raises(ValueError):
        U.parse_shape(bad)


def test_parse_int_list_and_causal_opt():
    assert U.parse_int_list("512,1k,16k") == [512, 1024, 16384]
    with pytest.raises(ValueError):
        U.parse_int_list("12a")
    assert U.parse_causal_opt("both") == (False, True)
    assert U.parse_causal_opt("1") == (True,)
    with pytest.raises(ValueError):
        U.parse_causal_opt("2")


def test_paper_matrix():
    m = U.paper_matrix()
    assert len(m) == 3 * 6 * 2
    for s in m:
        assert s.b * s.sq == 16384 and s.h * s.d == 2048 and s.sq == s.sk and s.h == s.h_kv
    assert U.Shape(32, 512, 512, 16, 16, 128, True) in m


# --- JSON rows --------------------------------------------------------------------------------
REQUIRED = {"impl", "mode", "dtype", "b", "sq", "sk", "h", "h_kv", "d", "causal", "ms", "tflops"}


def test_row_has_exactly_required_keys():
    s = U.Shape(4, 4096, 4096, 16, 16, 128, True)
    row = U.make_row("fa3", "fwd", "bf16", s, 2.0)
    assert set(row) == REQUIRED == set(U.ROW_KEYS)
    assert row["tflops"] == pytest.approx(U.attn_flops(4, 4096, 4096, 16, 128, True) / 2e-3 / 1e12)
    assert row["causal"] is True and isinstance(row["ms"], float)
    json.dumps(row)  # serialisable


def test_row_extras_and_validation():
    s = U.Shape(1, 128, 128, 2, 2, 64, False)
    row = U.make_row("fa2", "bwd", "fp16", s, 1.0, rel_err=1e-3)
    assert set(row) == REQUIRED | {"rel_err"}
    with pytest.raises(ValueError):
        U.make_row("fa2", "bwd", "fp16", s, 1.0, tflops=3.0)  # must not overwrite the schema
    with pytest.raises(ValueError):
        U.make_row("fa2", "fwdbwd", "bf16", s, 1.0)
    with pytest.raises(ValueError):
        U.make_row("fa2", "fwd", "fp32", s, 1.0)


# --- ratios -----------------------------------------------------------------------------------
def test_geomean():
    assert U.geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert U.geomean([1.5]) == pytest.approx(1.5)
    assert math.isnan(U.geomean([]))
    with pytest.raises(ValueError):
        U.geomean([1.0, 0.0])


def test_geomean_ratios_and_table():
    a = U.Shape(1, 1024, 1024, 16, 16, 128, False)
    b = U.Shape(1, 2048, 2048, 16, 16, 128, True)
    rows = [U.make_row("fa3", "fwd", "bf16", a, 1.0), U.make_row("fa2", "fwd", "bf16", a, 2.0),
            U.make_row("fa3", "fwd", "bf16", b, 1.0), U.make_row("fa2", "fwd", "bf16", b, 8.0),
            U.make_row("cudnn", "fwd", "bf16", b, 1.0),
            U.make_row("fa3[x]", "fwd", "bf16", b, 0.1, ablation="x")]  # ablation rows stay out
    gm = U.geomean_ratios(rows)
    assert gm[("fwd", "fa2")] == pytest.approx(4.0)  # ratios 2 and 8
    assert gm[("fwd", "cudnn")] == pytest.approx(1.0)
    assert ("fwd", "fa3[x]") not in gm
    text = U.format_table(rows, ["fa3", "fa2", "cudnn"])
    assert "fa3/fa2 4.00x (2 shapes)" in text


def test_merge_rounds_takes_each_impls_median_round():
    a = U.Shape(1, 1024, 1024, 16, 16, 128, False)
    rows = [U.make_row("fa3", "fwd", "bf16", a, 1.0, rel_err=1e-3), U.make_row("fa2", "fwd", "bf16", a, 2.0),
            U.make_row("fa3", "fwd", "bf16", a, 3.0, rel_err=float("nan")),
            U.make_row("fa2", "fwd", "bf16", a, 2.5),
            U.make_row("fa3", "fwd", "bf16", a, 2.0, rel_err=2e-3), U.make_row("fa2", "fwd", "bf16", a, 1.5)]
    merged = U.merge_rounds(rows)
    assert [r["impl"] for r in merged] == ["fa3", "fa2"]
    fa3, fa2 = merged
    assert fa3["ms"] == 2.0 and fa3["rounds_ms"] == [1.0, 3.0, 2.0]
    assert fa3["tflops"] == pytest.approx(U.make_row("fa3", "fwd", "bf16", a, 2.0)["tflops"])
    assert math.isnan(fa3["rel_err"])  # a NaN in any round is not averaged away
    assert fa2["ms"] == 2.0 and "rel_err" not in fa2
    even = U.merge_rounds(rows[:4])
    assert even[0]["ms"] == 2.0 and even[1]["ms"] == 2.25


def _rounds(impl, shape, ms_list, mode="fwd"):
    """One merged row per impl: the median round's time, every round kept (as merge_rounds)."""
    return U.merge_rounds([U.make_row(impl, mode, "bf16", shape, ms) for ms in ms_list])[0]


def test_target_rows_take_each_rows_best_peer_and_flag_open_orders():
    a = U.Shape(2, 4096, 4096, 16, 16, 128, False)
    b = U.Shape(4, 1024, 1024, 16, 16, 64, True)
    c = U.Shape(1, 512, 512, 16, 16, 64, False)
    rows = [
        # a: fa3 2.0 ms, fa4 2.2 (best peer), cudnn 2.5; rounds well apart -> settled
        _rounds("fa3", a, [2.0, 2.01, 1.99]), _rounds("fa4", a, [2.2, 2.21, 2.19]),
        _rounds("cudnn", a, [2.5, 2.5, 2.5]),
        # b: cudnn faster than fa3, but their rounds overlap -> not settled by this run
        _rounds("fa3", b, [1.0, 1.1, 1.05]), _rounds("cudnn", b, [0.98, 1.02, 1.0]),
        _rounds("fa4", b, [1.3, 1.3, 1.3]),
        # c: no target peer ran (fa2 is not one) -> no target row
        _rounds("fa3", c, [1.0]), _rounds("fa2", c, [2.0]),
        U.make_row("fa3[x]", "fwd", "bf16", a, 0.1, ablation="x"),
    ]
    tr = {shape: (ratio, best, noise) for shape, ratio, best, noise in U.target_rows(rows)["fwd"]}
    assert set(tr) == {a, b}
    assert tr[a][1] == "fa4" and tr[a][0] == pytest.approx(2.2 / 2.0) and tr[a][2] is False
    assert tr[b][1] == "cudnn" and tr[b][0] == pytest.approx(1.0 / 1.05) and tr[b][2] is True
    # one round each: nothing says the order is open
    single = U.target_rows([U.make_row("fa3", "bwd", "bf16", a, 1.1),
                            U.make_row("fa4", "bwd", "bf16", a, 1.0)])
    assert single["bwd"][0][3] is False and single["bwd"][0][1] == pytest.approx(1 / 1.1)


def test_format_targets_counts_rows_below_and_reads_the_gemm_rate():
    a = U.Shape(1, 16384, 16384, 16, 16, 128, False)
    a_short = U.Shape(4, 4096, 4096, 16, 16, 128, False)
    b = U.Shape(4, 4096, 4096, 16, 16, 128, True)
    rows = [_rounds("fa3", a, [10.0, 10.0]), _rounds("fa4", a, [11.0, 11.0]),
            _rounds("fa3", a_short, [3.0, 3.0]), _rounds("fa4", a_short, [2.0, 2.0]),
            _rounds("fa3", b, [5.0, 5.2]), _rounds("cudnn", b, [4.9, 5.1])]
    text = U.format_targets(rows, gemm_tflops=1000.0)
    gm = U.geomean([1.1, 2 / 3, 5.0 / 5.1])
    assert f"geomean {gm:.3f}x over 3 rows; 2 rows below" in text
    assert "worst 0.667x vs fa4" in text and "1 within the round-to-round spread" in text
    below = [l for l in text.splitlines() if l.strip().startswith("below:")]
    assert len(below) == 2 and below[0].endswith("vs fa4") and below[1].endswith("(spread)")
    tf = U.make_row("fa3", "fwd", "bf16", a, 10.0)["tflops"]  # the longest non-causal d=128 row
    assert f"d=128 s=16384 {tf:.1f} / 1000.0 = {tf / 1000:.3f}" in text
    assert "d=256" not in text and "targets bwd" not in text


def test_summarize_script_reads_a_saved_run(tmp_path):
    a = U.Shape(1, 1024, 1024, 16, 16, 64, False)
    doc = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-08", "gemm_tflops": 700.0,
           "rows": [_rounds("fa3", a, [1.0, 1.0], "bwd"), _rounds("fa4", a, [0.9, 0.9], "bwd")]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(doc))
    out = subprocess.run([sys.executable, str(BENCH / "summarize.py"), str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "GEMM 700.0" in out.stdout and "fa3/fa4" in out.stdout
    assert ("targets bwd: fa3 / best of fa4,cudnn per row: geomean 0.900x over 1 rows; 1 rows below"
            in out.stdout)


def test_device_slug():
    assert U.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert U.device_slug("") == "unknown-device"


# --- the script itself ------------------------------------------------------------------------
def test_script_without_cuda_exits_nonzero():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    r = subprocess.run([sys.executable, str(BENCH / "bench_attn.py"), "--quick"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "CUDA" in r.stderr


def test_script_rejects_bad_shape():
    r = subprocess.run([sys.executable, str(BENCH / "bench_attn.py"), "--shape", "1,2,3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "shape" in r.stderr


def test_ablation_switches_are_config_fields():
    """bench_attn --ablation passes its switch sets as FwdConfig overrides: each must name a field
    and build a valid config (a renamed switch would otherwise fail only on the GPU)."""
    import dataclasses

    import bench_attn
    from fa3.hopper.flash_fwd import FwdConfig, default_config

    fields = {f.name for f in dataclasses.fields(FwdConfig)}
    assert bench_attn.ABLATIONS[0] == ("baseline", {})
    for name, overrides in bench_attn.ABLATIONS:
        assert set(overrides) <= fields, name
        for d in (64, 128):
            default_config(d, d, "bfloat16", True, **overrides)
