"""API surface on the CPU: FA3 signatures, shapes from the fake (meta) kernels, validation errors,
dispatch decisions, and torch.compile tracing without graph breaks."""
import inspect

import pytest
import torch

import fa3
from fa3 import _dispatch

BF16 = torch.bfloat16


def meta(*shape, dtype=BF16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, fa3, fa3._compile; assert 'cutlass' not in sys.modules; assert not fa3._compile._MEM"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["flash_attn_func", "flash_attn_varlen_func",
                                  "flash_attn_qkvpacked_func", "flash_attn_with_kvcache",
                                  "flash_attn_combine"])
def test_signatures_match_fa3(name):
    # FA3's flash_attn_interface parameter order (hopper/flash_attn_interface.py).
    fa3_params = {
        "flash_attn_func": "q k v softmax_scale causal qv q_descale k_descale v_descale window_size "
                           "attention_chunk softcap num_splits pack_gqa deterministic sm_margin "
                           "return_attn_probs",
        "flash_attn_varlen_func": "q k v cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k "
                                  "seqused_q seqused_k softmax_scale causal qv q_descale k_descale "
                                  "v_descale window_size attention_chunk softcap num_splits pack_gqa "
                                  "deterministic sm_margin return_attn_probs",
        "flash_attn_qkvpacked_func": "qkv softmax_scale causal q_descale k_descale v_descale "
                                     "window_size attention_chunk softcap deterministic num_heads_q "
                                     "sm_margin return_attn_probs",
        "flash_attn_with_kvcache": "q k_cache v_cache k v qv rotary_cos rotary_sin cache_seqlens "
                                   "cache_batch_idx cache_leftpad page_table cu_seqlens_q "
                                   "cu_seqlens_k_new max_seqlen_q rotary_seqlens q_descale k_descale "
                                   "v_descale softmax_scale causal window_size attention_chunk softcap "
                                   "rotary_interleaved scheduler_metadata num_splits pack_gqa "
                                   "sm_margin return_softmax_lse",
        "flash_attn_combine": "out_partial lse_partial out out_dtype",
    }[name].split()
    params = [p.name for p in inspect.signature(getattr(fa3, name)).parameters.values()
              if p.kind != inspect.Parameter.KEYWORD_ONLY]
    assert params == fa3_params


@pytest.mark.parametrize("h,h_kv,d,dv", [(8, 8, 128, 128), (8, 2, 64, 64), (4, 1, 192, 128)])
def test_fake_shapes_dense(h, h_kv, d, dv):
    q, k, v = meta(3, 100, h, d), meta(3, 37, h_kv, d), meta(3, 37, h_kv, dv)
    out = fa3.flash_attn_func(q, k, v, causal=True)
    assert out.shape == (3, 100, h, dv) and out.dtype == BF16
    out, lse = fa3.flash_attn_func(q, k, v, return_attn_probs=True)
    assert lse.shape == (3, h, 100) and lse.dtype == torch.float32


def test_fake_shapes_varlen_packed_kvcache():
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    out, lse = fa3.flash_attn_varlen_func(meta(30, 8, 64), meta(30, 2, 64), meta(30, 2, 64), cu, cu,
                                          20, 20, return_attn_probs=True)
    assert out.shape == (30, 8, 64) and lse.shape == (8, 30)
    qkv = meta(2, 50, 3, 4, 128, dtype=torch.float16)
    assert fa3.flash_attn_qkvpacked_func(qkv).shape == (2, 50, 4, 128)
    qkv = meta(2, 50, 8 + 2 * 2, 128)
    assert fa3.flash_attn_qkvpacked_func(qkv, num_heads_q=8).shape == (2, 50, 8, 128)
    out = fa3.flash_attn_with_kvcache(meta(4, 1, 8, 128), meta(4, 512, 2, 128), meta(4, 512, 2, 128),
                                      cache_seqlens=torch.tensor([3, 512, 0, 7], dtype=torch.int32))
    assert out.shape == (4, 1, 8, 128)


def test_fp8_inputs_give_bf16_output_shape():
    e4 = torch.float8_e4m3fn
    q, k = meta(2, 64, 4, 128, dtype=e4), meta(2, 64, 2, 128, dtype=e4)
    ds = torch.empty(2, 2, device="meta")
    out = fa3.flash_attn_func(q, k, k, q_descale=ds, k_descale=ds, v_descale=ds)
    assert out.dtype == BF16 and out.shape == (2, 64, 4, 128)


def test_combine_matches_reference_on_cpu_math():
    out_p = torch.randn(3, 2, 5, 4, 16)
    lse_p = torch.randn(3, 2, 5, 4)
    o_meta, l_meta = fa3.flash_attn_combine(out_p.to("meta"), lse_p.to("meta"), out_dtype=BF16)
    assert o_meta.shape == (2, 5, 4, 16) and o_meta.dtype == BF16 and l_meta.shape == (2, 5, 4)


# ---- validation: each bad input gets a clear exception before any launch ----------------------

GOOD = dict(q=(2, 16, 4, 64), k=(2, 16, 2, 64), v=(2, 16, 2, 64))


def call(**over):
    args = {n: meta(*s) for n, s in GOOD.items()}
    kw = {}
    for n, x in over.items():
        (args if n in args else kw)[n] = x
    return fa3.flash_attn_func(args["q"], args["k"], args["v"], **kw)


@pytest.mark.parametrize("over,exc,match", [
    (dict(q=meta(2, 16, 4, 64, dtype=torch.float32)), TypeError, "q has dtype float32"),
    (dict(k=meta(2, 16, 2, 64, dtype=torch.float16)), ValueError, "must share dtype"),
    (dict(q=torch.empty(2, 16, 4, 64, dtype=BF16)), ValueError, "fa3 kernels need CUDA"),
    (dict(q=meta(2, 16, 4)), ValueError, "must have 4 dims"),
    (dict(q=meta(2, 16, 4, 128)), ValueError, "head dims differ"),
    (dict(q=meta(2, 16, 4, 512), k=meta(2, 16, 2, 512), v=meta(2, 16, 2, 512)), ValueError, "1..256"),
    (dict(q=meta(2, 16, 4, 60), k=meta(2, 16, 2, 60), v=meta(2, 16, 2, 60)), ValueError, "multiple of 8"),
    (dict(q=meta(2, 16, 5, 64)), ValueError, "multiple of kv heads"),
    (dict(v=meta(2, 17, 2, 64)), ValueError, "k and v must agree"),
    (dict(q=meta(3, 16, 4, 64)), ValueError, "batch sizes differ"),
    (dict(q=meta(2, 16, 4, 128)[..., ::2]), ValueError, "contiguous last dimension"),
    (dict(q=meta(2, 16, 4, 68)[..., :64]), ValueError, "16 bytes"),
    (dict(window_size=(-2, 0)), ValueError, "window_size values"),
    (dict(window_size=5), TypeError, "window_size must be a pair"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    (dict(q_descale=torch.empty(2, 2, device="meta")), ValueError, "only meaningful with float8"),
    (dict(learnable_sink=torch.empty(3, device="meta")), ValueError, "learnable_sink"),
    (dict(qv=meta(2, 16, 4, 64)), NotImplementedError, "qv"),
    (dict(attention_chunk=128), NotImplementedError, "attention_chunk"),
    (dict(backend="sm70"), ValueError, "backend must be one of"),
])
def test_validation_errors(over, exc, match):
    with pytest.raises(exc, match=match):
        call(**over)


def test_fp8_descale_shape_checked():
    e4 = torch.float8_e4m3fn
    q, k = meta(2, 64, 4, 128, dtype=e4), meta(2, 64, 2, 128, dtype=e4)
    with pytest.raises(ValueError, match=r"\(batch, num_heads_k\) = \(2, 2\)"):
        fa3.flash_attn_func(q, k, k, k_descale=torch.empty(2, 4, device="meta"))
    with pytest.raises(TypeError, match="float32"):
        fa3.flash_attn_func(q, k, k, k_descale=torch.empty(2, 2, device="meta", dtype=BF16))


@pytest.mark.parametrize("cu_q,cu_k,match", [
    (torch.tensor([0, 10, 30], dtype=torch.int64), None, "must be int32"),
    (torch.tensor([1, 10, 30], dtype=torch.int32), None, r"\[0\] must be 0"),
    (torch.tensor([0, 20, 10], dtype=torch.int32), None, "non-decreasing"),
    (torch.tensor([0, 10, 31], dtype=torch.int32), None, "exceeds the 30 packed rows"),
    (torch.tensor([0, 10, 30], dtype=torch.int32), torch.tensor([0, 30], dtype=torch.int32),
     "expected 3"),
    (torch.tensor([0], dtype=torch.int32), None, "batch\\+1 >= 2"),
])
def test_cu_seqlens_validation(cu_q, cu_k, match):
    cu_k = cu_q if cu_k is None else cu_k
    with pytest.raises((ValueError, TypeError), match=match):
        fa3.flash_attn_varlen_func(meta(30, 4, 64), meta(30, 4, 64), meta(30, 4, 64), cu_q, cu_k, 30, 30)


def test_varlen_max_seqlen_and_seqused_checked():
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    q = meta(30, 4, 64)
    with pytest.raises(ValueError, match="max_seqlen_q = 15 is smaller"):
        fa3.flash_attn_varlen_func(q, q, q, cu, cu, 15, 20)
    with pytest.raises(ValueError, match="seqused_k values"):
        fa3.flash_attn_varlen_func(q, q, q, cu, cu, 20, 20,
                                   seqused_k=torch.tensor([5, 21], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"seqused_q must have shape \(2,\)"):
        fa3.flash_attn_varlen_func(q, q, q, cu, cu, 20, 20,
                                   seqused_q=torch.tensor([5], dtype=torch.int32))


def test_kvcache_unbuilt_options_are_named():
    q, kc = meta(2, 1, 4, 64), meta(2, 100, 4, 64)
    with pytest.raises(NotImplementedError, match="paged KV"):
        fa3.flash_attn_with_kvcache(q, kc, kc, page_table=torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="in-place cache append"):
        fa3.flash_attn_with_kvcache(q, kc, kc, k=meta(2, 1, 4, 64), v=meta(2, 1, 4, 64))
    with pytest.raises(ValueError, match="cache_seqlens=101"):
        fa3.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=101)


def test_combine_validation():
    with pytest.raises(ValueError, match="lse_partial shape"):
        fa3.flash_attn_combine(torch.empty(2, 1, 3, 4, 8, device="meta"),
                               torch.empty(2, 1, 4, 3, device="meta"))


# ---- dispatch ---------------------------------------------------------------------------------

def _req(**over):
    base = dict(dtype=BF16, d=128, dv=128, causal=False, window=(-1, -1), softcap=0.0,
                varlen=False, has_sink=False, has_seqused=False, fp8=False)
    return _dispatch.FwdRequest(**{**base, **over})


@pytest.mark.parametrize("over,name", [
    (dict(softcap=30.0), "softcap"), (dict(varlen=True), "varlen"),
    (dict(window=(64, 0)), "sliding-window"), (dict(d=96, dv=96), "head dim 96"),
    (dict(has_sink=True), "learnable sink"), (dict(fp8=True, softcap=30.0), "fp8"),
])
def test_dispatch_names_missing_features(over, name):
    # sm90's bf16/fp16 forward has every feature here; sm80's has hd96, softcap, the window and
    # varlen
    missing = _dispatch.fwd_missing("sm90", _req(**over))
    if over.get("fp8"):
        assert missing is not None and name in missing
        with pytest.raises(NotImplementedError, match="not implemented yet on backend sm90"):
            _dispatch.require_fwd("sm90", _req(**over))
    else:
        assert missing is None, missing
    missing80 = _dispatch.fwd_missing("sm80", _req(**over))
    if not over.get("fp8") and (over.get("d") == 96 or "softcap" in over or "window" in over
                                or "varlen" in over):
        assert missing80 is None
    else:
        assert missing80 is not None and name.split()[0] in missing80
        with pytest.raises(NotImplementedError, match="not implemented yet on backend sm80"):
            _dispatch.require_fwd("sm80", _req(**over))


@pytest.mark.parametrize("over,ok90", [
    (dict(d=192, dv=192), True), (dict(d=192, dv=128), True), (dict(d=128, dv=64), False),
    (dict(d=96, dv=64), False), (dict(has_seqused=True), True),
    (dict(window=(-1, 64)), True), (dict(causal=True, window=(128, 0)), True),
])
def test_dispatch_sm90_head_dims_and_features(over, ok90):
    assert (_dispatch.fwd_missing("sm90", _req(**over)) is None) == ok90
    if over.get("d") != over.get("dv"):  # the sm80 forward takes equal head dims only
        assert "!= v" in _dispatch.fwd_missing("sm80", _req(**over))


def test_backend_env_and_meta(monkeypatch):
    assert _dispatch.resolve_backend(torch.device("meta")) == "sm90"
    monkeypatch.setenv("FA3_BACKEND", "sm80")
    assert _dispatch.resolve_backend(torch.device("meta")) == "sm80"
    monkeypatch.setenv("FA3_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.resolve_backend(torch.device("meta"))


# ---- torch.compile ----------------------------------------------------------------------------

def test_torch_compile_fullgraph_no_graph_break():
    import torch._dynamo as dynamo

    def f(q, k, v):
        out, lse = fa3.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        return out * 2, lse

    q, k, v = meta(2, 64, 4, 128), meta(2, 64, 2, 128), meta(2, 64, 2, 128)
    dynamo.reset()
    explain = dynamo.explain(f)(q, k, v)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    out, lse = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert out.shape == (2, 64, 4, 128) and lse.shape == (2, 4, 64)


def test_torch_compile_traces_backward_through_custom_ops():
    seen = []

    def backend(gm, example_inputs):
        seen.append(str(gm.graph))
        return gm

    from torch._dynamo.backends.common import aot_autograd

    def fw(gm, _):
        seen.append(("fw", str(gm.graph)))
        return gm

    def bw(gm, _):
        seen.append(("bw", str(gm.graph)))
        return gm

    q, k, v = (meta(1, 32, 2, 64).requires_grad_() for _ in range(3))
    f = torch.compile(lambda q, k, v: fa3.flash_attn_func(q, k, v).sum(), fullgraph=True,
                      backend=aot_autograd(fw_compiler=fw, bw_compiler=bw))
    loss = f(q, k, v)
    loss.backward()
    graphs = dict(x for x in seen if isinstance(x, tuple))
    assert "fa3.fwd" in graphs["fw"] and "fa3.bwd" in graphs["bw"]
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_custom_ops_pass_opcheck():
    # torch's own consistency checks of schema, fake impl and autograd registration (meta inputs).
    q, k, v = meta(1, 32, 2, 64), meta(1, 32, 2, 64), meta(1, 32, 2, 64)
    args = (q, k, v, None, None, None, None, 32, 32, 0.125, True, -1, 0, 0.0, None, None, None,
            None, False, "")
    torch.library.opcheck(torch.ops.fa3.fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_pack_gqa_hint_reaches_the_sm90_kernel(monkeypatch):
    # pack_gqa=False becomes the kernel's pack_gqa=1 override; None/True leave the heuristic alone
    from fa3 import _dispatch, ops

    seen = []
    monkeypatch.setattr(_dispatch, "run_fwd", lambda *a, **kw: seen.append(kw))
    q, k = meta(2, 64, 8, 128), meta(2, 64, 2, 128)
    for hint in (None, True, False):
        ops._fwd_impl(q, k, k, None, None, None, None, 64, 64, 0.1, False, -1, -1, 0.0, None, None,
                      None, None, False, "", hint)
    assert [kw.get("config_overrides") for kw in seen] == [None, None, {"pack_gqa": 1}]
    with pytest.raises(ValueError, match="pack_gqa"):
        fa3.flash_attn_func(q, k, k, pack_gqa="yes")
