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
