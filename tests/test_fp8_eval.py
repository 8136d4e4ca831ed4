"""The FP8 accuracy study (CPU emulation): its numbers must show what the method claims, on small
shapes so CI stays fast."""
import json

import pytest
import torch

from fa3 import cli
from fa3 import fp8_eval as ev


@pytest.fixture(scope="module")
def result():
    return ev.evaluate(["outliers", "channel-outliers", "normal"], b=1, s=256, h=2, d=128,
                       seeds=(0,), progress=lambda s: None)


def mean(res, fam, var):
    xs = [r["rmse"] for r in res["rows"] if r["family"] == fam and r["variant"] == var]
    return sum(xs) / len(xs)


def test_rows_cover_every_variant_and_family(result):
    seen = {(r["family"], r["variant"]) for r in result["rows"]}
    assert len(seen) == 3 * len(ev.VARIANTS)
    assert all(r["rmse"] > 0 and r["rmse"] == r["rmse"] for r in result["rows"])


def test_precision_ordering(result):
    for fam in ("outliers", "normal"):
        assert mean(result, fam, "fp16") < mean(result, fam, "bf16") < mean(result, fam, "fp8-tensor")


def test_incoherent_processing_helps_with_outlier_channels(result):
    # Rotating Q and K spreads a few huge key channels over all d coordinates before quantization.
    assert mean(result, "channel-outliers", "fp8-incoherent") < 0.5 * mean(result, "channel-outliers", "fp8-tensor")
    assert mean(result, "outliers", "fp8-block+incoherent") < mean(result, "outliers", "fp8-tensor")


def test_table3_reproduced():
    """FA3 paper Table 3 (outliers, RMSE vs fp64): FP8 baseline 2.4e-2, fa3 FP8 9.1e-3, i.e. 0.38x.

    The paper's baseline is *standard* attention with FP8 matmuls and the softmax kept in fp16, so its
    normalized P (~1/seqlen per entry, e4m3 subnormals) is cast to e4m3 for P·V; fa3 rotates Q, K, uses
    block scales, and casts the unnormalized P (scaled by 2^8). The paper gives no seqlen; we use its
    benchmark shape at d=128 (hidden 2048 -> 16 heads), seqlen 1024, one draw fixed up front (seed 0;
    seeds 0-3 give 0.34-0.37x). Bounds on the two absolute RMSEs: the paper's values within a factor 1.5.
    """
    q, k, v = ev.make_inputs("outliers", 1, 1024, 16, 128, seed=0)
    scale = 128 ** -0.5
    ref = ev._attn64(q, k, v, scale)
    base = ev.rmse(ev.fp8_standard(q, k, v, scale), ref)
    fa3 = ev.rmse(ev.fp8_variant(q, k, v, scale, block=True, incoherent=True, seed=1), ref)
    no_rot = ev.rmse(ev.fp8_variant(q, k, v, scale, block=True, incoherent=False, seed=1), ref)
    assert 2.4e-2 / 1.5 < base < 2.4e-2 * 1.5 and 9.1e-3 / 1.5 < fa3 < 9.1e-3 * 1.5, (base, fa3)
    assert fa3 <= 0.4 * base, (fa3, base)  # the paper's headline (2.6x lower error)
    # Incoherent processing alone, same pipeline with and without the rotation: ~0.65x here. The
    # paper's "no incoherent processing" ablation equals its baseline (2.4e-2); ours does not (~1.2e-2),
    # the rest of the 2.6x comes from how P is cast (see fp8_eval's docstring).
    assert fa3 < 0.75 * no_rot, (fa3, no_rot)


def test_no_outliers_no_gain(result):
    # Without outliers the rotation is neutral: within 20% of per-tensor.
    r = mean(result, "normal", "fp8-incoherent") / mean(result, "normal", "fp8-tensor")
    assert 0.8 < r < 1.2


def test_inputs_follow_the_family():
    q, k, v = ev.make_inputs("outliers", 1, 4096, 4, 64, seed=3)
    frac = (q.abs() > 6).double().mean().item()  # Bernoulli(0.001) x N(0, 100) tail
    assert 2e-4 < frac < 2e-3
    with pytest.raises(ValueError, match="unknown input family"):
        ev.make_inputs("bogus", 1, 8, 1, 64, 0)


def test_cli_writes_json(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert cli.main(["fp8-eval", "--seqlen", "128", "--heads", "1", "--seeds", "1", "--family",
                     "normal", "--device", "cpu", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert {r["variant"] for r in data["rows"]} == {v for v, _ in ev.VARIANTS}
    assert "block+incoherent/tensor" in capsys.readouterr().out
