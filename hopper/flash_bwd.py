"""Torch-facing Hopper attention backward: configs, compile on fake tensors, launch.

Three kernels: bwd_preprocess (D = rowsum(dO*O), LSE in log2), the main kernel (bwd_kernel.py:
dK, dV, and dQ added in fp32 to dQaccum), the postprocess (dQaccum -> dQ * scale). Sizes and
strides are symbolic: one compile per (head dim, dtype, causal, deterministic, GQA) serves every
batch, seqlen and head count. Each CTA of the main kernel (KV block n, head, batch) walks the
query blocks m that see block n, masked ones first. BwdConfig.stagger (off by default; refused
when deterministic) starts the unmasked ones at a block that depends on n, so concurrent CTAs add
to different dQaccum tiles: on the H100 it measured neutral (non-causal hd64/128/256, 1k-16k: within
-2.8%..+1.5%), unlike the sm80 kernel's fp32 atomics, where it stays on.

GQA/MQA: one CTA per query head adds its fp32 dK/dV into its KV head's accumulator
(BwdConfig.dkv_red, the dense default), or writes per-query-head fp32 partials summed here by one
torch reduction (deterministic, and the features); with enough KV-head CTAs one CTA per KV head
walks its group instead (group_loop_wins). MHA writes dK/dV in the input dtype directly.

Varlen (cu_seqlens, packed rows) and seqused are compile-time switches: one CTA per (KV block of
the longest sequence, head, sequence), exiting past its sequence's keys; LSE2 / D / dQaccum rows
are padded per sequence to whole tiles (bwd_kernel.py). The learnable sink's gradient is a torch
reduction over the preprocess's LSE2 and D (sink_grad).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator

from fa3 import _compile

DTYPES = ("bfloat16", "float16")
# Optional features (by API name) this backward implements, and those whose gradients have passed
# the GPU tests; an implemented but unverified one is refused unless allow_unverified=True (the GPU
# tests pass it), so no user gets an untested gradient.
# Head dims 96 and 192 count as features "hd96" / "hd192" here until GPU-verified.
# "hd192_128": q/k head dim 192 with v 128 (DeepSeek's), the unswapped layout with dV its own
# GEMM; verified on an H200 (2026-12-06, 26 passed): tests/test_hopper_bwd_features_gpu.py
# -k "192-128 or 192_128 or dense_seqused".
IMPLEMENTED_FEATURES = frozenset({"window", "softcap", "sink", "varlen", "seqused", "hd96", "hd192",
                                  "hd192_128"})
# All passed on an H100 (2026-11-22): tests/test_hopper_bwd_gpu.py -k "window or softcap or spt"
# and tests/test_hopper_bwd_features_gpu.py.
VERIFIED_FEATURES = IMPLEMENTED_FEATURES
HEAD_DIMS = (64, 96, 128, 192, 256)
SPLIT_HEAD_DIMS = ((192, 128),)  # (q/k, v) pairs with dv != d
SMEM_LIMIT = 227 * 1024


@dataclasses.dataclass(frozen=True)
class BwdConfig:
    d: int
    dv: int
    dtype: str  # "bfloat16" | "float16"
    causal: bool
    deterministic: bool
    gqa: bool  # dK/dV are fp32: per KV head (dkv_red) or per query head (GQA without group_loop)
    # query rows a block (64 or 128; 80 at hd128, swapped: FA3's non-causal tile, an A/B switch
    # here, with dQ computed transposed, dQ^T = K^T dS^T, and dS stored keys-contiguous; the
    # H100 measured 0.86-0.95x of 64 with every wgmma serialized, C7512, before default_config
    # turned stats_early / dv_early off for it; unserialized, H200 non-causal 2k-16k measured
    # 0.98-1.02x of 64 over 3 and 5 rounds (s9), so 64 stays the default; H100 s15, 5 rounds,
    # 1k / 2k / 4k / 16k: 0.97 / 1.01 / 0.99 / 0.98x, with the persistent grid 0.98 / 1.00 / 1.00 /
    # 1.04x (persistent at 64 rows: 1.01 / 1.01 / 1.00 / 1.03x; s14 measured it at 16k 1.00x))
    tile_m: int
    tile_n: int
    stages: int  # Q / dO (+ LSE / D) ring depth
    swap: bool  # S^T layout with dK/dV A operands in registers (see bwd_kernel.py)
    # deterministic causal: KV blocks launch and add to dQ from the last one down (bwd_kernel.py);
    # default_config turns it on there (not varlen: it reverses the grid, not each sequence).
    spt: bool = False
    # Each KV block walks its unmasked query blocks rotated by n_block (mask.walk_block), so the
    # CTAs of a head that run together reduce-add into different dQaccum tiles instead of all
    # into tile 0, 1, ... at once. Off by default (measured neutral, see the module docstring);
    # refused when deterministic (its semaphores order the adds of each m by n).
    stagger: bool = False
    # Load each m block's LSE / D values into registers right after the S / dP GEMMs are issued,
    # not where the exp2 / dS loops use them (ncu, hd128 1k: short-scoreboard stalls 1.6 vs
    # FA4's 0.9 per issued instruction). Costs live registers: default_config turns it on where
    # it measured a gain (see there). Causal hd128 stays off though ncu puts 5% of its stall
    # samples on the first exp2 FFMA's LSE wait: H100, 5 rounds, 1k/4k/16k 1.00/1.00/0.98x, and
    # LSE alone early (s13, dropped) 1.00/0.98/0.99x: the other warpgroup's GEMMs cover it.
    stats_early: bool = False
    # dK / dV stored by TMA from smem (Q's / dO's buffers) instead of from registers; MHA dense
    # only (GQA's fp32 partials do not fit those buffers; a TMA store cannot stop at a varlen
    # sequence's or seqused_k's end)
    dkv_tma: bool = False
    # dQ added to dQaccum from the consumers' registers (red.global.add.v4.f32) instead of smem
    # staging + the dQ warp's bulk reduce-add: frees tile_m * d * 4 bytes of smem, which at hd256
    # buys a second Q / dO stage (one stage exposes each block's 64 KB Q / dO load). Unswapped
    # layout only (hd192/256); refused when deterministic (adds in any order). default_config
    # turns it on at hd256 (measured: see there); neutral at hd192 (H100: -1.5..+0.8%), so off.
    dq_red: bool = False
    # Swapped layout: issue dV += P^T dO right after P is packed, before the dS step, so the tensor
    # pipe runs it while the warpgroup computes dS (FA4's sm90 backward issues it after dS: the pipe
    # idles there when both warpgroups reach dS together). default_config: hd128 MHA non-causal.
    dv_early: bool = False
    # Swapped layout: issue dK += dS^T Q (dS in registers) before the P / dS barrier instead of
    # after dQ, so the warpgroups' wait there overlaps GEMM work, and Q is released before dQ's
    # store; dQ, now the last GEMM, is no longer hidden under dK. Off: H100 A/B 0.94-1.01x.
    dk_early: bool = False
    # Swapped layout: the wgmma smem descriptors built once before the m loop (wgmma_utils.DescFrag,
    # as FwdConfig.desc_hoist) instead of re-derived from the smem pointers in every m block
    # (hd128: 118 of the loop's 389 SASS instructions are uniform-datapath). Off: H100 A/B mixed.
    desc_hoist: bool = False
    # Sliding window: blocks that see the whole KV tile inside the window run without mask code
    # (mask.window_nomask_range_bwd); off, every block of a window is masked. default_config
    # turns it on for a window without softcap (measured: see there).
    window_split: bool = False
    # causal: KV blocks launch heaviest first (block 0 sees every query block), all heads of an
    # L2-sized group of lpt_mb before the next lighter block (tile_scheduler.decode_kv_block),
    # instead of blocks 0..N-1 head after head. A host model of in-order dispatch put the grid
    # order's tail at 3-7% of causal 1k-8k, but the H100 disagrees (vs off, run 1 / run 2 of 2 / 3
    # rounds): hd64 1k -11/-10% (run 2, 8 MB groups -4%, 16 MB -6%), 4k -0.7/-1.6%; hd128 1k
    # -2/-2%, 2k 0/0, 4k +2.5/+1.5%, 16k +6/-0.3%; hd256 1k -1%, 4k +2.5/+0.3%. So off (A/B only).
    lpt: bool = False
    lpt_mb: int = 32  # megabytes of Q / dO / dQaccum one lpt group of heads may hold in L2
    # Programmatic dependent launch: the main kernel and the postprocess launch while the kernel
    # before each drains (each waits on griddepcontrol before touching that kernel's output; the
    # main kernel's producer loads K / V first). GPU-tested; measured neutral, so off: H100, 17
    # shape pairs over two runs of 3 and 5 rounds, hd64/128/256 1k-16k, causal or not: geomean
    # 1.00x, each within the run's +-4% round-to-round spread.
    pdl: bool = False
    # Persistent grid (one CTA per SM walking KV tiles, bwd_kernel.persistent_roles) instead of
    # one CTA per tile: the next tile's K / V, Q and dO load while a tile stores dK / dV (staged
    # in the dS / dQ buffers), and no CTA launches between tiles. Profiled on the H100 (s14,
    # hd128 non-causal, sk 1k, sq 256-4k): the one-CTA-per-tile main kernel costs a fixed ~4 us
    # per CTA besides ~2 us per query block, 11% of it at 1k. Swapped layouts (hd <= 128), not
    # deterministic / varlen / seqused / window. Non-causal tiles (equal cost) are split
    # statically; causal ones are handed out by a global counter as CTAs free up. default_config
    # turns it on where it measured a gain (see there); causal, H100, 5 rounds vs one CTA per
    # tile: hd64 1k / 4k / 16k +2.9 / -1.7 / -0.7%, hd128 -0.9 / +0.2 / +0.5%, so off there.
    persistent: bool = False
    # GQA: one CTA per (KV block, KV head, batch) walks the query blocks of every query head of
    # its group in turn, so dK / dV sum over the group in registers and are stored once in the
    # input dtype (dkv_tma applies), instead of one CTA per query head writing fp32 partials
    # that the caller sums (gqa). g times fewer, g times longer CTAs.
    group_loop: bool = False
    # GQA without group_loop: each query head's CTA adds its fp32 dK / dV into its KV head's
    # accumulator (red.global.add.v2.f32; zeroed before, converted after) instead of writing
    # per-query-head partials that a sum reads back (no h-sized fp32 buffers, no sum pass).
    # Adds land in any order, so not with deterministic; not with the persistent grid.
    # default_config's choice for dense non-deterministic GQA (see there)
    dkv_red: bool = False
    # Unswapped layout: dK^T = Q^T dS and dV^T = dO^T P (head dim in M, each warpgroup's
    # tile_n / 2 keys in N; FA3's dKV_swapAB) instead of dK = dS^T Q split by head-dim columns.
    # Lets hd192 take 96-key tiles (48 keys a warpgroup are no whole 64-row M block): 1.5x the
    # keys per loaded Q / dO block and per dQ add. default_config: hd192 not deterministic
    dkv_swap: bool = False
    local: bool = False  # sliding window given at run time (causal is then False)
    softcap: bool = False  # S <- cap * tanh(S * scale / cap), cap given at run time
    varlen: bool = False  # cu_seqlens_q/k: packed sequences, padded per-sequence dQ/LSE rows
    seqused_q: bool = False  # valid rows per sequence (rows past it: zero gradients)
    seqused_k: bool = False  # valid keys per sequence


@dataclasses.dataclass(frozen=True)
class PostConfig:
    """The postprocess only needs the dQ tile and its tiled MMA (tiled_mmas reads these)."""
    d: int
    dv: int
    dtype: str
    tile_m: int
    tile_n: int
    swap: bool
    varlen: bool = False
    pdl: bool = False  # launched dependent on the main kernel (BwdConfig.pdl)


def smem_bytes(tile_m, tile_n, d, stages, swap, elem=2, dq_red=False, dv=None) -> int:
    dv = d if dv is None else dv  # Q, K: d columns; dO, V: dv
    pds = tile_m * tile_n * elem * (stages if swap else 2)  # dS ring (swap) or P + dS
    dq = 0 if dq_red else tile_m * d * 4  # fp32 dQ staging
    return (stages * tile_m * (d + dv) * elem + tile_n * (d + dv) * elem + pds + dq
            + 2 * stages * tile_m * 4 + 1024)


def group_loop_wins(d, dv, causal, deterministic, seqlen_k, kv_heads, sms) -> bool:
    """Whether GQA's backward walks each KV head's group in one CTA (BwdConfig.group_loop) rather
    than writing fp32 dK / dV partials per query head: with enough KV-head CTAs (128-key blocks x
    KV heads x batch) to fill the SMs, more than half of them, and for causal (uneven tiles, g
    times longer CTAs: a longer tail) at least 3 waves' worth. H100, s17, 3 rounds, same process,
    32/8 heads unless noted, vs partials: hd128 b1 1k (64 CTAs) 0.94x / 0.95x (two runs), b1 1.5k
    (96) 1.13x, b1 2k (128) 1.25x / 1.24x, b8 2k 1.17x, b2 8k 1.03x, 64/8 b2 8k 1.14x / 1.06x;
    hd96 b2 4k 1.09x; hd64 b1 1k (64) 0.96x, b4 4k 1.10x / 1.11x; causal: hd128 b2 2k (256 CTAs)
    0.95x / 0.96x, b4 4k (1024) 1.08x, b2 8k 1.02x / 1.04x, hd64 b4 2k (512) 1.13x / 1.13x.
    hd256 loses (0.73-0.81x: it gives up dq_red's second Q/dO stage), as does deterministic
    causal (0.81x; non-causal 1.06x, one shape, so not taken either); hd192, split head dims and
    the features were not measured. Against dkv_red (the GQA default since s19; H100, s20, 3
    rounds): hd128 b2 8k 1.05x, b1 1.5k 1.08x, causal b4 4k 1.02x, b2 8k 0.98x, hd64 causal b4 2k
    1.06x, so the rule stands."""
    kv_ctas = -(-seqlen_k // 128) * kv_heads  # (tile_n is 128 at hd <= 128)
    enough = kv_ctas >= 3 * sms if causal else 2 * kv_ctas > sms
    return d == dv and d <= 128 and not deterministic and enough


def short_causal_persistent(d, dv, causal, deterministic, seqlen_k) -> bool:
    """The persistent grid for causal hd64 MHA up to 2k keys (the counter hands out the uneven
    tiles). H100, same process, vs one CTA per tile: 1k +2.9% (s14), +2.8% and +4.2% (s17, 5 and
    3 rounds), 2k +1.1% and +2.1% (s17); 4k -1.7% (s15), -0.4% (s17), 16k -0.7% (s15)."""
    return causal and not deterministic and d == dv and d <= 64 and seqlen_k <= 2048


def default_config(d, dv, dtype, causal, deterministic=False, gqa=False, **overrides) -> BwdConfig:
    """gqa: the call has fewer KV heads than query heads (then dK / dV are fp32: added per KV
    head (dkv_red) or partials per query head, unless group_loop)."""
    dtype = _dtype_name(dtype)
    overrides = dict(overrides)
    group_loop = bool(gqa and overrides.pop("group_loop", False))  # (MHA: nothing to walk)
    kv_groups, gqa = bool(gqa), bool(gqa and not group_loop)  # gqa from here: fp32 partials
    if d <= 64:
        tile = dict(tile_m=128, tile_n=128, stages=2, swap=True)
    elif d <= 128:  # hd96 too (FA3's bwd tile for it is 64 x 128 as well)
        tile = dict(tile_m=64, tile_n=128, stages=2, swap=True)
    elif d <= 192:  # unswapped as hd256 (dK/dV's M is 64 keys a warpgroup: 128 would not fit in
        # registers); two Q/dO stages fit in smem (210 KB). Not deterministic: 96-key tiles with
        # dK^T / dV^T (dkv_swap, 144 accumulator registers) and dQ added from registers (its
        # smem staging would not fit beside two stages). H100, s20, 3 rounds, vs 64 x 64: 16 heads
        # b2 4k 1.17 / 1.18x, causal 1.13x, b1 16k causal 1.20x, 192/128 1.20x (causal 1.11x),
        # GQA 16/4 1.14x (causal 1.10x; 1.17x / 1.14x with dkv_red). FA4 (64 x 96 too) stays
        # 1.08-1.14x ahead. Deterministic keeps 64 x 64 and the ordered dQ warp
        tile = dict(tile_m=64, tile_n=64, stages=2, swap=False)
        if overrides.get("dkv_swap", not deterministic and not group_loop):
            tile.update(tile_n=96, dkv_swap=True, dq_red=True)
    else:  # 64 x 64 tiles: dK + dV + dQ accumulators fill the registers. dQ added from
        # registers (dq_red: no dQ staging) lets two Q/dO stages fit (210 KB): H100 same run,
        # 1k-16k causal or not, +17..34% (1.14..1.29x FA4). Deterministic keeps the ordered
        # smem path, and one stage.
        dq_red = overrides.get("dq_red", not deterministic and not group_loop)
        tile = dict(tile_m=64, tile_n=64, stages=2 if dq_red else 1, swap=False, dq_red=dq_red)
    if d <= 64 and overrides.get("softcap"):
        tile["tile_m"] = 64  # 1 - tanh^2 of a 128-query S^T tile would not fit in registers
    # 80 query rows (hd128 swap, FA3's non-causal choice; dQ computed transposed): S^T and dP^T
    # take 80 columns, which leaves no registers for LSE / D loaded early or dV issued early
    # (ptxas serializes every wgmma, C7512, or spills)
    tile80 = overrides.get("tile_m", tile["tile_m"]) == 80
    tile["stagger"] = False  # measured neutral on the H100 (module docstring); kept for A/B
    # where it measured a gain: H100 same run, hd128 non-causal 1k/4k/16k +0/+1.8/+0.8%, hd256
    # 1k/16k/causal 4k +1.0/+0.9/+1.0%. Causal hd128 MHA builds without spills now but measured
    # neutral (H200, 3 rounds: 1k 1.00, 4k 1.01); hd64 non-causal loses (1k 0.98); hd64 causal,
    # GQA (dK / dV from registers) and softcap spill with it; a window: not measured.
    tile["stats_early"] = not tile["swap"] or (d > 64 and not causal and not overrides.get("local")
                                               and not overrides.get("softcap") and not tile80)
    # dK / dV by TMA wherever it applies: H100 same run, +10% hd128 1k, +7% causal hd64/128 1k,
    # +1..4% at 4k/16k and hd256
    tile["dkv_tma"] = not (gqa or overrides.get("varlen") or overrides.get("seqused_k"))
    # deterministic causal: with ascending adds, block n waits for block 0 to reach m, so the SMs
    # idle along a wavefront; last-first, each waits on one block ahead of it. H100, 3 rounds,
    # time vs the non-deterministic default: hd128 4k 0.55 -> 0.90x, 16k 0.61 -> 0.87x, hd256 4k
    # 0.41 -> 0.76x
    tile["spt"] = bool(causal and deterministic and not overrides.get("varlen"))
    # dV's GEMM issued before the dS step (so it overlaps it): H100, two runs of 3 and 5 rounds,
    # hd128 non-causal 1k-16k +0.8..4.6%; causal measured 0.98-1.01x, hd64 refuses it (spills).
    # Not with dK / dV stored from registers (GQA, varlen, seqused_k: 12 / 28 B spills) or a
    # window / softcap (more registers, never measured)
    tile["dv_early"] = (d == 128 and not causal and tile["dkv_tma"] and not overrides.get("local")
                        and not overrides.get("softcap") and not tile80)
    # H100, 3 rounds, window (L, 0), vs all-masked: hd128 L=4096 8k +0.4%, 32k +6.4%; hd64 L=1024
    # 4k +5.9%; hd256 L=1024 4k +0.1%. With softcap its unmasked loop spills (hd128: 156 B)
    tile["window_split"] = bool(overrides.get("local")) and not overrides.get("softcap")
    # Persistent grid: H100, 5 rounds, same process, whole backward vs one CTA per tile: hd64
    # non-causal 512 / 1k / 2k / 4k / 8k / 16k +5.4 / +2.8 / +3.7 / +2.6 / +2.2 / +0.8%, hd96 1k / 4k
    # +1.4 / +0.9%; hd128 -1.0..+1.1% (1k-16k), so off there; causal: see BwdConfig. MHA dense
    # only (GQA, with or without group_loop, and the features were not measured)
    tile["persistent"] = (d <= 96 and not causal and not deterministic and not kv_groups
                          and not any(overrides.get(f) for f in ("local", "softcap", "varlen",
                                                                 "seqused_q", "seqused_k", "pdl")))
    tile.update(overrides, group_loop=group_loop)
    # GQA's dK / dV added into per-KV-head fp32 accumulators rather than per-query-head partials
    # summed after: H100, s19, 3 rounds, same process, vs partials: causal hd128 32/8 b2 2k
    # 1.07x, hd128 b1 1k 1.06x, hd64 causal b2 2k 1.07x, hd256 16/4 b2 4k 1.01x (causal 1.03x);
    # hd192 with dkv_swap (s20): 1.03x (causal 1.03x). Dense only; the features (window,
    # softcap, varlen, seqused) keep partials until GPU-tested with it; hd96 and hd192's 64-key
    # tiles passed its GPU tests (s20) but were not measured with it (at hd96 group_loop took
    # the measured shapes), so keep partials
    if "dkv_red" not in overrides:
        tile["dkv_red"] = bool(gqa and not deterministic and not tile.get("persistent")
                               and (d == dv and d in (64, 128, 256) or tile.get("dkv_swap"))
                               and not any(overrides.get(f) for f in (
                                   "local", "softcap", "varlen", "seqused_q", "seqused_k")))
    cfg = BwdConfig(d, dv, dtype, bool(causal), bool(deterministic), bool(gqa), **tile)
    assert not cfg.spt or (cfg.causal and cfg.deterministic), cfg
    assert not (cfg.stagger and cfg.deterministic), cfg
    assert not (cfg.dkv_tma and (cfg.gqa or cfg.varlen or cfg.seqused_k)), cfg
    assert not (cfg.dq_red and (cfg.deterministic or cfg.swap)), cfg
    assert not (cfg.group_loop and (cfg.gqa or cfg.dq_red)), cfg  # (dq_red: per-head dQ addresses)
    assert not cfg.dkv_red or (cfg.gqa and not cfg.deterministic and not cfg.persistent), cfg
    assert not cfg.dkv_swap or not (cfg.swap or cfg.persistent), cfg
    assert cfg.swap or cfg.dkv_swap or cfg.tile_n % 64 == 0, cfg  # dK / dV's M: 64 keys a block
    # unswapped, P and dS reach dV / dK through smem; a 128-query S^T tile (hd64) runs out of
    # registers with dV in flight during dS (ptxas serializes the wgmmas, 96 B spill)
    assert not cfg.dv_early or (cfg.swap and cfg.tile_m == 64), cfg
    assert not cfg.dk_early or cfg.swap, cfg
    assert not cfg.desc_hoist or cfg.swap, cfg  # unswapped, dV / dK read two smem rings
    assert not cfg.dkv_tma or cfg.stages * cfg.tile_m >= cfg.tile_n, cfg  # dK fits Q's buffer
    assert not (cfg.local and (cfg.causal or cfg.spt)), cfg
    # (with softcap its unmasked loop spills: hd128 156 B vs 60 B all-masked)
    assert not cfg.window_split or (cfg.local and not cfg.softcap), cfg
    assert not (cfg.spt and cfg.varlen), cfg  # spt reverses the grid's blocks, not a sequence's
    assert not cfg.lpt or (cfg.causal and not cfg.deterministic and not cfg.varlen), cfg
    assert not cfg.persistent or (cfg.swap and not (cfg.local or cfg.deterministic
                                                    or cfg.varlen or cfg.seqused_q or cfg.seqused_k
                                                    or cfg.pdl or cfg.lpt or cfg.spt)), cfg
    assert smem_bytes(cfg.tile_m, cfg.tile_n, d, cfg.stages, cfg.swap,
                      dq_red=cfg.dq_red, dv=dv) <= SMEM_LIMIT, cfg
    assert d == dv or (not cfg.swap and (d, dv) in SPLIT_HEAD_DIMS), cfg
    return cfg


def post_config(cfg: BwdConfig) -> PostConfig:
    return PostConfig(cfg.d, cfg.dv, cfg.dtype, cfg.tile_m, cfg.tile_n, cfg.swap, cfg.varlen,
                      cfg.pdl)


def variants() -> Iterator:
    """Every shipped config (for compile tests and `fa3 cache warm`)."""
    posts = set()
    for d in (64, 128, 256):
        for dtype in DTYPES:
            for causal in (False, True):
                for det in (False, True):
                    for gqa in (False, True):
                        cfg = default_config(d, d, dtype, causal, det, gqa)
                        yield cfg
                        posts.add(post_config(cfg))
    for d in (96, 192):  # the same code at other tiles / swizzles: two corners each
        for cfg in (default_config(d, d, "bfloat16", False),
                    default_config(d, d, "float16", True, True, True)):
            yield cfg
            posts.add(post_config(cfg))
    # hd192's 96-key tiles (dkv_swap: dK^T / dV^T, stored by TMA transposed or from registers):
    # MHA, causal GQA partials, dkv_red, softcap, a window, varlen, 192 / 128
    for cfg in (default_config(192, 192, "bfloat16", False, dkv_swap=True),
                default_config(192, 192, "float16", True, False, True, dkv_swap=True,
                               dkv_red=False),
                default_config(192, 192, "bfloat16", False, False, True, dkv_swap=True,
                               dkv_red=True),
                default_config(192, 192, "bfloat16", True, dkv_swap=True, softcap=True),
                default_config(192, 192, "bfloat16", False, False, True, dkv_swap=True, local=True),
                default_config(192, 192, "bfloat16", True, False, True, dkv_swap=True, varlen=True),
                default_config(192, 128, "bfloat16", True, dkv_swap=True),
                default_config(192, 128, "float16", False, False, True, dkv_swap=True)):
        yield cfg
        posts.add(post_config(cfg))
    for cfg in (  # varlen / seqused (a few corners; the switches touch offsets and exits only)
            default_config(128, 128, "bfloat16", True, varlen=True),
            default_config(64, 64, "float16", False, True, True, varlen=True, seqused_q=True,
                           seqused_k=True),
            default_config(256, 256, "bfloat16", True, False, True, varlen=True),
            default_config(192, 192, "bfloat16", True, True, False, varlen=True, seqused_q=True),
            default_config(96, 96, "bfloat16", False, False, True, varlen=True, local=True),
            default_config(128, 128, "bfloat16", False, False, False, seqused_k=True),
            default_config(128, 128, "float16", True, True, True, seqused_q=True, seqused_k=True)):
        yield cfg
        posts.add(post_config(cfg))
    yield default_config(128, 128, "bfloat16", True, True, False, spt=False)  # ascending adds
    yield default_config(64, 64, "float16", True, lpt=True)  # heaviest KV blocks first
    yield default_config(128, 128, "bfloat16", False, pdl=True)  # dependent launches (A/B)
    yield default_config(256, 256, "bfloat16", False, pdl=True)  # dq_red: consumers wait too
    yield default_config(256, 256, "float16", True, True, True, pdl=True)
    yield default_config(256, 256, "bfloat16", True, False, True, lpt=True, lpt_mb=8)
    yield default_config(128, 128, "bfloat16", False, stats_early=False)
    for d, causal, gqa in ((96, False, False), (128, False, False), (128, False, True),
                           (64, True, False), (128, True, False), (128, True, True)):
        # persistent grid (an A/B switch here; causal: tiles from the global counter)
        yield default_config(d, d, "float16" if gqa else "bfloat16", causal, False, gqa,
                             persistent=True)
    for d, causal in ((64, False), (128, True), (256, False)):  # dK/dV from registers (MHA)
        yield default_config(d, d, "float16" if causal else "bfloat16", causal, dkv_tma=False)
    yield default_config(256, 256, "float16", True, stats_early=False)
    for d in (64, 128, 256):  # sliding window and softcap
        yield default_config(d, d, "bfloat16", False, False, False, local=True)
        yield default_config(d, d, "float16", False, True, True, local=True)
        yield default_config(d, d, "bfloat16", True, False, False, softcap=True)
        yield default_config(d, d, "bfloat16", False, False, True, softcap=True, local=True)
    # q/k 192 with v 128: MHA and GQA, causal, deterministic
    for cfg in (default_config(192, 128, "bfloat16", False),
                default_config(192, 128, "float16", True, True, True),
                default_config(192, 128, "bfloat16", True, False, True, varlen=True),
                default_config(192, 128, "bfloat16", False, False, True, dkv_red=True)):
        yield cfg
        posts.add(post_config(cfg))
    # 80 query rows, dQ transposed (an A/B switch; its postprocess maps dQ^T back)
    for cfg in (default_config(128, 128, "bfloat16", False, tile_m=80),
                default_config(128, 128, "bfloat16", False, tile_m=80, persistent=True),
                default_config(128, 128, "float16", True, True, True, tile_m=80),
                default_config(128, 128, "bfloat16", False, False, True, tile_m=80, varlen=True)):
        yield cfg
        posts.add(post_config(cfg))
    # GQA with the group's query heads walked in one CTA (by default where group_loop_wins):
    # dense, causal, deterministic, persistent, hd64 / hd96 / hd256 (dQ through the dQ warp),
    # varlen; and (dkv_red off) per-query-head fp32 partials where dkv_red is the default, and
    # dkv_red at hd96 and at hd192's 64-key tiles (on request)
    for cfg in (default_config(128, 128, "bfloat16", False, False, True, group_loop=True),
                default_config(128, 128, "float16", True, False, True, group_loop=True),
                default_config(128, 128, "bfloat16", True, True, True, group_loop=True),
                default_config(128, 128, "bfloat16", False, False, True, group_loop=True,
                               persistent=True),
                default_config(64, 64, "bfloat16", True, False, True, group_loop=True,
                               persistent=True),
                default_config(64, 64, "float16", False, False, True, group_loop=True),
                default_config(96, 96, "bfloat16", False, False, True, group_loop=True),
                default_config(256, 256, "bfloat16", True, False, True, group_loop=True),
                default_config(128, 128, "bfloat16", True, False, True, group_loop=True,
                               varlen=True),
                default_config(128, 128, "bfloat16", True, False, True, dkv_red=False),
                default_config(64, 64, "float16", False, False, True, dkv_red=False),
                default_config(256, 256, "bfloat16", False, False, True, dkv_red=False),
                default_config(96, 96, "float16", True, False, True, dkv_red=True),
                default_config(192, 192, "bfloat16", False, False, True, dkv_swap=False,
                               dkv_red=True)):
        yield cfg
        posts.add(post_config(cfg))
    yield from sorted(posts, key=repr)


def _dtype_name(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    assert name in DTYPES, f"fa3 hopper bwd: unsupported dtype {dtype}"
    return name


def build(cfg, extra_options: str = ""):
    """Compile the main kernel (BwdConfig) or the postprocess (PostConfig) for sm_90a."""
    cute = _compile.dsl()
    import cutlass
    from cutlass.cute.runtime import make_fake_stream, make_fake_tensor

    b, h, hk, sq, sk, lq, lacc, nm = (cute.sym_int32() for _ in range(8))
    stream = make_fake_stream(use_tvm_ffi_env_stream=True)
    opts = _compile.compile_options(extra=extra_options)
    dqacc = make_fake_tensor(cutlass.Float32, (b, h, lacc), stride=(cute.sym_int64(divisibility=4),
                             cute.sym_int64(divisibility=4), 1), assumed_align=16)
    def vec(n=None):  # a contiguous int32 vector of symbolic length
        return make_fake_tensor(cutlass.Int32, (n if n is not None else cute.sym_int32(),),
                                stride=(1,), assumed_align=4)

    if isinstance(cfg, PostConfig):
        from fa3.hopper.bwd_postprocess import BwdPostprocess

        dq = _compile.fake_attn_tensor(cfg.dtype, (b, sq, h, cfg.d))
        var = (vec(), cutlass.Int32(1)) if cfg.varlen else (None, None)
        return cute.compile(BwdPostprocess(cfg), dqacc, dq, cutlass.Float32(1.0), *var, stream,
                            options=opts)
    from fa3.hopper.bwd_kernel import FlashBwdSm90

    q = _compile.fake_attn_tensor(cfg.dtype, (b, sq, h, cfg.d))
    k = _compile.fake_attn_tensor(cfg.dtype, (b, sk, hk, cfg.d))
    v = _compile.fake_attn_tensor(cfg.dtype, (b, sk, hk, cfg.dv))
    do = _compile.fake_attn_tensor(cfg.dtype, (b, sq, h, cfg.dv))
    stat = lambda: make_fake_tensor(cutlass.Float32, (b, h, lq), stride=(
        cute.sym_int64(divisibility=4), cute.sym_int64(divisibility=4), 1), assumed_align=16)
    if cfg.gqa:  # per query head, or (dkv_red) per KV head
        dk = _compile.fake_attn_tensor("float32", (b, sk, hk if cfg.dkv_red else h, cfg.d))
        dv = _compile.fake_attn_tensor("float32", (b, sk, hk if cfg.dkv_red else h, cfg.dv))
    else:
        dk = _compile.fake_attn_tensor(cfg.dtype, (b, sk, hk, cfg.d))
        dv = _compile.fake_attn_tensor(cfg.dtype, (b, sk, hk, cfg.dv))
    # semaphores (b, h, m blocks) when deterministic, else a 1-element dummy: own symbols
    sem = make_fake_tensor(cutlass.Int32, (cute.sym_int32(), cute.sym_int32(), nm),
                           stride=(cute.sym_int64(), cute.sym_int64(), 1),
                           assumed_align=4)
    nb = cute.sym_int32()  # sequences (varlen) or batch
    opt = (vec() if cfg.varlen else None, vec() if cfg.varlen else None,
           vec(nb) if cfg.seqused_q else None, vec(nb) if cfg.seqused_k else None,
           cutlass.Int32(1) if cfg.varlen else None, cutlass.Int32(1) if cfg.persistent else None)
    return cute.compile(FlashBwdSm90(cfg), q, k, v, do, stat(), stat(), dqacc, dk, dv, sem,
                        cutlass.Float32(1.0), cutlass.Int32(0), cutlass.Int32(0), cutlass.Float32(0.0),
                        *opt, stream, options=opts)


def bwd_missing(r) -> str | None:
    """The first feature of a forward request (fa3._dispatch.FwdRequest) whose gradient this
    backward lacks, or None."""
    import torch

    if r.dtype not in (torch.float16, torch.bfloat16):
        return f"backward for dtype {r.dtype}"
    if r.d != r.dv and (r.d, r.dv) not in SPLIT_HEAD_DIMS:
        return f"backward for head dim q/k {r.d} != v {r.dv}"
    if r.d != r.dv and f"hd{r.d}_{r.dv}" in IMPLEMENTED_FEATURES - VERIFIED_FEATURES:
        return f"backward for head dims q/k {r.d}, v {r.dv} (built, not yet GPU-verified)"
    if r.d not in HEAD_DIMS:
        return f"backward for head dim {r.d} (sm90 supports {', '.join(map(str, HEAD_DIMS))} today)"
    if f"hd{r.d}" in IMPLEMENTED_FEATURES - VERIFIED_FEATURES:
        return f"backward for head dim {r.d} (built, not yet GPU-verified)"
    if r.varlen and "varlen" not in VERIFIED_FEATURES:
        return "varlen backward"
    if r.has_seqused and "seqused" not in VERIFIED_FEATURES:
        return "seqused backward"
    if r.window != (-1, -1) and not (r.causal and r.window[0] == -1) and "window" not in VERIFIED_FEATURES:
        return "sliding-window (local) attention backward"
    if r.softcap and "softcap" not in VERIFIED_FEATURES:
        return "softcap backward"
    if r.has_sink and "sink" not in VERIFIED_FEATURES:
        return "learnable sink gradient"
    return None


# the API's optional inputs (fa3.ops._features) -> feature names of the tables above
_FEATURE_NAMES = {"cu_seqlens_q": "varlen", "cu_seqlens_k": "varlen", "max_seqlen_q": "varlen",
                  "max_seqlen_k": "varlen", "seqused_q": "seqused", "seqused_k": "seqused"}


_PLANS: dict = {}
_PLANS_MAX = 1024
_NO_SEM: dict = {}  # device -> a zeroed (1, 1, 1) int32: the non-deterministic kernel never reads it


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything flash_bwd derives from a call's signature (see _plan)."""
    cfg: BwdConfig
    main: object  # compiled callables
    post: object
    pre: object
    dims: tuple  # b, sq, h, d, sk, hk (after varlen's unsqueeze)
    rows: int  # LSE2 / D rows per (batch, head), padded to whole tiles
    split: tuple  # dense: the workspace's (b, h, n) pieces: LSE2, D, dQaccum[, semaphores]
    left: int
    right: int
    softcap: float
    nseq: int
    max_q: int
    max_k: int
    empty: bool  # nothing to compute: zero gradients
    grid: int | None  # persistent: CTAs (one per SM, at most one per KV tile)


def _freeze(x):
    """A call's feature / override value as a plan-key part: tensors by what decides the launch."""
    if hasattr(x, "data_ptr"):
        return ("tensor", tuple(x.shape), x.dtype, x.device)
    return tuple(sorted(x.items())) if isinstance(x, dict) else x


def flash_bwd(dout, q, k, v, out, lse, softmax_scale: float, causal: bool, deterministic: bool = False,
              *, cfg_overrides: dict | None = None, allow_unverified: bool = False, **features):
    """Gradients (dq, dk, dv) of attention. Dense: q/out/dout (b, sq, h, d), k/v (b, sk, hk, d),
    lse (b, h, sq); varlen (cu_seqlens_q/k int32 (n+1,), max_seqlen_q/k): q/out/dout (total_q, h,
    d), k/v (total_k, hk, d), lse (h, total_q); lse is the forward's natural-log fp32 LSE.
    cfg_overrides: BwdConfig fields (tests, tuning); features: the API's optional inputs (window
    (left, right), -1 unbounded; softcap; cu_seqlens/max_seqlen; seqused_q/k int32 (n,); sink (h,)
    logits: then a 4th gradient, d sink (h,) fp32, is returned). Rows and keys past seqused, or
    outside every sequence, get zero gradients."""
    import torch

    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    lse = lse if lse.stride(-1) == 1 else lse.contiguous()
    # Checks, config, compiled kernels and buffer sizes depend only on this signature: looked up
    # once per signature (H100 host, tiny shape: they were about half of the backward's ~200 us
    # of Python + allocations); the dict is cleared past _PLANS_MAX.
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), out.shape, out.stride(),
           dout.shape, dout.stride(), lse.shape, lse.stride(), q.dtype, k.dtype, v.dtype, out.dtype,
           dout.dtype, lse.dtype, q.device, bool(causal), bool(deterministic), allow_unverified,
           _freeze(cfg_overrides), tuple((n, _freeze(f)) for n, f in sorted(features.items())))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(dout, q, k, v, out, lse, causal, deterministic, cfg_overrides,
                     allow_unverified, features)
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = plan
    # TMA: 16-byte aligned bases (the strides' alignment is checked with the plan)
    assert (q.data_ptr() | k.data_ptr() | v.data_ptr() | out.data_ptr() | dout.data_ptr()) % 16 == 0, \
        "q, k, v, out and dout must be 16-byte aligned"
    cfg = plan.cfg
    varlen = cfg.varlen
    sink = features.get("sink")
    if varlen:  # one batch of packed rows; the kernels find each sequence's rows
        q, k, v, out, dout, lse = (t.unsqueeze(0) for t in (q, k, v, out, dout, lse))
    b, sq, h, d, sk, hk = plan.dims
    if plan.empty:
        unpack = (lambda t: t.squeeze(0)) if varlen else (lambda t: t)
        grads = unpack(torch.zeros_like(q)), unpack(torch.zeros_like(k)), unpack(torch.zeros_like(v))
        return grads if sink is None else (*grads, torch.zeros_like(sink, dtype=torch.float32))
    dev = q.device
    cu_q, cu_k = features.get("cu_seqlens_q"), features.get("cu_seqlens_k")
    used_q, used_k = features.get("seqused_q"), features.get("seqused_k")
    rows, tm = plan.rows, cfg.tile_m
    dv = v.shape[-1]
    if varlen or dv != d:  # padding rows (varlen: rows outside every sequence, gaps) filled here:
        # the preprocess's own fill zeroes dQaccum rows of dv floats, so d != dv comes here too
        dq = torch.zeros_like(q) if varlen else torch.empty_like(q)
        lse2 = torch.full((b, h, rows), math.inf, device=dev, dtype=torch.float32)
        dsum = torch.zeros((b, h, rows), device=dev, dtype=torch.float32)
        if varlen:
            plan.pre(out, dout, lse, dsum, lse2, cu_q, used_q, plan.max_q)
        elif used_q is not None:
            plan.pre(out, dout, lse, dsum, lse2, None, used_q, None)
        else:
            plan.pre(out, dout, lse, dsum, lse2)
        dqacc = torch.zeros((b, h, rows * d), device=dev, dtype=torch.float32)
        sem = (torch.zeros((b, h, rows // tm), device=dev, dtype=torch.int32) if deterministic
               else None)
    else:  # one workspace; the preprocess writes every element the main kernel reads
        dq = torch.empty_like(q)
        ws = torch.empty((b, h, sum(plan.split)), device=dev, dtype=torch.float32).split(plan.split, 2)
        lse2, dsum, dqacc = ws[0], ws[1], ws[2]
        # semaphores (deterministic) or the persistent causal kernel's tile counter (its first
        # element), zeroed by the preprocess
        sem = ws[3].view(torch.int32) if len(plan.split) > 3 else None
        plan.pre(out, dout, lse, dsum, lse2, dqacc, sem, used_q)
    if sem is None:
        sem = _NO_SEM.get(dev)
        if sem is None:
            sem = _NO_SEM[dev] = torch.zeros((1, 1, 1), device=dev, dtype=torch.int32)
    if cfg.dkv_red:  # per-KV-head fp32 accumulators the kernel adds into
        dk_part = torch.zeros((b, sk, hk, d), device=dev, dtype=torch.float32)
        dv_part = torch.zeros((b, sk, hk, dv), device=dev, dtype=torch.float32)
    elif cfg.gqa:  # per-query-head fp32 partials, summed over each group below
        # (keys past seqused_k or outside every sequence are not written)
        alloc = torch.zeros if (used_k is not None or varlen) else torch.empty
        dk_part = alloc((b, sk, h, d), device=dev, dtype=torch.float32)
        dv_part = alloc((b, sk, h, dv), device=dev, dtype=torch.float32)
    elif used_k is not None or varlen:
        dk_part, dv_part = torch.zeros_like(k), torch.zeros_like(v)
    else:
        dk_part, dv_part = torch.empty_like(k), torch.empty_like(v)
    scale = float(softmax_scale)
    plan.main(q, k, v, dout, lse2, dsum, dqacc, dk_part, dv_part, sem, scale, plan.left,
              plan.right, plan.softcap, cu_q, cu_k, used_q, used_k, plan.max_k if varlen else None,
              plan.grid)
    plan.post(dqacc, dq, scale, cu_q, plan.max_q if varlen else None)
    if cfg.dkv_red:
        dk_part, dv_part = dk_part.to(q.dtype), dv_part.to(q.dtype)
    elif cfg.gqa:
        g = h // hk
        dk_part = dk_part.view(b, sk, hk, g, d).sum(3).to(q.dtype)
        dv_part = dv_part.view(b, sk, hk, g, dv).sum(3).to(q.dtype)
    if varlen:
        dq, dk_part, dv_part = dq.squeeze(0), dk_part.squeeze(0), dv_part.squeeze(0)
    return (dq, dk_part, dv_part) if sink is None else (dq, dk_part, dv_part,
                                                        sink_grad(sink, lse2, dsum))


def _plan(dout, q, k, v, out, lse, causal, deterministic, cfg_overrides, allow_unverified,
          features) -> _Plan:
    """flash_bwd's checks and launch decisions for one call signature (a plan-cache miss)."""
    import torch

    from fa3.hopper.bwd_preprocess import PreprocessConfig, compile_preprocess
    from fa3.hopper.flash_fwd import _window
    from fa3.hopper.tile_scheduler import num_sms  # (imports cutlass: not at fa3's import)

    names = {_FEATURE_NAMES.get(f, f) for f in features}
    if f"hd{q.shape[-1]}" in IMPLEMENTED_FEATURES:
        names.add(f"hd{q.shape[-1]}")
    if q.shape[-1] != v.shape[-1]:  # a (q/k, v) pair counts as its own feature
        names.add(f"hd{q.shape[-1]}_{v.shape[-1]}")
    missing = sorted(names - IMPLEMENTED_FEATURES)
    if missing:
        raise NotImplementedError(f"fa3: sm90 backward does not support {missing} yet")
    unverified = sorted(names - VERIFIED_FEATURES)
    if unverified and not allow_unverified:
        raise NotImplementedError(f"fa3: sm90 backward of {unverified} is not GPU-verified yet")
    causal, local, left, right = _window(causal, features.get("window"))
    cu_q, cu_k = features.get("cu_seqlens_q"), features.get("cu_seqlens_k")
    used_q, used_k = features.get("seqused_q"), features.get("seqused_k")
    varlen = cu_q is not None
    assert varlen == (cu_k is not None), "cu_seqlens_q and cu_seqlens_k go together"
    if varlen:
        assert q.dim() == 3 and tuple(lse.shape) == (q.shape[1], q.shape[0])
        q, k, v, out, dout, lse = (t.unsqueeze(0) for t in (q, k, v, out, dout, lse))
    b, sq, h, d = q.shape
    _, sk, hk, dv = v.shape
    if d not in HEAD_DIMS or (d != dv and (d, dv) not in SPLIT_HEAD_DIMS):
        # the forward takes more head dims than this backward
        raise NotImplementedError(f"fa3: sm90 backward for head dims q/k {d}, v {dv} is not built "
                                  f"yet (it supports {', '.join(map(str, HEAD_DIMS))} with q/k = v, "
                                  "and q/k 192 with v 128)")
    assert tuple(k.shape) == (b, sk, hk, d) and tuple(dout.shape) == tuple(out.shape) == (b, sq, h, dv)
    assert tuple(lse.shape) == (b, h, sq) and lse.dtype == torch.float32
    assert h % hk == 0 and q.dtype == k.dtype == v.dtype == out.dtype == dout.dtype
    for t in (q, k, v, out, dout):  # TMA: 16-byte aligned strides (bases: every call)
        assert t.stride(-1) == 1
        assert all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1])
    softcap = float(features.get("softcap", 0.0))
    overrides = dict(cfg_overrides or {})
    # size-dependent defaults (default_config sees no sizes); measured without the features
    plain = not (varlen or local or softcap or used_q is not None or used_k is not None)
    if h != hk and "group_loop" not in overrides:
        overrides["group_loop"] = plain and group_loop_wins(d, dv, causal, deterministic, sk,
                                                            hk * b, num_sms(q.device))
    if h == hk and plain and not {"persistent", "pdl", "lpt", "swap"} & overrides.keys() \
            and short_causal_persistent(d, dv, causal, deterministic, sk):  # (those refuse it)
        overrides["persistent"] = True
    cfg = default_config(d, dv, q.dtype, causal, deterministic, h != hk, local=local,
                         softcap=softcap > 0, varlen=varlen, seqused_q=used_q is not None,
                         seqused_k=used_k is not None, **overrides)
    nseq = cu_q.shape[0] - 1 if varlen else b
    max_q = int(features["max_seqlen_q"]) if varlen else sq
    max_k = int(features["max_seqlen_k"]) if varlen else sk
    tm = cfg.tile_m
    counter = cfg.persistent and cfg.causal  # the kernel's tile counter (bwd_kernel.dyn_tiles)
    assert not (counter and (varlen or d != dv))
    # LSE (log2) and D padded to whole query tiles: the kernel bulk-loads tile_m values per
    # block; padded rows (and rows past seqused_q) get LSE = +inf so their P is 0. Varlen: each
    # sequence's rows start at a tile boundary, (cu_q[i] + i * tile_m) // tile_m tiles in
    # (bwd_kernel.py), so the padded length is (total_q // tile_m + nseq) tiles.
    rows = (sq // tm + nseq) * tm if varlen else -(-sq // tm) * tm
    dt = {torch.bfloat16: "bf16", torch.float16: "fp16"}[q.dtype]
    if varlen:
        pre = PreprocessConfig(dt, dv, varlen=True, seqused=used_q is not None, pad_tile=tm)
    elif d != dv:  # the plain one; the caller fills padding and zeroes dQaccum (d floats a row)
        pre = PreprocessConfig(dt, dv, seqused=used_q is not None)
    else:  # the fill variant: it writes the padded rows, dQaccum and semaphores the kernel reads
        pre = PreprocessConfig(dt, dv, seqused=used_q is not None, pad_tile=tm, fill=True,
                               sem=bool(deterministic or counter), pdl=cfg.pdl)
    # workspace pieces per (batch, head), each a multiple of 4 floats so every piece (and the
    # strides) stays 16-byte aligned: LSE2, D, dQaccum, semaphores (int32, deterministic)
    split = (rows, rows, rows * d) + ((-(-(rows // tm) // 4) * 4,) if deterministic or counter else ())
    empty = nseq == 0 or h == 0 or sq == 0 or sk == 0 or max_q == 0 or max_k == 0
    grid = None
    if cfg.persistent:
        grid = max(1, min(-(-sk // cfg.tile_n) * (hk if cfg.group_loop else h) * b,
                          num_sms(q.device)))
    return _Plan(cfg, _compile.get_kernel(cfg, build), _compile.get_kernel(post_config(cfg), build),
                 compile_preprocess(pre), (b, sq, h, d, sk, hk), rows, split, left, right, softcap,
                 nseq, max_q, max_k, empty, grid)


def sink_grad(sink, lse2, dsum):
    """d loss / d sink[h] = -sum over rows of exp(sink[h] - lse) * D: the sink's probability in
    each row's softmax times D = rowsum(dO * O) (the forward's LSE already includes the sink, so
    P and the other gradients are unchanged). lse2 / dsum: the kernel's (n, h, rows) buffers, log2
    LSE and D; padding rows have lse2 = +inf and D = 0, fully masked rows O = 0 so D = 0: they
    add 0 (never NaN: exp2 of -inf or of a finite number)."""
    import torch

    s2 = sink.float().view(1, -1, 1) * math.log2(math.e)
    return -(torch.exp2(s2 - lse2) * dsum).sum((0, 2))
