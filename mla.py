"""Multi-head latent attention (MLA): the layer, its latent cache, absorbed decode and a Triton split-KV kernel.

Paper stage: the MLA layers of the Zebra-Llama hybrid (paper.md §3 math, §16 inference path; kernels.md §4, §7.2).
Per token x: q = W_UQ W_DQ x split per head into [q^N (d_N) ; q^R (d_R)]; [c ; k^R] = W_DKV x with c the r_kv latent and
k^R one rope key shared by all heads; per KV group g, [k^N_g ; v_g] = W_UKV,g c; head h uses group h // (H/n_kv).
Logits τ(q^N·k^N + q^R·k^R) with τ = (d_N + d_R)^-1/2 -- the per-head width, never the latent width r_kv + d_R.
RoPE (paper.md §3.4, the [project] choice, not the official YaRN): the rope block reuses the teacher's rotation pairs
`rope_pairs` (half-split: first members, then second members) with the teacher's own cos/sin tables; no mscale.

Cache: a plain tensor (B, S_max, r_kv + d_R), each row [c ; already-rotated k^R] -- r_kv + d_R values per token per
layer (160 at 1B, vs 2·n_kv·d_h = 1024 for the GQA teacher). Absorption (decode): since k^N_s = W_UK,g c_s,
  q^N·k^N_s = (W_UK,gᵀ q^N)·c_s = q̃·c_s   and   Σ_s p_s v_s = W_UV,g (Σ_s p_s c_s),
so decode is MQA with one shared 'head' [c ; k^R]: q = [q̃ ; q^R] (r_kv + d_R), keys the cache rows, values their c.
Training/prefill decompresses K and V instead and calls SDPA. The Triton kernels are forward-only (decode).
Run: `python mla.py` (torch check + CPU timings), `TRITON_INTERPRET=1 python mla.py` (also the kernel on CPU),
on a GPU it also times the kernel; tests: `python -m pytest tests/test_mla.py`.
"""

import os
import time

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the torch paths need no triton
    HAS_TRITON = False


def _check(ok, msg):
    if not ok:
        raise ValueError(msg)


# ----------------------------------------------------------------------------- torch references for decode
def mla_decode_ref_absorbed(q, kv_cache, cache_seqlens, softmax_scale, kv_lora_rank):
    """Absorbed decode in fp32 (fp64 if q is): q (B, H, r + d_R) = [q̃ ; q^R] → (out_latent (B, H, r), lse (B, H)).

    Example: one cached row [c ; k] gives out_latent = c and lse = τ·q·[c ; k]. An empty row gives 0 and -inf.
    """
    dt = torch.promote_types(q.dtype, torch.float32)
    S = (
        int(cache_seqlens.max()) if cache_seqlens.numel() else 0
    )  # slots past every row's length are never read
    valid = torch.arange(S, device=q.device)[None, :] < cache_seqlens[:, None]  # (B, S)
    kv = kv_cache[:, :S].to(dt)  # (B, S, r + d_R)
    if not bool(valid.all()):  # ragged rows: zero the slots past each length, as 0·NaN would still be NaN
        kv = torch.where(valid[..., None], kv, 0)
    s = torch.einsum("bhd,bsd->bhs", q.to(dt), kv) * softmax_scale  # (B, H, S)
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)  # (B, H)
    p = torch.exp(
        s - lse.masked_fill(lse == float("-inf"), 0)[..., None]
    )  # (B, H, S); an empty row gives 0, not NaN
    return torch.einsum("bhs,bsr->bhr", p, kv[..., :kv_lora_rank]), lse


def mla_decode_ref_naive(q_nope, q_pe, kv_cache, cache_seqlens, W_UK, W_UV, softmax_scale):
    """Decompressed decode, one row at a time: per-head K = [W_UK c ; k^R], V = W_UV c materialised → (B, H, d_V)."""
    (B, H, _), (G, _, r) = q_nope.shape, W_UK.shape
    dt = torch.promote_types(q_nope.dtype, torch.float32)
    W_UK, W_UV = W_UK.to(dt), W_UV.to(dt)
    out = torch.zeros(B, H, W_UV.shape[1], dtype=dt, device=q_nope.device)
    for b in range(B):
        n = int(cache_seqlens[b])
        c, k_pe = kv_cache[b, :n, :r].to(dt), kv_cache[b, :n, r:].to(dt)  # (n, r), (n, d_R)
        k = torch.cat(
            [torch.einsum("sr,gdr->gsd", c, W_UK), k_pe.expand(G, n, k_pe.shape[1])], -1
        )  # (G, n, d_N+d_R)
        v = torch.einsum("sr,gvr->gsv", c, W_UV)  # (G, n, d_V)
        k, v = (
            k.repeat_interleave(H // G, 0),
            v.repeat_interleave(H // G, 0),
        )  # (H, n, ·): head h → group h // (H/G)
        q = torch.cat([q_nope[b], q_pe[b]], -1).to(dt)  # (H, d_N + d_R)
        p = torch.softmax(torch.einsum("hd,hsd->hs", q, k) * softmax_scale, -1)  # (H, n)
        out[b] = torch.einsum("hs,hsv->hv", p, v)
    return out


# ----------------------------------------------------------------------------- Triton kernels (forward only)
if HAS_TRITON:

    @triton.jit
    def _mla_decode_split_kernel(
        Q,
        KV,
        Seqlens,
        O_part,
        LSE_part,
        H,
        R,
        DR,
        split_len,
        scale,
        s_qb,
        s_qh,
        s_qd,
        s_kb,
        s_ks,
        s_kd,
        s_ob,
        s_oh,
        s_os,
        s_or,
        s_lb,
        s_lh,
        s_ls,
        BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_DR: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Stage 1, grid (B, cdiv(H, BLOCK_H), splits): BLOCK_H heads over one slice of one row's cache."""
        pid_b = tl.program_id(0).to(tl.int64)  # int64 before any stride math
        pid_h, pid_s = tl.program_id(1), tl.program_id(2)
        seqlen = tl.load(Seqlens + pid_b)
        start = pid_s * split_len
        end = tl.minimum(start + split_len, seqlen)  # end <= start: an empty split, the loop below never runs
        offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_r, offs_p = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_DR)
        mask_h, mask_r, mask_p = offs_h < H, offs_r < R, offs_p < DR  # r need not be a power of 2 (48, 160)
        # q is loaded once and reused for every cache block; all BLOCK_H heads share each loaded cache row
        q_ptr = Q + pid_b * s_qb + offs_h[:, None] * s_qh
        q_lat = tl.load(q_ptr + offs_r[None, :] * s_qd, mask=mask_h[:, None] & mask_r[None, :], other=0.0).to(
            tl.float32
        )
        q_pe = tl.load(
            q_ptr + (R + offs_p)[None, :] * s_qd, mask=mask_h[:, None] & mask_p[None, :], other=0.0
        ).to(tl.float32)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            kv_ptr = KV + pid_b * s_kb + offs_n.to(tl.int64)[:, None] * s_ks
            # masked loads read 0 for slots >= seqlen, so NaN there cannot reach the P·c dot
            c = tl.load(
                kv_ptr + offs_r[None, :] * s_kd, mask=mask_n[:, None] & mask_r[None, :], other=0.0
            ).to(tl.float32)
            k_pe = tl.load(
                kv_ptr + (R + offs_p)[None, :] * s_kd, mask=mask_n[:, None] & mask_p[None, :], other=0.0
            ).to(tl.float32)
            # two dots, latent block + rope block, instead of padding r + d_R to a power of 2 (kernels.md §4.5)
            s = tl.dot(q_lat, tl.trans(c), input_precision=PRECISION)
            s = tl.dot(q_pe, tl.trans(k_pe), acc=s, input_precision=PRECISION) * scale  # (BLOCK_H, BLOCK_N)
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds >= 1 valid token
            alpha = tl.exp(m_i - m_new)  # rescales what was summed under the old max (0 on the first block)
            p = tl.exp(s - m_new[:, None])  # masked lanes: exp(-inf) = 0
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p, c, acc=acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)  # empty split: out 0, lse -inf
        o_ptr = O_part + pid_b * s_ob + pid_s * s_os + offs_h[:, None] * s_oh + offs_r[None, :] * s_or
        tl.store(o_ptr, acc / l_safe[:, None], mask=mask_h[:, None] & mask_r[None, :])
        tl.store(LSE_part + pid_b * s_lb + pid_s * s_ls + offs_h * s_lh, m_i + tl.log(l_safe), mask=mask_h)

    @triton.jit
    def _mla_decode_reduce_kernel(
        O_part,
        LSE_part,
        Seqlens,
        Out,
        LSE,
        R,
        split_len,
        s_ob,
        s_oh,
        s_os,
        s_or,
        s_lb,
        s_lh,
        s_ls,
        s_yb,
        s_yh,
        s_yr,
        s_eb,
        s_eh,
        BLOCK_R: tl.constexpr,
    ):
        """Stage 2, grid (B, H): LSE-weighted merge of the non-empty splits of one (row, head)."""
        pid_b, pid_h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        seqlen = tl.load(Seqlens + pid_b)
        offs_r = tl.arange(0, BLOCK_R)
        # the same online softmax, one split at a time: a partial is already normalised, so its weight is exp(lse_s)
        m, l, acc = float("-inf"), 0.0, tl.zeros([BLOCK_R], tl.float32)
        for sp in range(
            0, tl.cdiv(seqlen, split_len)
        ):  # only splits that hold tokens; the rest are never read
            lse_s = tl.load(LSE_part + pid_b * s_lb + pid_h * s_lh + sp * s_ls)
            o_s = tl.load(
                O_part + pid_b * s_ob + pid_h * s_oh + sp * s_os + offs_r * s_or, mask=offs_r < R, other=0.0
            )
            m_new = tl.maximum(m, lse_s)
            alpha, w = tl.exp(m - m_new), tl.exp(lse_s - m_new)
            acc, l, m = acc * alpha + w * o_s, l * alpha + w, m_new
        l_safe = tl.where(l > 0, l, 1.0)  # zero-length row: out 0, lse -inf (FlashMLA uses +inf)
        tl.store(Out + pid_b * s_yb + pid_h * s_yh + offs_r * s_yr, acc / l_safe, mask=offs_r < R)
        tl.store(LSE + pid_b * s_eb + pid_h * s_eh, m + tl.log(l_safe))


# ----------------------------------------------------------------------------- launch wrapper and dispatchers
def _mla_decode_triton(q, kv_cache, cache_seqlens, softmax_scale, kv_lora_rank, num_splits, max_len):
    (B, H, D), r = q.shape, kv_lora_rank
    BLOCK_H, BLOCK_R = 16, max(16, triton.next_power_of_2(r))
    BLOCK_DR = max(16, triton.next_power_of_2(D - r))  # 16: the smallest dot the GPU accepts
    # ptxas -v, sm_90, bf16: these pairs keep the (BLOCK_N, BLOCK_R) latent tile in registers without spills
    BLOCK_N, num_warps = (64, 4) if BLOCK_R <= 128 else (32, 4) if BLOCK_R <= 256 else (32, 8)
    seqlens = cache_seqlens.to(torch.int32).contiguous()
    n_blocks = max(1, triton.cdiv(max_len, BLOCK_N))
    if num_splits is None:  # ~2 programs per SM (kernels.md §7.2); a small constant under the interpreter
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        num_splits = min(max(1, triton.cdiv(2 * sms, B * triton.cdiv(H, BLOCK_H))), n_blocks)
    split_len = triton.cdiv(n_blocks, num_splits) * BLOCK_N  # a multiple of BLOCK_N; extra splits stay empty
    o_part = torch.empty(B, H, num_splits, r, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # bf16/fp16 values are exact in tf32
    _mla_decode_split_kernel[(B, triton.cdiv(H, BLOCK_H), num_splits)](
        q,
        kv_cache,
        seqlens,
        o_part,
        lse_part,
        H,
        r,
        D - r,
        split_len,
        softmax_scale,
        *q.stride(),
        *kv_cache.stride(),
        *o_part.stride(),
        *lse_part.stride(),
        BLOCK_H=BLOCK_H,
        BLOCK_N=BLOCK_N,
        BLOCK_R=BLOCK_R,
        BLOCK_DR=BLOCK_DR,
        PRECISION=precision,
        num_warps=num_warps,
        num_stages=2,
    )
    out = torch.empty(B, H, r, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, dtype=torch.float32, device=q.device)
    _mla_decode_reduce_kernel[(B, H)](
        o_part,
        lse_part,
        seqlens,
        out,
        lse,
        r,
        split_len,
        *o_part.stride(),
        *lse_part.stride(),
        *out.stride(),
        *lse.stride(),
        BLOCK_R=BLOCK_R,
    )
    return out, lse


def mla_decode(q, kv_cache, cache_seqlens, softmax_scale, kv_lora_rank, num_splits=None, backend="auto"):
    """One query token per row: q (B, H, r + d_R), kv_cache (B, S_max, r + d_R), cache_seqlens (B,) ints ≥ 0
    → (out_latent (B, H, r) in q's dtype, lse (B, H) fp32). backend "auto": Triton for CUDA tensors without grad.
    num_splits=None picks ~2 programs per SM; a fixed count fixes the summation order (run-to-run determinism)."""
    _check(
        softmax_scale is not None and softmax_scale > 0,
        "softmax_scale is required: pass (d_nope + d_rope) ** -0.5",
    )
    _check(
        q.dim() == 3 and kv_cache.dim() == 3,
        f"q must be (B, H, D) and kv_cache (B, S, D), got {tuple(q.shape)} and {tuple(kv_cache.shape)}",
    )
    _check(
        q.shape[0] == kv_cache.shape[0] and q.shape[2] == kv_cache.shape[2] and 0 < kv_lora_rank < q.shape[2],
        f"q {tuple(q.shape)} and kv_cache {tuple(kv_cache.shape)} disagree (kv_lora_rank {kv_lora_rank})",
    )
    _check(q.dtype == kv_cache.dtype, f"q dtype {q.dtype} != kv_cache dtype {kv_cache.dtype}")
    _check(
        q.device == kv_cache.device == cache_seqlens.device,
        "q, kv_cache and cache_seqlens must share a device",
    )
    _check(
        cache_seqlens.shape == (q.shape[0],) and not cache_seqlens.is_floating_point(),
        "cache_seqlens must be (B,) ints",
    )
    lo, hi = torch.stack(torch.aminmax(cache_seqlens)).tolist()  # one host sync for both bounds
    _check(
        lo >= 0 and hi <= kv_cache.shape[1],
        f"cache_seqlens up to {hi} exceed the allocated cache length {kv_cache.shape[1]}",
    )
    _check(num_splits is None or num_splits >= 1, "num_splits must be >= 1")
    _check(backend in ("auto", "torch", "triton"), f"unknown backend {backend!r}")
    if backend == "auto":
        backend = (
            "triton"
            if HAS_TRITON and q.is_cuda and not (torch.is_grad_enabled() and q.requires_grad)
            else "torch"
        )
    if backend == "torch":
        out, lse = mla_decode_ref_absorbed(q, kv_cache, cache_seqlens, softmax_scale, kv_lora_rank)
        return out.to(q.dtype), lse.float()
    _check(
        HAS_TRITON and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"),
        "backend='triton' needs triton and CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)",
    )
    return _mla_decode_triton(q, kv_cache, cache_seqlens, softmax_scale, kv_lora_rank, num_splits, hi)


def mla_decode_full(
    q_nope, q_pe, kv_cache, cache_seqlens, W_UK, W_UV, softmax_scale, num_splits=None, backend="auto"
):
    """Absorbed decode around `mla_decode`: q_nope (B, H, d_N), q_pe (B, H, d_R) rotated, W_UK (G, d_N, r),
    W_UV (G, d_V, r) → (B, H, d_V). Head h uses group h // (H/G); the repeat is never materialised."""
    (B, H, dN), (G, _, r) = q_nope.shape, W_UK.shape
    _check(
        H % G == 0 and W_UK.shape[1] == dN and W_UV.shape[0] == G and W_UV.shape[2] == r,
        f"W_UK {tuple(W_UK.shape)} / W_UV {tuple(W_UV.shape)} do not fit q_nope {tuple(q_nope.shape)}",
    )
    q_lat = torch.einsum("bgmd,gdr->bgmr", q_nope.reshape(B, G, H // G, dN), W_UK).reshape(
        B, H, r
    )  # (B, H, r)
    out_lat, _ = mla_decode(
        torch.cat([q_lat, q_pe], -1), kv_cache, cache_seqlens, softmax_scale, r, num_splits, backend
    )  # (B, H, r)
    return torch.einsum("bgmr,gvr->bgmv", out_lat.reshape(B, G, H // G, r), W_UV).reshape(
        B, H, -1
    )  # (B, H, d_V)


# ----------------------------------------------------------------------------- self-test and timings
if __name__ == "__main__":
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    kernel = HAS_TRITON and (dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    B, H, G, r, dR, dN, dV = 4, 9, 3, 48, 32, 32, 64  # 135m MLA shapes (paper.md §8.4), r not a power of 2
    scale, lens = (dN + dR) ** -0.5, torch.tensor([0, 1, 65, 300], device=dev)
    kv = torch.randn(B, 320, r + dR, device=dev)
    kv[torch.arange(320, device=dev)[None] >= lens[:, None]] = float("nan")  # unused slots must never be read
    q_nope, q_pe = torch.randn(B, H, dN, device=dev), torch.randn(B, H, dR, device=dev)
    W_UK, W_UV = torch.randn(G, dN, r, device=dev) / 6, torch.randn(G, dV, r, device=dev) / 6
    ref = mla_decode_ref_naive(
        q_nope.double(), q_pe.double(), kv.double(), lens, W_UK.double(), W_UV.double(), scale
    )
    for be, splits in [("torch", None)] + [("triton", None), ("triton", 1), ("triton", 7)] * kernel:
        err = (
            (mla_decode_full(q_nope, q_pe, kv, lens, W_UK, W_UV, scale, splits, be).double() - ref)
            .abs()
            .max()
            .item()
        )
        print(
            f"{be:6s} splits={splits}: max abs diff vs decompressed fp64 {err:.1e} {'OK' if err < 1e-4 else 'NOT OK'}"
        )
        assert err < 1e-4
    if not kernel:
        print("kernel check skipped: no CUDA and TRITON_INTERPRET != 1")
    # CPU timing, 135m sizes: the absorbed form reads r + d_R per token once; naive first decompresses H keys/values
    S, qn, qp, W_UK, W_UV = 4096, q_nope[:1].cpu(), q_pe[:1].cpu(), W_UK.cpu(), W_UV.cpu()
    kv, lens1 = torch.randn(1, S, r + dR), torch.tensor([S])
    for name, fn in [
        ("torch absorbed", lambda: mla_decode_full(qn, qp, kv, lens1, W_UK, W_UV, scale, backend="torch")),
        ("torch naive", lambda: mla_decode_ref_naive(qn, qp, kv, lens1, W_UK, W_UV, scale)),
    ]:
        fn()
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        print(
            f"{name:15s} B=1 H={H} S={S} fp32 cpu ({torch.get_num_threads()} threads): "
            f"{(time.perf_counter() - t0) / 10 * 1e3:.2f} ms"
        )
    if dev == "cuda" and HAS_TRITON:
        p = torch.cuda.get_device_properties(0)
        bw = (
            getattr(p, "memory_clock_rate", 0) * 1e3 * getattr(p, "memory_bus_width", 0) / 4
        )  # DDR: 2 transfers/clock
        peak = (
            bw or 3.35e12
        )  # H100 SXM datasheet (kernels.md §6) when torch does not report clock and bus width
        for b, S, h in [(1, 16384, 16), (64, 4096, 16), (64, 4096, 32)]:
            kv = torch.randn(b, S, 128 + 32, device=dev, dtype=torch.bfloat16)
            q = torch.randn(b, h, 128 + 32, device=dev, dtype=torch.bfloat16)
            lens_b = torch.full((b,), S, device=dev)
            # the launch wrapper alone: mla_decode's input checks add a host sync that is not kernel time
            ms = triton.testing.do_bench(lambda: _mla_decode_triton(q, kv, lens_b, 0.125, 128, None, S))
            print(
                f"triton bf16 b={b} S={S} h={h} r=128 d_R=32: {ms * 1e3:.1f} us, cache read "
                f"{kv.nbytes / ms / 1e6:.0f} GB/s = {kv.nbytes / ms / 1e-3 / peak:.0%} of {peak / 1e9:.0f} GB/s peak"
            )
