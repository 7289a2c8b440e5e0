"""Multi-head latent attention (MLA) decode math: absorbed decode, its torch references, a Triton kernel.

The layer itself is model.MLA. Paper stage: the MLA layers of the Zebra-Llama hybrid (arXiv 2505.17272), whose
math is DeepSeek-V3's MLA (inference/model.py, "absorb" decode) with GQA key/value groups.
Per token x: q = W_UQ W_DQ x split per head into [q^N (d_N) ; q^R (d_R)]; [c ; k^R] = W_DKV x with c the r_kv
latent and k^R one rope key shared by all heads; per KV group g, [k^N_g ; v_g] = W_UKV,g c; head h uses group
h // (H/n_kv). Logits τ(q^N·k^N + q^R·k^R) with τ = (d_N + d_R)^-1/2: the per-head width, never the latent
width r_kv + d_R. RoPE (this project's choice, not the official code's YaRN table): the rope block
reuses the teacher's rotation pairs `rope_pairs` (half-split: first members, then second members) with
the teacher's own cos/sin tables; no mscale.

Cache: a plain tensor (B, S_max, width), width = r_kv + d_R, each row [c ; already-rotated k^R]: 160 values
per token per layer at 1B, against 2·n_kv·d_h = 1024 for the GQA teacher. Absorption (decode): since
k^N_s = W_UK,g c_s,
  q^N·k^N_s = (W_UK,gᵀ q^N)·c_s = q̃·c_s   and   Σ_s p_s v_s = W_UV,g (Σ_s p_s c_s),
so decode is MQA with one shared 'head' [c ; k^R]: q = [q̃ ; q^R] (width), keys the cache rows, values c.
Training/prefill decompresses K and V instead and calls SDPA. The Triton kernels are forward-only (decode) and
sit directly below their torch reference, `mla_decode_ref_absorbed`.
Run: `python mla.py` (torch check + CPU timings), `TRITON_INTERPRET=1 python mla.py` (also the kernel on CPU),
on a GPU it also times the kernel; tests: `python -m pytest tests/test_mla.py`.
"""

import os
import time

import torch

from ssm_scan import DEBUG, HAS_TRITON, check, dot_block, dot_prec, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


# ----------------------------------------------------------------------------- torch references for decode
def mla_decode_ref_naive(q_nope, q_pe, kv_cache, cache_seqlens, W_UK, W_UV, softmax_scale):
    """Decompressed decode, one row at a time, per-head K = [W_UK c ; k^R] and V = W_UV c materialised
    -> (B, H, d_V). The oracle of the absorbed forms (it reads each row's length back to the host: a test
    tool, not a decode path)."""
    (B, H, _), (G, _, r) = q_nope.shape, W_UK.shape
    dtype = torch.promote_types(q_nope.dtype, torch.float32)
    W_UK, W_UV = W_UK.to(dtype), W_UV.to(dtype)
    out = torch.zeros(B, H, W_UV.shape[1], dtype=dtype, device=q_nope.device)
    for b in range(B):
        n = int(cache_seqlens[b])
        c, k_pe = kv_cache[b, :n, :r].to(dtype), kv_cache[b, :n, r:].to(dtype)  # (n, r), (n, d_R)
        k_nope = torch.einsum("sr,gdr->gsd", c, W_UK)  # (G, n, d_N)
        k = torch.cat([k_nope, k_pe.expand(G, n, k_pe.shape[1])], -1)  # (G, n, d_N + d_R)
        v = torch.einsum("sr,gvr->gsv", c, W_UV)  # (G, n, d_V)
        # (H, n, ·): head h reads group h // (H/G)
        k, v = k.repeat_interleave(H // G, 0), v.repeat_interleave(H // G, 0)
        q = torch.cat([q_nope[b], q_pe[b]], -1).to(dtype)  # (H, d_N + d_R)
        p = torch.softmax(torch.einsum("hd,hsd->hs", q, k) * softmax_scale, -1)  # (H, n)
        out[b] = torch.einsum("hs,hsv->hv", p, v)
    return out


def mla_decode_ref_absorbed(q, kv_cache, cache_seqlens, softmax_scale, kv_lora_rank):
    """Absorbed decode in fp32 (fp64 if q is): q (B, H, width) = [q̃ ; q^R], width = r_kv + d_R
    -> (out_latent (B, H, r_kv), lse (B, H)). One cached row [c ; k] gives out_latent = c and
    lse = τ·q·[c ; k]; an empty row gives 0 and -inf. On CUDA and under torch.compile it masks over the
    whole capacity S_max: no length is read back to the host, so a CUDA graph can capture a decode step."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    S, ragged = kv_cache.shape[1], True
    if not (kv_cache.is_cuda or torch.compiler.is_compiling()):
        # eager on the CPU, reading the lengths syncs with no device: attend only up to the longest row and
        # copy the cache only for a ragged batch (a copy per step is a large share of CPU decode time)
        S = int(cache_seqlens.max()) if cache_seqlens.numel() else 0
        ragged = not bool((cache_seqlens == S).all())
    valid = torch.arange(S, device=q.device)[None, :] < cache_seqlens[:, None]  # (B, S)
    kv = kv_cache[:, :S].to(dtype)  # (B, S, width)
    if ragged:  # slots past a row's length may hold anything, NaN included, and 0·NaN is NaN: zero them
        kv = torch.where(valid[..., None], kv, 0)
    s = torch.einsum("bhd,bsd->bhs", q.to(dtype), kv) * softmax_scale  # (B, H, S)
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)  # (B, H)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0)[..., None])  # (B, H, S); empty row: 0, not NaN
    return torch.einsum("bhs,bsr->bhr", p, kv[..., :kv_lora_rank]), lse


# ----------------------------------------------------------------------------- Triton kernels (forward only)
if HAS_TRITON:
    # `mla_decode_ref_absorbed` as split-KV flash decoding (FlashDecoding), in two launches: stage 1 cuts each
    # row's cache into splits and runs an online softmax over each, stage 2 merges a row's partials weighted
    # by exp(lse). Splits past a row's length read nothing, so the grid is sized from the cache capacity and
    # no length goes back to the host. Batch-row and head program ids go int64 before any stride product;
    # q and the cache are addressed through their strides (views are fine), the partials and outputs, made
    # contiguous by the wrapper, from their sizes. Parameters come as in the Triton tutorials: pointers,
    # sizes, strides, meta-parameters (tl.constexpr).

    # _mla_decode_split_kernel, stage 1.
    # Grid (B, cdiv(H, BLOCK_H), splits): one program runs BLOCK_H heads of one row over one split of its
    # cache, rows [start, min(start + split_len, seqlen)). It loads the heads' q once, latent q̃ (H × R)
    # and rope q^R (H × D_R), then per block of BLOCK_N cache rows the latent c (N × R) and the rope key
    # k^R (N × D_R), which every head shares (the absorbed form is MQA):
    # s = τ·(q̃·cᵀ + q^R·k^Rᵀ), an online softmax, acc += p·c.
    # It stores per head the normalised fp32 partial (R) and its lse.
    @triton.jit
    def _mla_decode_split_kernel(
        q_ptr, kv_ptr, seqlens_ptr,  # inputs: q (B, H, width), cache (B, S_max, width), lengths (B,)
        o_part_ptr, lse_part_ptr,  # outputs: partials (B, H, splits, R), their lse (B, H, splits)
        H, R, D_R, split_len, scale,  # sizes and the softmax scale τ
        sq_b, sq_h, sq_d, skv_b, skv_s, skv_d,  # strides of q and the cache
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
        PREC: tl.constexpr,
    ):  # fmt: skip
        pid_b, pid_h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)  # before any stride math
        pid_s, n_splits = tl.program_id(2), tl.num_programs(2)
        seqlen = tl.load(seqlens_ptr + pid_b)
        start = pid_s * split_len
        end = tl.minimum(start + split_len, seqlen)  # end <= start: an empty split, the loop below never runs
        offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_r, offs_p = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_DR)
        mask_h, mask_r, mask_p = offs_h < H, offs_r < R, offs_p < D_R  # r need not be a power of 2 (48, 160)
        # q is loaded once and reused for every cache block
        q_row = q_ptr + pid_b * sq_b + offs_h[:, None] * sq_h
        q_lat = tl.load(q_row + offs_r[None, :] * sq_d, mask=mask_h[:, None] & mask_r[None, :], other=0.0)
        q_pe = tl.load(
            q_row + (R + offs_p)[None, :] * sq_d, mask=mask_h[:, None] & mask_p[None, :], other=0.0
        )
        q_lat, q_pe = q_lat.to(tl.float32), q_pe.to(tl.float32)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            kv_row = kv_ptr + pid_b * skv_b + offs_n.to(tl.int64)[:, None] * skv_s
            # masked loads read 0 for slots >= seqlen, so NaN there cannot reach the P·c dot
            c = tl.load(kv_row + offs_r[None, :] * skv_d, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            k_pe = tl.load(
                kv_row + (R + offs_p)[None, :] * skv_d, mask=mask_n[:, None] & mask_p[None, :], other=0.0
            )
            c, k_pe = c.to(tl.float32), k_pe.to(tl.float32)
            # two dots, latent block + rope block, instead of padding r + d_R to a power of 2 (SGLang's
            # decode_attention splits DeepSeek's 576 into 512 + 64 the same way)
            s = tl.dot(q_lat, tl.trans(c), input_precision=PREC)
            s = tl.dot(q_pe, tl.trans(k_pe), acc=s, input_precision=PREC) * scale  # (BLOCK_H, BLOCK_N)
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds >= 1 valid token
            alpha = tl.exp(m_i - m_new)  # rescales what was summed under the old max (0 on the first block)
            p = tl.exp(s - m_new[:, None])  # masked lanes: exp(-inf) = 0
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p, c, acc=acc * alpha[:, None], input_precision=PREC)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)  # empty split: out 0, lse -inf
        part = (pid_b * H + offs_h) * n_splits + pid_s  # (B, H, splits) index of each head's partial
        o_tile = o_part_ptr + part[:, None] * R + offs_r[None, :]
        tl.store(o_tile, acc / l_safe[:, None], mask=mask_h[:, None] & mask_r[None, :])
        tl.store(lse_part_ptr + part, m_i + tl.log(l_safe), mask=mask_h)

    # _mla_decode_reduce_kernel, stage 2.
    # Grid (B, H): one program merges the partials of one (row, head). For each split that holds tokens it
    # loads the partial (R) and its lse, and folds it in with the online softmax of stage 1, a partial
    # weighing exp(lse); it stores out_latent (R) and the merged lse.
    @triton.jit
    def _mla_decode_reduce_kernel(
        o_part_ptr, lse_part_ptr, seqlens_ptr,  # inputs: stage 1's partials and lse, lengths (B,)
        out_ptr, lse_ptr,  # outputs: out_latent (B, H, R), lse (B, H)
        R, split_len, n_splits,  # sizes
        BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        pid_b, pid_h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        row = pid_b * tl.num_programs(1) + pid_h  # (B, H) index: out, lse and the first partial
        seqlen = tl.load(seqlens_ptr + pid_b)
        offs_r = tl.arange(0, BLOCK_R)
        m, l_sum, acc = float("-inf"), 0.0, tl.zeros([BLOCK_R], tl.float32)
        for sp in range(0, tl.cdiv(seqlen, split_len)):  # only the splits that hold tokens are read
            lse_s = tl.load(lse_part_ptr + row * n_splits + sp)
            o_s = tl.load(o_part_ptr + (row * n_splits + sp) * R + offs_r, mask=offs_r < R, other=0.0)
            m_new = tl.maximum(m, lse_s)
            alpha, w = tl.exp(m - m_new), tl.exp(lse_s - m_new)
            acc, l_sum, m = acc * alpha + w * o_s, l_sum * alpha + w, m_new
        l_safe = tl.where(l_sum > 0, l_sum, 1.0)  # zero-length row: out 0, lse -inf (FlashMLA uses +inf)
        tl.store(out_ptr + row * R + offs_r, acc / l_safe, mask=offs_r < R)
        tl.store(lse_ptr + row, m + tl.log(l_safe))


# ----------------------------------------------------------------------------- launch wrapper and dispatchers
# an H100 SXM: the SM count used when no CUDA device can be asked (CPU, the interpreter, the compile test)
DEFAULT_SMS = 132
MIN_SPLIT_ROWS = 256  # cache rows each split reads at least


def num_splits_for(programs, S_max, num_sms=DEFAULT_SMS):
    """Splits of the cache per (row, head block), from the SM count and the cache capacity S_max:
        splits = max(1, min(cdiv(num_sms, programs), S_max // MIN_SPLIT_ROWS))
    where programs = B · cdiv(H, BLOCK_H). The first term fills every SM once; the second makes each split
    read at least MIN_SPLIT_ROWS rows, so a split's fp32 partial, H·(r_kv + 1) floats per 256+ cache rows of
    (r_kv + d_R) bf16 values, stays at most ~20 % of the cache bytes at the paper sizes (1b: 32 heads
    · 129 · 4 B = 16.5 kB per split, 256 · 160 · 2 B = 82 kB of cache): it reads the cache once."""
    return max(1, min(triton.cdiv(num_sms, programs), S_max // MIN_SPLIT_ROWS))


def mla_decode_triton(q, kv_cache, cache_seqlens, softmax_scale, kv_lora_rank, num_splits=None):
    """Launch both stages -> (out_latent (B, H, r) in q's dtype, lse (B, H) fp32). The grid and the split
    length come from shapes only (the cache capacity, not the longest row): the launch makes no host sync."""
    (B, H, width), r, S_max = q.shape, kv_lora_rank, kv_cache.shape[1]
    BLOCK_H, BLOCK_R, BLOCK_DR = 16, dot_block(r), dot_block(width - r)
    # ptxas -v (tests/test_compile.py): these keep the (BLOCK_N, BLOCK_R) latent tile in registers; fp32 tiles
    # take twice the registers and 3-pass TF32 splits each operand in two, so fp32 takes half the rows
    if q.element_size() <= 2:
        BLOCK_N, num_warps = (64, 4) if BLOCK_R <= 128 else (32, 4) if BLOCK_R <= 256 else (32, 8)
    else:
        BLOCK_N, num_warps = (32, 4) if BLOCK_R <= 128 else (16, 8)
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else DEFAULT_SMS
        num_splits = num_splits_for(B * triton.cdiv(H, BLOCK_H), S_max, sms)
    # a multiple of BLOCK_N: each split reads whole blocks
    split_len = triton.cdiv(triton.cdiv(max(S_max, 1), BLOCK_N), num_splits) * BLOCK_N
    seqlens = cache_seqlens.to(torch.int32)
    o_part = torch.empty(B, H, num_splits, r, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H, r, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, dtype=torch.float32, device=q.device)
    # fmt: off
    _mla_decode_split_kernel[(B, triton.cdiv(H, BLOCK_H), num_splits)](
        q, kv_cache, seqlens, o_part, lse_part,
        H, r, width - r, split_len, softmax_scale,
        *q.stride(), *kv_cache.stride(),
        BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, BLOCK_DR=BLOCK_DR, PREC=dot_prec(q),
        num_warps=num_warps, num_stages=2,
    )
    _mla_decode_reduce_kernel[(B, H)](
        o_part, lse_part, seqlens, out, lse,
        r, split_len, num_splits,
        BLOCK_R=BLOCK_R,
    )
    # fmt: on
    return out, lse


def mla_decode(q, kv_cache, cache_seqlens, softmax_scale, kv_lora_rank, num_splits=None, backend="auto"):
    """One query token per row: q (B, H, width), kv_cache (B, S_max, width), cache_seqlens (B,) ints in
    [0, S_max], width = r_kv + d_R -> (out_latent (B, H, r_kv) in q's dtype, lse (B, H) fp32).
    backend (ssm_scan.use_triton): "auto" takes Triton for CUDA tensors without grad, else the torch
    reference. num_splits=None follows `num_splits_for`; a fixed count fixes the summation order (run-to-run
    determinism across GPUs).
    The checks read shapes only: no host synchronisation (lengths are range-checked under ZEBRA_DEBUG=1)."""
    check(
        softmax_scale is not None and softmax_scale > 0,
        "softmax_scale is required: pass (d_nope + d_rope) ** -0.5",
    )
    check(
        q.dim() == 3 and kv_cache.dim() == 3,
        f"q must be (B, H, width) and kv_cache (B, S_max, width), got {tuple(q.shape)}, "
        f"{tuple(kv_cache.shape)}",
    )
    check(
        q.shape[0] == kv_cache.shape[0] and q.shape[2] == kv_cache.shape[2] and 0 < kv_lora_rank < q.shape[2],
        f"q {tuple(q.shape)} and kv_cache {tuple(kv_cache.shape)} disagree (kv_lora_rank {kv_lora_rank})",
    )
    check(q.dtype == kv_cache.dtype, f"q dtype {q.dtype} != kv_cache dtype {kv_cache.dtype}")
    check(
        q.device == kv_cache.device == cache_seqlens.device,
        "q, kv_cache and cache_seqlens must share a device",
    )
    check(
        cache_seqlens.shape == (q.shape[0],) and not cache_seqlens.is_floating_point(),
        "cache_seqlens must be (B,) ints",
    )
    if DEBUG:
        lo, hi = torch.stack(torch.aminmax(cache_seqlens)).tolist()
        check(
            lo >= 0 and hi <= kv_cache.shape[1],
            f"cache_seqlens in [{lo}, {hi}] fall outside the allocated cache length [0, {kv_cache.shape[1]}]",
        )
    check(num_splits is None or num_splits >= 1, "num_splits must be >= 1")
    if use_triton(backend, (q, kv_cache)):
        return mla_decode_triton(q, kv_cache, cache_seqlens, softmax_scale, kv_lora_rank, num_splits)
    out, lse = mla_decode_ref_absorbed(q, kv_cache, cache_seqlens, softmax_scale, kv_lora_rank)
    return out.to(q.dtype), lse.float()


def mla_decode_full(
    q_nope, q_pe, kv_cache, cache_seqlens, W_UK, W_UV, softmax_scale, num_splits=None, backend="auto"
):
    """Absorbed decode around `mla_decode`: q_nope (B, H, d_N), q_pe (B, H, d_R) rotated, W_UK (G, d_N, r),
    W_UV (G, d_V, r) -> (B, H, d_V). Head h uses group h // (H/G); the repeat is never materialised."""
    (B, H, d_N), (G, _, r) = q_nope.shape, W_UK.shape
    check(
        H % G == 0 and W_UK.shape[1] == d_N and W_UV.shape[0] == G and W_UV.shape[2] == r,
        f"W_UK {tuple(W_UK.shape)} / W_UV {tuple(W_UV.shape)} do not fit q_nope {tuple(q_nope.shape)}",
    )
    q_lat = torch.einsum("bgmd,gdr->bgmr", q_nope.reshape(B, G, H // G, d_N), W_UK)  # (B, G, H/G, r)
    q = torch.cat([q_lat.reshape(B, H, r), q_pe], -1)  # (B, H, r + d_R)
    out_lat, _ = mla_decode(q, kv_cache, cache_seqlens, softmax_scale, r, num_splits, backend)  # (B, H, r)
    out = torch.einsum("bgmr,gvr->bgmv", out_lat.reshape(B, G, H // G, r), W_UV)  # (B, G, H/G, d_V)
    return out.reshape(B, H, -1)


# ----------------------------------------------------------------------------- self-test and timings
def _self_test(dev, kernel):
    """Every backend and split count against the fp64 decompressed oracle at the 135m MLA shape
    (model.SIZES), r not a power of 2, ragged rows with NaN in every unused slot."""
    B, H, G, r, d_R, d_N, d_V = 4, 9, 3, 48, 32, 32, 64
    scale, lens = (d_N + d_R) ** -0.5, torch.tensor([0, 1, 65, 300], device=dev)
    kv = torch.randn(B, 320, r + d_R, device=dev)
    kv[torch.arange(320, device=dev)[None] >= lens[:, None]] = float("nan")  # unused slots must never be read
    q_nope, q_pe = torch.randn(B, H, d_N, device=dev), torch.randn(B, H, d_R, device=dev)
    W_UK, W_UV = torch.randn(G, d_N, r, device=dev) / 6, torch.randn(G, d_V, r, device=dev) / 6
    args64 = (t.double() for t in (q_nope, q_pe, kv))
    ref = mla_decode_ref_naive(*args64, lens, W_UK.double(), W_UV.double(), scale)
    for be, splits in [("torch", None)] + [("triton", None), ("triton", 1), ("triton", 7)] * kernel:
        out = mla_decode_full(q_nope, q_pe, kv, lens, W_UK, W_UV, scale, splits, be)
        err = (out.double() - ref).abs().max().item()
        verdict = "OK" if err < 1e-4 else "NOT OK"
        print(f"{be:6s} splits={splits}: max abs diff vs decompressed fp64 {err:.1e} {verdict}")
        assert err < 1e-4
    if not kernel:
        print("kernel check skipped: no CUDA and TRITON_INTERPRET != 1")


def _cpu_timing():
    """135m sizes: absorbed reads r + d_R per token once; naive first decompresses H keys and values."""
    H, G, r, d_R, d_N, d_V, S = 9, 3, 48, 32, 32, 64, 4096
    qn, qp = torch.randn(1, H, d_N), torch.randn(1, H, d_R)
    W_UK, W_UV = torch.randn(G, d_N, r) / 6, torch.randn(G, d_V, r) / 6
    kv, lens, scale = torch.randn(1, S, r + d_R), torch.tensor([S]), (d_N + d_R) ** -0.5

    def absorbed():
        return mla_decode_full(qn, qp, kv, lens, W_UK, W_UV, scale, backend="torch")

    def naive():
        return mla_decode_ref_naive(qn, qp, kv, lens, W_UK, W_UV, scale)

    for name, fn in [("torch absorbed", absorbed), ("torch naive", naive)]:
        fn()
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        ms = (time.perf_counter() - t0) / 10 * 1e3
        print(f"{name:15s} B=1 H={H} S={S} fp32 cpu ({torch.get_num_threads()} threads): {ms:.2f} ms")


def _gpu_timing():
    """The launch wrapper alone in bf16 at 1b's r_kv = 128, d_R = 32, as achieved cache-read bandwidth."""
    p = torch.cuda.get_device_properties(0)
    bw = getattr(p, "memory_clock_rate", 0) * 1e3 * getattr(p, "memory_bus_width", 0) / 4  # DDR: 2 per clock
    peak = bw or 3.35e12  # the H100 SXM datasheet's 3.35 TB/s when torch reports no clock and bus width
    for b, S, h in [(1, 16384, 16), (64, 4096, 16), (64, 4096, 32)]:
        kv = torch.randn(b, S, 128 + 32, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(b, h, 128 + 32, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((b,), S, device="cuda")
        ms = triton.testing.do_bench(lambda: mla_decode_triton(q, kv, lens, 0.125, 128))
        gbs = kv.nbytes / ms / 1e6
        print(
            f"triton bf16 b={b} S={S} h={h} r=128 d_R=32: {ms * 1e3:.1f} us, cache read {gbs:.0f} GB/s "
            f"= {gbs * 1e9 / peak:.0%} of {peak / 1e9:.0f} GB/s peak"
        )


if __name__ == "__main__":
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    _self_test(dev, HAS_TRITON and (dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"))
    _cpu_timing()
    if dev == "cuda" and HAS_TRITON:
        _gpu_timing()
