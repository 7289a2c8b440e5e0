"""Mamba2 selective scan (SSD): the sequence mixer of the hybrid's Mamba2 layers (paper.md §5), for prefill/training and decode.

Per batch row and head h (state S of shape P×N, A_h < 0 one scalar per head):
    Δ_t = clamp(softplus(dt_t + dt_bias_h), dt_limit)    S_t = exp(Δ_t·A_h)·S_{t−1} + Δ_t·x_t ⊗ B_t    y_t = S_t·C_t + D_h·x_t
x (b, L, g_x, P), B (b, L, g_B, N) and C (b, L, g_C, N) each carry their own group count and head i reads group i // (H/g):
Zebra passes x and B per KV group and C per head, so nothing is repeated in memory. The chunked ("SSD") form cuts the
sequence into chunks of Q tokens: inside a chunk y = ((C·Bᵀ) ∘ exp(cs_i − cs_j) ∘ causal ∘ Δ_j)·x with cs = cumsum(A·Δ),
and one P×N state per chunk boundary carries everything earlier (kernels.md §0, §3, §7.1).
Three tiers, tested pairwise: `ssm_scan_ref` (the sequential loop, ground truth), `ssd_chunked` (differentiable torch, the
training path on every device) and Triton kernels (chunked prefill, decode step). Triton is forward-only in v1: training
autograd goes through `ssd_chunked`; a Triton backward is a later goal (kernels.md §9). Public calls: `ssd`, `ssm_step`.
Run: `python ssm_scan.py` (self-test + timing table; with TRITON_INTERPRET=1 it also checks the kernels on CPU),
     `python -m pytest tests/test_ssm_scan.py`.
"""

import math
import os
import statistics
import timeit

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the torch paths work without triton
    HAS_TRITON = False

# ----------------------------------------------------------------------------- torch references


def _acc_dtype(t):  # bf16/fp16/fp32 inputs compute in fp32; fp64 inputs stay fp64 (the ground-truth runs)
    return torch.promote_types(t.dtype, torch.float32)


def _heads(t, h):
    """(..., g, k) -> (..., h, k): head i reads group i // (h/g), the GQA-style repeat of paper.md §5.2."""
    return t.repeat_interleave(h // t.shape[-2], dim=-2)


def process_dt(dt, dt_bias=None, dt_softplus=True, dt_limit=(0.0, math.inf)):
    """Raw dt (..., h) -> step size Δ (..., h): + dt_bias, softplus (identity above 20, like F.softplus), clamp to dt_limit.
    The clamp is applied on every path, also in decode (upstream's step skips it, kernels.md §1.3)."""
    dt = dt.to(_acc_dtype(dt))
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(dt_limit[0], dt_limit[1])


def _recur(S, x, delta, A, B, C):
    """One token for all heads, as the equations read. S (b, h, p, n), x (b, h, p), delta (b, h), B and C (b, h, n)."""
    decay = torch.exp(delta * A)[..., None, None]  # (b, h, 1, 1)
    S = decay * S + (delta[..., None] * x)[..., None] * B[..., None, :]  # (b, h, p, n)
    return S, torch.einsum("bhpn,bhn->bhp", S, C)  # new state, y (b, h, p)


def ssm_scan_ref(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    dt_bias=None,
    dt_softplus=True,
    dt_limit=(0.0, math.inf),
    initial_state=None,
    return_final_state=False,
):
    """The sequential recurrence, token by token: ground truth for outputs, final state and (via autograd) gradients."""
    (b, L, _, p), h, n, acc = x.shape, dt.shape[2], B.shape[3], _acc_dtype(x)
    delta = process_dt(dt, dt_bias, dt_softplus, dt_limit).to(acc)  # (b, L, h)
    xs, Bs, Cs = (_heads(t.to(acc), h) for t in (x, B, C))  # (b, L, h, p | n)
    S = x.new_zeros(b, h, p, n, dtype=acc) if initial_state is None else initial_state.to(acc)
    ys = []
    for t in range(L):
        S, y = _recur(S, xs[:, t], delta[:, t], A, Bs[:, t], Cs[:, t])
        ys.append(y)
    y = torch.stack(ys, dim=1)  # (b, L, h, p)
    if D is not None:
        y = y + D[:, None] * xs
    return (y.to(x.dtype), S) if return_final_state else y.to(x.dtype)


def chunk_cumsum(delta, A, chunk_size):
    """Δ (b, L, h) -> (dt, cs), each (b, h, c, Q). Δ is zero-padded to whole chunks: A·0 = 0 (decay 1) and 0·x = 0 (no input),
    so the padding changes nothing. cs is the in-chunk cumsum of A·Δ (the log-decay), non-increasing since A < 0 ≤ Δ."""
    (b, L, h), c = delta.shape, -(-delta.shape[1] // chunk_size)  # c chunks, the last one zero-padded
    dt = F.pad(delta, (0, 0, 0, c * chunk_size - L))  # (b, c·Q, h)
    dt = dt.reshape(b, c, chunk_size, h).permute(0, 3, 1, 2)  # (b, h, c, Q)
    return dt, torch.cumsum(dt * A[:, None, None], dim=-1)


def _chunked(t, h, c, Q, dtype):
    """(b, L, g, k) -> (b, h, c, Q, k): head i reads group i // (h/g), zero-padded to c·Q tokens, cut into chunks.
    One copy, straight into the contiguous layout the batched matmuls below want."""
    b, L, g, k = t.shape
    out = t.new_zeros(b, g, h // g, c * Q, k, dtype=dtype)  # zeros past L: the padding
    out[:, :, :, :L] = t.transpose(1, 2)[:, :, None]  # (b, g, 1, L, k), broadcast over h/g heads
    return out.reshape(b, h, c, Q, k)  # (b, h, c, Q, k)


def chunk_states(x, B, dt, cs):
    """The state each chunk builds alone from zero: Σ_k x_k ⊗ B_k · Δ_k · exp(cs_last − cs_k) -> (b, c, h, p, n)."""
    h, c, Q = dt.shape[1:]
    xc, Bc = _chunked(x, h, c, Q, dt.dtype), _chunked(B, h, c, Q, dt.dtype)  # (b, h, c, Q, p | n)
    w = dt * torch.exp(cs[..., -1:] - cs)  # (b, h, c, Q); exponent ≤ 0
    return ((xc * w[..., None]).transpose(-1, -2) @ Bc).transpose(1, 2)  # (b, h, c, p, n) -> (b, c, h, p, n)


def state_passing(states, cs, initial_state=None):
    """Walk the chunks in order, S ← exp(cs_last[c])·S + states[c]. Returns the state entering each chunk (b, c, h, p, n)
    and the final state (b, h, p, n). A plain loop over chunks: c = L/Q steps instead of L."""
    S = torch.zeros_like(states[:, 0]) if initial_state is None else initial_state.to(states.dtype)
    decay = torch.exp(cs[..., -1])[..., None, None]  # (b, h, c, 1, 1): each chunk's total decay
    prev = []
    for c in range(states.shape[1]):
        prev.append(S)
        S = decay[:, :, c] * S + states[:, c]  # (b, h, p, n)
    return torch.stack(prev, dim=2).transpose(1, 2), S  # (b, h, c, p, n) in memory, for chunk_outputs


def chunk_outputs(x, B, C, dt, cs, prev_states, D=None):
    """y (b, c·Q, h, p) = diagonal block (tokens of the same chunk) + off-diagonal (the state entering the chunk) + D·x."""
    h, c, Q = dt.shape[1:]
    xc, Bc, Cc = (_chunked(t, h, c, Q, dt.dtype) for t in (x, B, C))  # (b, h, c, Q, p | n)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=dt.device).tril()
    # mask BEFORE exp: above the diagonal cs_i − cs_j > 0 may overflow to inf, and inf·0 gives NaN gradients (kernels.md §3)
    decay = torch.exp(
        (cs[..., :, None] - cs[..., None, :]).masked_fill(~causal, -math.inf)
    )  # (b, h, c, Q, Q)
    y = ((Cc @ Bc.transpose(-1, -2)) * decay * dt[..., None, :]) @ xc  # (b, h, c, Q, p) diagonal blocks
    y = (
        y + (Cc @ prev_states.transpose(1, 2).transpose(-1, -2)) * torch.exp(cs)[..., None]
    )  # C_i·S_prevᵀ·exp(cs_i)
    if D is not None:
        y = y + D[:, None, None, None] * xc
    return y.permute(0, 2, 3, 1, 4).reshape(y.shape[0], c * Q, h, -1)  # (b, c·Q, h, p)


def ssd_chunked(
    x,
    dt,
    A,
    B,
    C,
    chunk_size=64,
    D=None,
    dt_bias=None,
    dt_softplus=True,
    dt_limit=(0.0, math.inf),
    initial_state=None,
    return_final_state=False,
):
    """Chunked SSD in plain torch, differentiable, any length: the training path (ssd_minimal's four steps as batched matmuls)."""
    delta = process_dt(dt, dt_bias, dt_softplus, dt_limit).to(_acc_dtype(x))  # (b, L, h)
    dts, cs = chunk_cumsum(delta, A, chunk_size)  # (b, h, c, Q) each
    prev, final = state_passing(chunk_states(x, B, dts, cs), cs, initial_state)
    y = chunk_outputs(x, B, C, dts, cs, prev, D)[:, : x.shape[1]].to(x.dtype)  # (b, L, h, p)
    return (y, final) if return_final_state else y


def ssm_step_ref(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, math.inf)):
    """One decode step. state (b, h, p, n) is updated in place; x (b, g_x, p), dt (b, h), B (b, g_B, n), C (b, g_C, n)."""
    h, acc = dt.shape[1], state.dtype
    xs = _heads(x, h).to(acc)  # (b, h, p)
    delta = process_dt(dt, dt_bias, dt_softplus, dt_limit).to(acc)  # (b, h)
    S, y = _recur(state, xs, delta, A, _heads(B, h).to(acc), _heads(C, h).to(acc))
    state.copy_(S)
    if D is not None:
        y = y + D[:, None] * xs
    return y.to(x.dtype)  # (b, h, p)


# ----------------------------------------------------------------------------- Triton kernels (forward only)
# Rules (kernels.md §7): program ids go int64 before any stride product (mamba #1015: int32 offsets overflow past ~61k tokens);
# loads are upcast to fp32 at once; every exp of a cumsum difference is exp(min(Δ, 0)); user tensors are addressed through
# their strides (views are fine), the fp32 buffers made here are contiguous and addressed from their sizes.

if HAS_TRITON:

    @triton.jit
    def _softplus(v):
        # log1p(exp(v)) from exp/log only (libdevice fails under the interpreter); log(w)·u/(w − 1) cancels the rounding of
        # w = 1 + u: 2e-7 relative error down to v = −88 (kernels.md §1.3). Identity above 20, like F.softplus.
        u = tl.exp(tl.minimum(v, 20.0))
        w = 1.0 + u
        return tl.where(v > 20.0, v, tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0)))

    @triton.jit
    def _chunk_state_kernel(
        x_ptr,
        dt_ptr,
        A_ptr,
        B_ptr,
        bias_ptr,
        dt_out_ptr,
        cs_ptr,
        st_ptr,
        L,
        P,
        N,
        nchunks,
        hx,
        hB,
        lo,
        hi,
        sxb,
        sxl,
        sxg,
        sxp,
        sdb,
        sdl,
        sdh,
        sBb,
        sBl,
        sBg,
        sBn,
        Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SOFTPLUS: tl.constexpr,
        PREC: tl.constexpr,
    ):
        """grid (nchunks, b, h): Δ and cs of one chunk, and the state it builds alone, Σ_k x_k ⊗ B_k·Δ_k·exp(cs_last − cs_k)."""
        c, b, hd = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
        H, A = tl.num_programs(2), tl.load(A_ptr + hd).to(tl.float32)
        offs_p, offs_n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
        x_base, B_base = (
            x_ptr + b * sxb + (hd // hx) * sxg,
            B_ptr + b * sBb + (hd // hB) * sBg,
        )  # head -> its groups
        out = ((b * H + hd) * nchunks + c) * Q  # dt, cs: (b, h, c, Q)
        acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        carry = 0.0  # cs at the end of the previous sub-block
        for k0 in range(
            0, Q, BLOCK_K
        ):  # sub-blocks keep GPU tiles small for long chunks; acc decays by each one's exp(ΣA·Δ)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            t = c * Q + offs_k
            valid = t < L
            dt = tl.load(dt_ptr + b * sdb + t * sdl + hd * sdh, mask=valid, other=0.0).to(tl.float32)
            if bias_ptr is not None:
                dt += tl.load(bias_ptr + hd).to(tl.float32)
            if SOFTPLUS:
                dt = _softplus(dt)
            dt = tl.where(valid, tl.minimum(tl.maximum(dt, lo), hi), 0.0)  # Δ = 0 past L: decay 1, no input
            cs = carry + tl.cumsum(dt * A, axis=0)
            tl.store(dt_out_ptr + out + offs_k, dt)
            tl.store(cs_ptr + out + offs_k, cs)
            last = tl.sum(
                tl.where(offs_k == k0 + BLOCK_K - 1, cs, 0.0), axis=0
            )  # cs's own last entry, as the torch step
            xt = tl.load(
                x_base + t[:, None] * sxl + offs_p[None, :] * sxp,
                mask=valid[:, None] & (offs_p[None, :] < P),
                other=0.0,
            ).to(tl.float32)  # (K, P)
            Bt = tl.load(
                B_base + t[:, None] * sBl + offs_n[None, :] * sBn,
                mask=valid[:, None] & (offs_n[None, :] < N),
                other=0.0,
            ).to(tl.float32)  # (K, N)
            w = dt * tl.exp(tl.minimum(last - cs, 0.0))
            acc = acc * tl.exp(last - carry) + tl.dot(tl.trans(xt), Bt * w[:, None], input_precision=PREC)
            carry = last
        st = st_ptr + ((b * nchunks + c) * H + hd) * P * N  # states: (b, c, h, p, n)
        tl.store(
            st + offs_p[:, None] * N + offs_n[None, :],
            acc,
            mask=(offs_p[:, None] < P) & (offs_n[None, :] < N),
        )

    @triton.jit
    def _state_passing_kernel(
        st_ptr, cs_ptr, init_ptr, prev_ptr, final_ptr, nchunks, dim, Q: tl.constexpr, BLOCK: tl.constexpr
    ):
        """grid (cdiv(p·n, BLOCK), b, h): S ← exp(cs_last[c])·S + states[c] over the chunks in order (the sequential part)."""
        pid, b, hd = (
            tl.program_id(0).to(tl.int64),
            tl.program_id(1).to(tl.int64),
            tl.program_id(2).to(tl.int64),
        )
        H, offs = tl.num_programs(2), pid * BLOCK + tl.arange(0, BLOCK)  # offs: flat index into the p·n state
        mask = offs < dim
        s = tl.zeros((BLOCK,), dtype=tl.float32)
        if init_ptr is not None:
            s += tl.load(init_ptr + (b * H + hd) * dim + offs, mask=mask, other=0.0)
        for c in range(nchunks):
            at = ((b * nchunks + c) * H + hd) * dim + offs  # (b, c, h, p·n)
            tl.store(prev_ptr + at, s, mask=mask)
            decay = tl.exp(tl.load(cs_ptr + ((b * H + hd) * nchunks + c) * Q + Q - 1))
            s = decay * s + tl.load(st_ptr + at, mask=mask, other=0.0)
        tl.store(final_ptr + (b * H + hd) * dim + offs, s, mask=mask)

    @triton.jit
    def _chunk_scan_kernel(
        x_ptr,
        B_ptr,
        C_ptr,
        dt_ptr,
        cs_ptr,
        prev_ptr,
        D_ptr,
        y_ptr,
        L,
        P,
        N,
        nchunks,
        hx,
        hB,
        hC,
        sxb,
        sxl,
        sxg,
        sxp,
        sBb,
        sBl,
        sBg,
        sBn,
        sCb,
        sCl,
        sCg,
        sCn,
        syb,
        syl,
        syh,
        syp,
        Q: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PREC: tl.constexpr,
    ):
        """grid (b·nchunks, cdiv(Q, BLOCK_M)·cdiv(p, BLOCK_P), h): BLOCK_M rows of one chunk's y = (C_i·S_prev)·exp(cs_i)
        + Σ_{j≤i} (C_i·B_j)·exp(cs_i − cs_j)·Δ_j·x_j + D·x. C·Bᵀ is recomputed per head (simpler than a per-group bmm)."""
        b, c = tl.program_id(0).to(tl.int64) // nchunks, tl.program_id(0).to(tl.int64) % nchunks
        pid_m, pid_p = tl.program_id(1) // tl.cdiv(P, BLOCK_P), tl.program_id(1) % tl.cdiv(P, BLOCK_P)
        hd, H = tl.program_id(2).to(tl.int64), tl.num_programs(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows, position inside the chunk
        offs_p, offs_n = pid_p * BLOCK_P + tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
        t_m, mask_n = c * Q + offs_m, offs_n[None, :] < N
        chunk = ((b * H + hd) * nchunks + c) * Q  # dt, cs: (b, h, c, Q)
        cs_m = tl.load(cs_ptr + chunk + offs_m)
        Cm = tl.load(
            C_ptr + b * sCb + (hd // hC) * sCg + t_m[:, None] * sCl + offs_n[None, :] * sCn,
            mask=(t_m[:, None] < L) & mask_n,
            other=0.0,
        ).to(tl.float32)  # (M, N)
        S = tl.load(
            prev_ptr + ((b * nchunks + c) * H + hd) * P * N + offs_p[:, None] * N + offs_n[None, :],
            mask=(offs_p[:, None] < P) & mask_n,
            other=0.0,
        )  # (P, N)
        acc = tl.dot(Cm, tl.trans(S), input_precision=PREC) * tl.exp(cs_m)[:, None]  # (M, P) off-diagonal
        x_base, B_base = x_ptr + b * sxb + (hd // hx) * sxg, B_ptr + b * sBb + (hd // hB) * sBg
        for k0 in range(0, (pid_m + 1) * BLOCK_M, BLOCK_M):  # causal: column blocks up to the diagonal
            offs_k = k0 + tl.arange(0, BLOCK_M)
            t_k = c * Q + offs_k
            Bk = tl.load(
                B_base + t_k[:, None] * sBl + offs_n[None, :] * sBn,
                mask=(t_k[:, None] < L) & mask_n,
                other=0.0,
            ).to(tl.float32)  # (K, N)
            xk = tl.load(
                x_base + t_k[:, None] * sxl + offs_p[None, :] * sxp,
                mask=(t_k[:, None] < L) & (offs_p[None, :] < P),
                other=0.0,
            ).to(tl.float32)  # (K, P)
            cs_k, dt_k = tl.load(cs_ptr + chunk + offs_k), tl.load(dt_ptr + chunk + offs_k)
            # exp(min(Δ, 0)): above the diagonal Δ > 0 may overflow, and inf·0 = NaN would poison the dot (kernels.md §1.2)
            w = tl.where(
                offs_m[:, None] >= offs_k[None, :],
                tl.exp(tl.minimum(cs_m[:, None] - cs_k[None, :], 0.0)),
                0.0,
            )
            CB = tl.dot(Cm, tl.trans(Bk), input_precision=PREC)  # (M, K)
            acc += tl.dot(CB * w * dt_k[None, :], xk, input_precision=PREC)
        mask_y = (t_m[:, None] < L) & (offs_p[None, :] < P)
        if D_ptr is not None:
            xm = tl.load(x_base + t_m[:, None] * sxl + offs_p[None, :] * sxp, mask=mask_y, other=0.0).to(
                tl.float32
            )
            acc += tl.load(D_ptr + hd).to(tl.float32) * xm
        tl.store(y_ptr + b * syb + t_m[:, None] * syl + hd * syh + offs_p[None, :] * syp, acc, mask=mask_y)

    @triton.jit
    def _ssm_step_kernel(
        state_ptr,
        x_ptr,
        dt_ptr,
        A_ptr,
        B_ptr,
        C_ptr,
        D_ptr,
        bias_ptr,
        y_ptr,
        P,
        N,
        hx,
        hB,
        hC,
        lo,
        hi,
        ssb,
        ssh,
        ssp,
        ssn,
        sxb,
        sxg,
        sxp,
        sdb,
        sdh,
        sBb,
        sBg,
        sBn,
        sCb,
        sCg,
        sCn,
        syb,
        syh,
        syp,
        BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SOFTPLUS: tl.constexpr,
    ):
        """grid (cdiv(p, BLOCK_P), b, h): one token; a [BLOCK_P × N] fp32 state tile, S = S·exp(A·Δ) + Δ·x ⊗ B, y = S·C + D·x."""
        pid_p, b, hd = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
        offs_p, offs_n = pid_p * BLOCK_P + tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
        mp, mn = offs_p < P, offs_n < N
        dt = tl.load(dt_ptr + b * sdb + hd * sdh).to(tl.float32)
        if bias_ptr is not None:
            dt += tl.load(bias_ptr + hd).to(tl.float32)
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.minimum(tl.maximum(dt, lo), hi)
        s_ptrs = state_ptr + b * ssb + hd * ssh + offs_p[:, None] * ssp + offs_n[None, :] * ssn
        S = tl.load(s_ptrs, mask=mp[:, None] & mn[None, :], other=0.0)
        x = tl.load(x_ptr + b * sxb + (hd // hx) * sxg + offs_p * sxp, mask=mp, other=0.0).to(tl.float32)
        Bv = tl.load(B_ptr + b * sBb + (hd // hB) * sBg + offs_n * sBn, mask=mn, other=0.0).to(tl.float32)
        Cv = tl.load(C_ptr + b * sCb + (hd // hC) * sCg + offs_n * sCn, mask=mn, other=0.0).to(tl.float32)
        S = S * tl.exp(tl.load(A_ptr + hd).to(tl.float32) * dt) + (dt * x)[:, None] * Bv[None, :]
        tl.store(s_ptrs, S, mask=mp[:, None] & mn[None, :])
        y = tl.sum(S * Cv[None, :], axis=1)
        if D_ptr is not None:
            y += tl.load(D_ptr + hd).to(tl.float32) * x
        tl.store(y_ptr + b * syb + hd * syh + offs_p * syp, y, mask=mp)

# ----------------------------------------------------------------------------- launch wrappers (inputs checked by ssd / ssm_step)


def _block(
    v,
):  # power-of-2 tile covering v (tl.arange needs powers of 2), ≥ 16: the GPU minimum for a tl.dot dimension
    return max(16, triton.next_power_of_2(v))


def _prec(
    x,
):  # fp32 inputs get exact fp32 dots (the GPU default, TF32, is ~1e-3 relative); 16-bit inputs are coarser anyway
    return "ieee" if x.dtype == torch.float32 else "tf32"


def chunk_state_fwd(x, dt, A, B, chunk_size, dt_bias=None, dt_softplus=True, dt_limit=(0.0, math.inf)):
    """Launch _chunk_state_kernel -> Δ, cs (b, h, c, Q) and chunk states (b, c, h, p, n), all fp32."""
    (b, L, gx, p), h, n, c = x.shape, dt.shape[2], B.shape[3], triton.cdiv(x.shape[1], chunk_size)
    f32 = dict(device=x.device, dtype=torch.float32)
    dts, cs, states = (
        torch.empty(b, h, c, chunk_size, **f32),
        torch.empty(b, h, c, chunk_size, **f32),
        torch.empty(b, c, h, p, n, **f32),
    )
    _chunk_state_kernel[(c, b, h)](
        x,
        dt,
        A,
        B,
        dt_bias,
        dts,
        cs,
        states,
        L,
        p,
        n,
        c,
        h // gx,
        h // B.shape[2],
        float(dt_limit[0]),
        float(dt_limit[1]),
        *x.stride(),
        *dt.stride(),
        *B.stride(),
        Q=chunk_size,
        BLOCK_K=min(chunk_size, 64),
        BLOCK_P=_block(p),
        BLOCK_N=_block(n),
        SOFTPLUS=dt_softplus,
        PREC=_prec(x),
        num_warps=4 if _block(p) * _block(n) <= 4096 else 8,
    )
    return dts, cs, states


def state_passing_fwd(states, cs, initial_state=None):
    """Launch _state_passing_kernel -> state entering each chunk (b, c, h, p, n) and final state (b, h, p, n), fp32."""
    b, c, h, p, n = states.shape
    prev, final = torch.empty_like(states), torch.empty(b, h, p, n, device=states.device, dtype=torch.float32)
    init = (
        None if initial_state is None else initial_state.to(torch.float32).contiguous()
    )  # small; flat p·n indexing
    BLOCK = min(1024, triton.next_power_of_2(p * n))  # up to 1024 state elements per program
    _state_passing_kernel[(triton.cdiv(p * n, BLOCK), b, h)](
        states, cs, init, prev, final, c, p * n, Q=cs.shape[-1], BLOCK=BLOCK
    )
    return prev, final


def chunk_scan_fwd(x, B, C, dts, cs, prev_states, D=None):
    """Launch _chunk_scan_kernel -> y (b, L, h, p) in x's dtype."""
    (b, L, gx, p), (h, c, Q), n = x.shape, dts.shape[1:], B.shape[3]
    y = torch.empty(b, L, h, p, device=x.device, dtype=x.dtype)
    BLOCK_M, BLOCK_P = min(Q, 64), min(_block(p), 64)
    # b·nchunks on grid axis 0: axes 1 and 2 are limited to 65,535 on CUDA, and b·L/Q can pass that on long batches
    grid = (b * c, triton.cdiv(Q, BLOCK_M) * triton.cdiv(p, BLOCK_P), h)
    _chunk_scan_kernel[grid](
        x,
        B,
        C,
        dts,
        cs,
        prev_states,
        D,
        y,
        L,
        p,
        n,
        c,
        h // gx,
        h // B.shape[2],
        h // C.shape[2],
        *x.stride(),
        *B.stride(),
        *C.stride(),
        *y.stride(),
        Q=Q,
        BLOCK_M=BLOCK_M,
        BLOCK_P=BLOCK_P,
        BLOCK_N=_block(n),
        PREC=_prec(x),
    )
    return y


def ssm_step_fwd(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, math.inf)):
    """Launch _ssm_step_kernel: state (b, h, p, n) fp32 updated in place -> y (b, h, p) in x's dtype."""
    (b, gx, p), h, n = x.shape, dt.shape[1], B.shape[2]
    y = torch.empty(b, h, p, device=x.device, dtype=x.dtype)
    # fixed rows per program by n, ~512 state elements per tile (mamba's table, kernels.md §1.8); never autotuned because
    # an autotune trial would update the state in place more than once
    BLOCK_P = 32 if n <= 16 else 16 if n <= 32 else 8 if n <= 64 else 4
    _ssm_step_kernel[(triton.cdiv(p, BLOCK_P), b, h)](
        state,
        x,
        dt,
        A,
        B,
        C,
        D,
        dt_bias,
        y,
        p,
        n,
        h // gx,
        h // B.shape[1],
        h // C.shape[1],
        float(dt_limit[0]),
        float(dt_limit[1]),
        *state.stride(),
        *x.stride(),
        *dt.stride(),
        *B.stride(),
        *C.stride(),
        *y.stride(),
        BLOCK_P=BLOCK_P,
        BLOCK_N=triton.next_power_of_2(n),
        SOFTPLUS=dt_softplus,
        num_warps=4 if n <= 128 else 8,
    )
    return y


# ----------------------------------------------------------------------------- dispatchers (the public API)


def _check(x, dt, A, B, C, D, dt_bias, dt_limit, state, chunk_size=None, step=False):
    """Raise ValueError for any input the paths would otherwise get silently wrong (or crash on inside a kernel)."""
    named = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, state=state)
    for k, t in named.items():
        if t is not None and not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            raise ValueError(
                f"{k} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}"
            )
    if len({t.device for t in named.values() if t is not None}) > 1:
        raise ValueError("all tensors must be on the same device")
    shapes, T = (
        f"x {tuple(x.shape)}, dt {tuple(dt.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}",
        "" if step else "L, ",
    )
    if (x.dim(), dt.dim(), B.dim(), C.dim()) != ((3, 2, 3, 3) if step else (4, 3, 4, 4)):
        raise ValueError(f"expected x (b, {T}g, p), dt (b, {T}h), B and C (b, {T}g, n); got {shapes}")
    if step:  # decode inputs have no time axis: check them as a sequence of length 1
        x, dt, B, C = x[:, None], dt[:, None], B[:, None], C[:, None]
    (b, L, _, p), h, n = x.shape, dt.shape[2], B.shape[3]
    if dt.shape[:2] != (b, L) or B.shape[:2] != (b, L) or C.shape[:2] != (b, L) or C.shape[3] != n or L < 1:
        raise ValueError(f"batch, length (≥ 1) or state sizes disagree: {shapes}")
    for k, t in (("x", x), ("B", B), ("C", C)):
        if t.shape[2] < 1 or h % t.shape[2]:
            raise ValueError(f"{h} heads (dt's last dim) are not divisible by {k}'s {t.shape[2]} groups")
    for k in ("A", "D", "dt_bias"):
        if named[k] is not None and named[k].shape != (h,):
            raise ValueError(f"{k} must have shape ({h},), one value per head; got {tuple(named[k].shape)}")
    if state is not None and state.shape != (b, h, p, n):
        raise ValueError(f"state must have shape (b, h, p, n) = {(b, h, p, n)}, got {tuple(state.shape)}")
    if not 0.0 <= dt_limit[0] <= dt_limit[1]:
        raise ValueError(f"dt_limit must satisfy 0 <= lo <= hi (so A·Δ ≤ 0), got {dt_limit}")
    if chunk_size is not None and chunk_size not in (16, 32, 64, 128, 256):
        raise ValueError(
            f"chunk_size must be a power of 2 in [16, 256] (mamba #449: others give NaN), got {chunk_size}"
        )
    if bool((A >= 0).any()):
        raise ValueError(
            "A must be strictly negative (A = -exp(A_log)); a positive A would make the scan explode"
        )


def _use_triton(backend, tensors, state_dtype=torch.float32):
    """auto: Triton for CUDA tensors when no gradient is needed (the interpreter is a test tool, not a CPU backend)."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if backend == "auto":
        return HAS_TRITON and tensors[0].is_cuda and not needs_grad
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' needs the triton package")
        if needs_grad:
            raise ValueError(
                "the Triton kernels are forward-only in v1: use backend='torch' (ssd_chunked) for gradients"
            )
        bad = [
            t.dtype
            for t in tensors
            if t is not None and t.dtype not in (torch.float32, torch.float16, torch.bfloat16)
        ]
        if bad or state_dtype != torch.float32:
            raise ValueError(
                f"the Triton kernels take float32/float16/bfloat16 inputs and a float32 state, got {bad or state_dtype}"
            )
    return backend == "triton"


def ssd(
    x,
    dt,
    A,
    B,
    C,
    chunk_size=64,
    D=None,
    dt_bias=None,
    dt_softplus=True,
    dt_limit=(0.0, math.inf),
    initial_state=None,
    return_final_state=False,
    backend="auto",
):
    """The scan of the Mamba2 layer: x (b, L, g_x, p), dt (b, L, h), A (h,) < 0, B (b, L, g_B, n), C (b, L, g_C, n)
    -> y (b, L, h, p) in x's dtype, plus the final state (b, h, p, n) in fp32 when return_final_state.
    backend: "auto" (Triton for CUDA tensors without gradients, else ssd_chunked), "torch" or "triton"."""
    _check(x, dt, A, B, C, D, dt_bias, dt_limit, initial_state, chunk_size)
    if not _use_triton(backend, (x, dt, A, B, C, D, dt_bias, initial_state)):
        return ssd_chunked(
            x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit, initial_state, return_final_state
        )
    A, D, dt_bias = (
        t if t is None else t.contiguous() for t in (A, D, dt_bias)
    )  # the kernels read head i at offset i
    dts, cs, states = chunk_state_fwd(x, dt, A, B, chunk_size, dt_bias, dt_softplus, dt_limit)
    prev, final = state_passing_fwd(states, cs, initial_state)
    y = chunk_scan_fwd(x, B, C, dts, cs, prev, D)
    return (y, final) if return_final_state else y


def ssm_step(
    state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, math.inf), backend="auto"
):
    """One decode token: state (b, h, p, n) fp32 updated in place; x (b, g_x, p), dt (b, h), B (b, g_B, n), C (b, g_C, n)
    -> y (b, h, p). Same Δ processing as the scan, dt_limit included, so prefill and decode agree."""
    _check(x, dt, A, B, C, D, dt_bias, dt_limit, state, step=True)
    if _use_triton(backend, (x, dt, A, B, C, D, dt_bias), state.dtype):
        A, D, dt_bias = (
            t if t is None else t.contiguous() for t in (A, D, dt_bias)
        )  # the kernel reads head i at offset i
        return ssm_step_fwd(state, x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit)
    return ssm_step_ref(state, x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit)


# ----------------------------------------------------------------------------- self-test and timing


def random_inputs(b, L, h, p, n, groups=(1, 1, 1), dtype=torch.float32, device="cpu", seed=0):
    """Random ssd() keyword inputs with Mamba2's initial values (paper.md §5.3): A = −U(1, 16), dt_bias = softplus⁻¹ of a
    log-uniform Δ in [1e-3, 0.1]; groups = (g_x, g_B, g_C); x, B, C, raw dt, D and the initial state are Gaussian."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen)
    d0 = torch.exp(math.log(1e-3) + math.log(100.0) * torch.rand(h, generator=gen))  # Δ at init, log-uniform
    t = dict(
        x=r(b, L, groups[0], p),
        dt=0.5 * r(b, L, h),
        A=-1.0 - 15.0 * torch.rand(h, generator=gen),
        B=r(b, L, groups[1], n),
        C=r(b, L, groups[2], n),
        D=r(h),
        dt_bias=d0 + torch.log(-torch.expm1(-d0)),
        initial_state=r(b, h, p, n),
    )
    return {k: v.to(device=device, dtype=dtype) for k, v in t.items()}


def rel_rms(a, ref):
    """‖a − ref‖₂ / ‖ref‖₂ in fp64: the error metric of every check (kernels.md §7.1)."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _median_ms(fn, reps):
    fn()  # warm-up; timeit times with time.perf_counter
    return 1e3 * statistics.median(timeit.repeat(fn, number=1, repeat=reps))


if __name__ == "__main__":
    cuda = torch.cuda.is_available()
    kernels = HAS_TRITON and (
        cuda or os.environ.get("TRITON_INTERPRET") == "1"
    )  # the interpreter is slow: small shapes
    # every path vs the fp64 loop, all options on, Zebra's groups (x, B per KV group, C per head), a ragged length; then
    # prefill 70 tokens and decode 7 steps from its final state
    ref = random_inputs(2, 77, 4, 16, 24, groups=(2, 2, 4), dtype=torch.float64)
    y_ref, s_ref = ssm_scan_ref(**ref, return_final_state=True)
    inp = {k: v.to("cuda" if cuda else "cpu", torch.float32) for k, v in ref.items()}
    for backend in ["torch"] + ["triton"] * kernels:
        y, s = ssd(**inp, chunk_size=16, return_final_state=True, backend=backend)
        _, state = ssd(
            **{k: v[:, :70] if k in ("x", "dt", "B", "C") else v for k, v in inp.items()},
            chunk_size=16,
            return_final_state=True,
            backend=backend,
        )
        ys = torch.stack(
            [
                ssm_step(
                    state,
                    inp["x"][:, t],
                    inp["dt"][:, t],
                    inp["A"],
                    inp["B"][:, t],
                    inp["C"][:, t],
                    inp["D"],
                    inp["dt_bias"],
                    backend=backend,
                )
                for t in range(70, 77)
            ],
            dim=1,
        )  # (b, 7, h, p)
        for name, got, want in (
            ("ssd y", y, y_ref),
            ("ssd final state", s, s_ref),
            ("7 steps y", ys, y_ref[:, 70:]),
            ("7 steps state", state, s_ref),
        ):
            ok = rel_rms(got, want) < 1e-5
            print(
                f"{backend:7s}{name:16s} max abs diff {(got.double().cpu() - want).abs().max():.1e}  {'OK' if ok else 'NOT OK'}"
            )
            assert ok, (backend, name)
    # timing at the shape of Zebra-135m's Mamba2 layer (9 heads, 3 KV groups, P = N = 64)
    print(
        f"\ntiming: b 1, T 4096, h 9, p = n = 64, groups (3, 3, 9), chunk 64, {torch.get_num_threads()} CPU threads"
    )
    cpu = random_inputs(1, 4096, 9, 64, 64, groups=(3, 3, 9))
    with torch.no_grad():
        t_seq, t_chunk = _median_ms(lambda: ssm_scan_ref(**cpu), 3), _median_ms(lambda: ssd_chunked(**cpu), 7)
    rows = [
        ("sequential loop (ssm_scan_ref), fp32", "cpu", t_seq, 1.0),
        ("chunked (ssd_chunked), fp32", "cpu", t_chunk, t_seq / t_chunk),
    ]
    if cuda and HAS_TRITON:
        gpu = {k: v.cuda() if k in ("A", "initial_state") else v.cuda().bfloat16() for k, v in cpu.items()}
        t_torch, t_tri = (
            triton.testing.do_bench(lambda: ssd(**gpu, backend=be)) for be in ("torch", "triton")
        )
        rows += [
            ("chunked torch, bf16", "cuda", t_torch, 1.0),
            ("Triton, bf16", "cuda", t_tri, t_torch / t_tri),
        ]
    print(f"{'path':38s}{'device':>7s}{'ms (median)':>13s}{'speedup':>9s}")
    for name, dev, ms, speedup in rows:
        print(f"{name:38s}{dev:>7s}{ms:13.2f}{speedup:8.1f}x")
