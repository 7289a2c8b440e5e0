"""Mamba2 selective scan (SSD): the sequence mixer of the hybrid's Mamba2 layers (Zebra-Llama,
arXiv 2505.17272, keeps MambaInLlama's variant of mamba_ssm's Mamba2).

Names: b batch, T sequence length, h heads, g groups, p head size, n state size, Q chunk length,
c = ⌈T/Q⌉ chunks.
Per batch row and head (state S of shape p×n, A < 0 one scalar per head, Δ the step size):
    Δ_t = softplus(dt_t + dt_bias)
    S_t = exp(Δ_t·A)·S_{t−1} + Δ_t·x_t ⊗ B_t
    y_t = S_t·C_t + D·x_t
x (b, T, g_x, p), B (b, T, g_B, n) and C (b, T, g_C, n) each carry their own group count; head i reads group
i // (h/g). Zebra passes x and B per KV group and C per head, so nothing is repeated in memory.

The chunked ("SSD") form is that of mamba_ssm's ssd_minimal.py: the T×T matrix mapping x to y is cut into
Q×Q blocks, and `ssd_chunked` runs its four steps in one function, cs = cumsum(A·Δ) within each chunk:
  1. diagonal blocks (intra-chunk outputs): y = ((C·Bᵀ) ∘ exp(cs_i − cs_j) ∘ causal ∘ Δ_j)·x
  2. the state each chunk ends with, built from zero by its own tokens (B-terms)
  3. states passed across chunks in order, S ← exp(ΣA·Δ of the chunk)·S + its state (A-terms)
  4. state -> output: the state entering a chunk read out by C, decayed by exp(cs_i) (C-terms)
Three tiers, tested pairwise: `ssm_scan_ref` (the sequential loop, ground truth; `ssm_step_ref` is one of
its steps), `ssd_chunked` (steps 1–4 as differentiable torch matmuls: the training path on every device,
fp32 whatever the autocast state) and Triton kernels: chunked prefill in three launches (Δ, cs and step 2;
step 3; steps 1 and 4 fused) and the decode step.
File order: torch references, @triton.jit kernels, their launch wrappers, the dispatchers, the self-test.
Triton is forward-only in v1 (no Triton backward yet); training autograd goes through `ssd_chunked`.
Public calls: `ssd`, `ssm_step`.
Run: `python ssm_scan.py` (self-test + timing; with TRITON_INTERPRET=1 it also checks the kernels on CPU),
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

# Value checks that would read tensors back to the host (A < 0 in `ssm_step`, cache lengths in
# mla.mla_decode) run only with ZEBRA_DEBUG=1: a decode step makes no host synchronisation, so it can be
# captured in a CUDA graph. mla.py takes this flag, HAS_TRITON, `check`, `use_triton`, `dot_block` and
# `dot_prec` from here: one home for what both kernel files share.
DEBUG = os.environ.get("ZEBRA_DEBUG") == "1"


def check(ok, msg):
    """The one input check of both kernel files: ValueError with a message naming the problem and the fix."""
    if not ok:
        raise ValueError(msg)


def _acc_dtype(t):
    """bf16/fp16/fp32 inputs compute in fp32; fp64 inputs stay fp64 (the ground-truth runs)."""
    return torch.promote_types(t.dtype, torch.float32)


def _heads(t, h):
    """(..., g, k) -> (..., h, k): head i reads group i // (h/g), MambaInLlama's GQA-style repeat."""
    return t.repeat_interleave(h // t.shape[-2], dim=-2)


def process_dt(dt, dt_bias=None):
    """Raw dt (..., h) -> step size Δ = softplus(dt + dt_bias) (..., h) in the accumulation dtype."""
    dt = dt.to(_acc_dtype(dt))
    if dt_bias is not None:
        dt = dt + dt_bias
    return F.softplus(dt)


# ------------------------------------------------ the sequential loop (ground truth) and one decode token


def _recur(S, x, delta, A, B, C):
    """One token for all heads, as the equations read.
    S (b, h, p, n), x (b, h, p), delta (b, h), B and C (b, h, n)."""
    decay = torch.exp(delta * A)[..., None, None]  # (b, h, 1, 1)
    S = decay * S + (delta[..., None] * x)[..., None] * B[..., None, :]  # (b, h, p, n)
    return S, torch.einsum("bhpn,bhn->bhp", S, C)  # new state, y (b, h, p)


def ssm_scan_ref(x, dt, A, B, C, D=None, dt_bias=None, initial_state=None, return_final_state=False):
    """The recurrence token by token: ground truth for outputs, final state and (via autograd) gradients."""
    (b, T, _, p), h, n, acc = x.shape, dt.shape[2], B.shape[3], _acc_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        delta = process_dt(dt, dt_bias).to(acc)  # (b, T, h)
        xs, Bs, Cs = (_heads(t.to(acc), h) for t in (x, B, C))  # (b, T, h, p | n)
        S = x.new_zeros(b, h, p, n, dtype=acc) if initial_state is None else initial_state.to(acc)
        ys = []
        for t in range(T):
            S, y = _recur(S, xs[:, t], delta[:, t], A.to(acc), Bs[:, t], Cs[:, t])
            ys.append(y)
        y = torch.stack(ys, dim=1)  # (b, T, h, p)
        if D is not None:
            y = y + D.to(acc)[:, None] * xs
    return (y.to(x.dtype), S) if return_final_state else y.to(x.dtype)


def ssm_step_ref(state, x, dt, A, B, C, D=None, dt_bias=None):
    """One decode token: state (b, h, p, n) updated in place; x (b, g_x, p), dt (b, h), B (b, g_B, n),
    C (b, g_C, n) -> y (b, h, p). The math runs in the state's dtype (fp32) whatever the autocast state."""
    h, acc = dt.shape[1], state.dtype
    with torch.autocast(x.device.type, enabled=False):
        xs = _heads(x, h).to(acc)  # (b, h, p)
        delta = process_dt(dt, dt_bias).to(acc)  # (b, h)
        S, y = _recur(state, xs, delta, A.to(acc), _heads(B, h).to(acc), _heads(C, h).to(acc))
        state.copy_(S)
        if D is not None:
            y = y + D.to(acc)[:, None] * xs
    return y.to(x.dtype)  # (b, h, p)


# ----------------------------------------------------------------------------- SSD in torch: steps 1–4


def _chunked(t, h, c, Q, dtype):
    """(b, T, g, k) -> (b, h, c, Q, k): head i reads group i // (h/g), zero-padded to c·Q tokens, in chunks.
    One copy, straight into the contiguous layout the batched matmuls of `ssd_chunked` want."""
    b, T, g, k = t.shape
    out = t.new_zeros(b, g, h // g, c * Q, k, dtype=dtype)  # zeros past T: the padding
    out[:, :, :, :T] = t.transpose(1, 2)[:, :, None]  # (b, g, 1, T, k), broadcast over h/g heads
    return out.reshape(b, h, c, Q, k)


def ssd_chunked(
    x, dt, A, B, C, chunk_size=64, D=None, dt_bias=None, initial_state=None, return_final_state=False
):
    """Chunked SSD in plain torch (mamba_ssm's ssd_minimal.py), differentiable, any length: the training
    path. Inputs and outputs as `ssd`'s.

    Unrolled, y = M·x + D·x with M_ij = (C_i·B_j)·exp(cs_i − cs_j)·Δ_j for j ≤ i and
    cs = cumsum(A·Δ): one T×T lower-triangular matrix per head. Cut into Q×Q blocks, the diagonal blocks
    are small dense matmuls (step 1). Every block below them has rank ≤ n: C-side · decay between the
    chunks · B-side, i.e. it factors through the p×n state the recurrence carries (steps 2, 3, 4:
    ssd_minimal's B-, A- and C-terms), so they cost c sequential steps instead of T. cs restarts in each
    chunk: every exp spans one chunk.
    The math runs in fp32 (fp64 for fp64 inputs) even under autocast: bf16 matmuls here would cost ~1e-3
    relative error in the state, which every later token inherits."""
    (b, T, _, _), h, Q, acc = x.shape, dt.shape[2], chunk_size, _acc_dtype(x)
    c = -(-T // Q)  # chunks, the last one zero-padded: Δ = 0 is decay 1 and no input, so it changes nothing
    with torch.autocast(x.device.type, enabled=False):
        dt = F.pad(process_dt(dt, dt_bias).to(acc), (0, 0, 0, c * Q - T))  # Δ (b, c·Q, h)
        dt = dt.reshape(b, c, Q, h).permute(0, 3, 1, 2)  # (b, h, c, Q)
        cs = torch.cumsum(dt * A.to(acc)[:, None, None], dim=-1)  # (b, h, c, Q): log-decay since chunk start
        xc, Bc, Cc = (_chunked(t, h, c, Q, acc) for t in (x, B, C))  # (b, h, c, Q, p | n)

        # 1. diagonal blocks (outputs from the chunk's own tokens): y_i = Σ_{j≤i} M_ij·x_j in a chunk
        causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
        # mask BEFORE exp: above the diagonal cs_i − cs_j > 0 may overflow to inf, and inf·0 is a NaN
        # gradient
        log_decay = (cs[..., :, None] - cs[..., None, :]).masked_fill(~causal, -math.inf)  # (b, h, c, Q, Q)
        y = ((Cc @ Bc.transpose(-1, -2)) * torch.exp(log_decay) * dt[..., None, :]) @ xc  # (b, h, c, Q, p)

        # 2. the state each chunk ends with, built from zero by its own tokens (B-side):
        #    Σ_j x_j ⊗ B_j·Δ_j·exp(cs_last − cs_j)
        w = dt * torch.exp(cs[..., -1:] - cs)  # (b, h, c, Q); exponent ≤ 0
        states = (xc * w[..., None]).transpose(-1, -2) @ Bc  # (b, h, c, p, n)

        # 3. states passed across chunks (the decay between them): S ← exp(cs_last)·S + the chunk's state,
        #    c steps in order, starting from the initial state
        decay = torch.exp(cs[..., -1])[..., None, None]  # (b, h, c, 1, 1): each chunk's total decay
        S = torch.zeros_like(states[:, :, 0]) if initial_state is None else initial_state.to(acc)
        prev = []
        for k in range(c):
            prev.append(S)  # the state entering chunk k
            S = decay[:, :, k] * S + states[:, :, k]  # (b, h, p, n)
        prev = torch.stack(prev, dim=2)  # (b, h, c, p, n)

        # 4. state -> output of each chunk (C-side): the state entering it, read out by C_i and decayed to
        #    token i by exp(cs_i)
        y = y + (Cc @ prev.transpose(-1, -2)) * torch.exp(cs)[..., None]  # (b, h, c, Q, p)

        if D is not None:
            y = y + D.to(acc)[:, None, None, None] * xc
        y = y.permute(0, 2, 3, 1, 4).reshape(b, c * Q, h, -1)[:, :T].to(x.dtype)  # (b, T, h, p)
    return (y, S) if return_final_state else y


# ----------------------------------------------------------------------------- Triton kernels


if HAS_TRITON:
    # Rules for every kernel: program ids that index a batch row, chunk or head go int64 before any stride
    # product (an int32 one passes 2^31 on long sequences: mamba_ssm's Triton SSD did past ~61k tokens;
    # tests/test_compile.py checks the TTIR) and into a scalar base pointer, from which per-element offsets
    # inside one chunk stay int32; loads are upcast to fp32 at once; every exp of a cumsum difference is
    # exp(min(Δ, 0)); user tensors are addressed through their strides (views are fine), the buffers made
    # here (fp32 Δ, cs, states, outputs) are contiguous and addressed from their sizes. Parameters come as in
    # the Triton tutorials: pointers, sizes, strides, meta-parameters (tl.constexpr).

    @triton.jit
    def _softplus(v):
        # log1p(exp(v)) from exp/log only (libdevice fails under the interpreter); log(w)·u/(w − 1)
        # cancels the rounding of w = 1 + u: 2e-7 relative error down to v = −88 (plain log(1 + u) is 0.9 %
        # off at v = −12).
        # Identity above 20, like F.softplus.
        u = tl.exp(tl.minimum(v, 20.0))
        w = 1.0 + u
        return tl.where(v > 20.0, v, tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0)))

    # _chunk_state_kernel: Δ, cs and step 2 of `ssd_chunked` (each chunk's own state) in one pass over x, B.
    # Grid (c, b, h): one program per (chunk, batch row, head) writes the chunk's Δ and cs (Q values each)
    # and the p×n state its tokens build from zero, one BLOCK_P × BLOCK_N fp32 tile held in registers.
    # It walks the chunk in sub-blocks of BLOCK_K tokens, loading dt (K), x (K × P) and B (K × N) per
    # sub-block: the state so far decays by the sub-block's exp(ΣA·Δ), then adds xᵀ·(B·w) with
    # w = Δ·exp(cs_last − cs). Sub-blocks keep the x and B tiles small for long chunks.
    @triton.jit
    def _chunk_state_kernel(
        x_ptr, dt_ptr, A_ptr, B_ptr, bias_ptr,  # inputs
        dt_out_ptr, cs_ptr, st_ptr,  # outputs: Δ and cs (b, h, c, Q), states (b, c, h, p, n)
        T, P, N, nchunks, rep_x, rep_B,  # sizes; rep_*: heads per group of x and B
        sx_b, sx_t, sx_g, sx_p, sdt_b, sdt_t, sdt_h, sB_b, sB_t, sB_g, sB_n,  # strides of x, dt and B
        Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
        PREC: tl.constexpr,
    ):  # fmt: skip
        c, b, hd = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
        H = tl.num_programs(2)
        A = tl.load(A_ptr + hd).to(tl.float32)
        offs_p, offs_n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
        # scalar int64 bases at the chunk's first token t0 (batch row, chunk, head -> its group); int32
        # per-element offsets from there take half the registers of int64 ones
        t0 = c * Q
        n_t = (T - t0).to(tl.int32)  # tokens from t0 to the end (< 2^31): positions at or past it are masked
        x_base = x_ptr + b * sx_b + (hd // rep_x) * sx_g + t0 * sx_t
        B_base = B_ptr + b * sB_b + (hd // rep_B) * sB_g + t0 * sB_t
        dt_base = dt_ptr + b * sdt_b + hd * sdt_h + t0 * sdt_t
        out = ((b * H + hd) * nchunks + c) * Q  # dt, cs: (b, h, c, Q)
        acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        carry = 0.0  # cs at the end of the previous sub-block
        for k0 in range(0, Q, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            valid = offs_k < n_t
            dt = tl.load(dt_base + offs_k * sdt_t, mask=valid, other=0.0).to(tl.float32)
            if bias_ptr is not None:
                dt += tl.load(bias_ptr + hd).to(tl.float32)
            dt = tl.where(valid, _softplus(dt), 0.0)  # Δ = 0 past T: decay 1, no input
            cs = carry + tl.cumsum(dt * A, axis=0)
            tl.store(dt_out_ptr + out + offs_k, dt)
            tl.store(cs_ptr + out + offs_k, cs)
            last = tl.sum(tl.where(offs_k == k0 + BLOCK_K - 1, cs, 0.0), axis=0)  # cs's own last entry
            xt = tl.load(
                x_base + offs_k[:, None] * sx_t + offs_p[None, :] * sx_p,
                mask=valid[:, None] & (offs_p[None, :] < P),
                other=0.0,
            ).to(tl.float32)  # (K, P)
            Bt = tl.load(
                B_base + offs_k[:, None] * sB_t + offs_n[None, :] * sB_n,
                mask=valid[:, None] & (offs_n[None, :] < N),
                other=0.0,
            ).to(tl.float32)  # (K, N)
            w = dt * tl.exp(tl.minimum(last - cs, 0.0))
            acc = acc * tl.exp(last - carry) + tl.dot(tl.trans(xt), Bt * w[:, None], input_precision=PREC)
            carry = last
        st = st_ptr + ((b * nchunks + c) * H + hd) * P * N  # states: (b, c, h, p, n)
        mask = (offs_p[:, None] < P) & (offs_n[None, :] < N)
        tl.store(st + offs_p[:, None] * N + offs_n[None, :], acc, mask=mask)

    # _state_passing_kernel: step 3 of `ssd_chunked`, the only sequential part.
    # Grid (cdiv(p·n, BLOCK), b, h): the p×n state is flattened and each program owns BLOCK of its elements
    # (a 128×128 state runs on 16 programs per batch row and head). It walks the chunks in order, loading
    # per chunk its cs_last (one scalar) and BLOCK elements of its state: it stores the state entering the
    # chunk, then S ← exp(cs_last)·S + the chunk's state. The last S is the final state.
    @triton.jit
    def _state_passing_kernel(
        st_ptr, cs_ptr, init_ptr,  # inputs: states (b, c, h, p·n), cs (b, h, c, Q), initial state or None
        prev_ptr, final_ptr,  # outputs: the state entering each chunk (b, c, h, p·n), final (b, h, p·n)
        nchunks, dim,  # sizes; dim = p·n
        Q: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        b, hd = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
        H = tl.num_programs(2)
        offs = pid * BLOCK + tl.arange(0, BLOCK)  # flat index into the p·n state
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

    # _chunk_scan_kernel: steps 1 and 4 of `ssd_chunked` + D·x, fused so y is written once.
    # Grid (b·c, cdiv(Q, BLOCK_M)·cdiv(p, BLOCK_P), h): one program computes one chunk's y for one head
    # on a tile of BLOCK_M tokens × BLOCK_P of the p columns. It loads C (M × N), cs (M) and the state
    # entering the chunk (P × N) once: step 4 is (C·Sᵀ)·exp(cs). Step 1 then visits the blocks of
    # BLOCK_M tokens up to the diagonal, loading B (K × N), x (K × P), cs and Δ (K) per block:
    # y += ((C·Bᵀ) ∘ exp(cs_i − cs_j) ∘ causal ∘ Δ_j)·x. C·Bᵀ is recomputed per head
    # (simpler than the per-group bmm of mamba_ssm's Triton SSD).
    @triton.jit
    def _chunk_scan_kernel(
        x_ptr, B_ptr, C_ptr, dt_ptr, cs_ptr, prev_ptr, D_ptr,  # inputs: dt, cs and prev made by the two above
        y_ptr,  # output (b, T, h, p)
        T, P, N, nchunks, rep_x, rep_B, rep_C,  # sizes; rep_*: heads per group of x, B and C
        sx_b, sx_t, sx_g, sx_p, sB_b, sB_t, sB_g, sB_n, sC_b, sC_t, sC_g, sC_n,  # strides of x, B and C
        Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
        PREC: tl.constexpr,
    ):  # fmt: skip
        b, c = tl.program_id(0).to(tl.int64) // nchunks, tl.program_id(0).to(tl.int64) % nchunks
        pid_m, pid_p = tl.program_id(1) // tl.cdiv(P, BLOCK_P), tl.program_id(1) % tl.cdiv(P, BLOCK_P)
        hd, H = tl.program_id(2).to(tl.int64), tl.num_programs(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows: positions inside the chunk
        offs_p, offs_n = pid_p * BLOCK_P + tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
        # scalar int64 bases at the chunk's first token t0, int32 tile offsets from there (as in
        # _chunk_state_kernel)
        t0, mask_n = c * Q, offs_n[None, :] < N
        n_t = (T - t0).to(tl.int32)  # rows at or past n_t lie beyond the sequence
        chunk = ((b * H + hd) * nchunks + c) * Q  # dt, cs: (b, h, c, Q)
        cs_m = tl.load(cs_ptr + chunk + offs_m)
        C_base = C_ptr + b * sC_b + (hd // rep_C) * sC_g + t0 * sC_t
        Cm = tl.load(
            C_base + offs_m[:, None] * sC_t + offs_n[None, :] * sC_n,
            mask=(offs_m[:, None] < n_t) & mask_n,
            other=0.0,
        ).to(tl.float32)  # (M, N)
        S = tl.load(
            prev_ptr + ((b * nchunks + c) * H + hd) * P * N + offs_p[:, None] * N + offs_n[None, :],
            mask=(offs_p[:, None] < P) & mask_n,
            other=0.0,
        )  # (P, N)
        acc = tl.dot(Cm, tl.trans(S), input_precision=PREC) * tl.exp(cs_m)[:, None]  # (M, P) step 4
        x_base = x_ptr + b * sx_b + (hd // rep_x) * sx_g + t0 * sx_t
        B_base = B_ptr + b * sB_b + (hd // rep_B) * sB_g + t0 * sB_t
        # step 1, causal: the column blocks up to the diagonal
        for k0 in range(0, (pid_m + 1) * BLOCK_M, BLOCK_M):
            offs_k = k0 + tl.arange(0, BLOCK_M)
            Bk = tl.load(
                B_base + offs_k[:, None] * sB_t + offs_n[None, :] * sB_n,
                mask=(offs_k[:, None] < n_t) & mask_n,
                other=0.0,
            ).to(tl.float32)  # (K, N)
            xk = tl.load(
                x_base + offs_k[:, None] * sx_t + offs_p[None, :] * sx_p,
                mask=(offs_k[:, None] < n_t) & (offs_p[None, :] < P),
                other=0.0,
            ).to(tl.float32)  # (K, P)
            cs_k, dt_k = tl.load(cs_ptr + chunk + offs_k), tl.load(dt_ptr + chunk + offs_k)
            # exp(min(Δ, 0)): above the diagonal Δ > 0 may overflow, and inf·0 = NaN would poison the dot
            causal = offs_m[:, None] >= offs_k[None, :]
            w = tl.where(causal, tl.exp(tl.minimum(cs_m[:, None] - cs_k[None, :], 0.0)), 0.0)
            CB = tl.dot(Cm, tl.trans(Bk), input_precision=PREC)  # (M, K)
            acc += tl.dot(CB * w * dt_k[None, :], xk, input_precision=PREC)
        mask_y = (offs_m[:, None] < n_t) & (offs_p[None, :] < P)
        if D_ptr is not None:
            xm = tl.load(x_base + offs_m[:, None] * sx_t + offs_p[None, :] * sx_p, mask=mask_y, other=0.0)
            acc += tl.load(D_ptr + hd).to(tl.float32) * xm.to(tl.float32)
        y_base = y_ptr + ((b * T + t0) * H + hd) * P  # y: (b, T, h, p)
        tl.store(y_base + offs_m[:, None] * (H * P) + offs_p[None, :], acc, mask=mask_y)

    # _ssm_step_kernel: `ssm_step_ref`, one token.
    # Grid (cdiv(p, BLOCK_P), b, h): one program owns BLOCK_P rows of one head's p×n fp32 state. It loads
    # that BLOCK_P × BLOCK_N tile, x (P), B and C (N) and the head's Δ once, updates the tile in place,
    # S = exp(A·Δ)·S + Δ·x ⊗ B, and reduces it against C: y = S·C + D·x.
    # N need not be a power of 2: lanes past N are masked on every load and store.
    @triton.jit
    def _ssm_step_kernel(
        state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr,  # inputs (the state updated in place)
        y_ptr,  # output (b, h, p)
        P, N, rep_x, rep_B, rep_C,  # sizes; rep_*: heads per group of x, B and C
        ss_b, ss_h, ss_p, ss_n, sx_b, sx_g, sx_p, sdt_b, sdt_h,  # strides of the state, x and dt
        sB_b, sB_g, sB_n, sC_b, sC_g, sC_n,  # strides of B and C
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_p, b, hd = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
        offs_p, offs_n = pid_p * BLOCK_P + tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
        mp, mn = offs_p < P, offs_n < N
        dt = tl.load(dt_ptr + b * sdt_b + hd * sdt_h).to(tl.float32)
        if bias_ptr is not None:
            dt += tl.load(bias_ptr + hd).to(tl.float32)
        dt = _softplus(dt)
        s_ptrs = state_ptr + b * ss_b + hd * ss_h + offs_p[:, None] * ss_p + offs_n[None, :] * ss_n
        S = tl.load(s_ptrs, mask=mp[:, None] & mn[None, :], other=0.0)
        x = tl.load(x_ptr + b * sx_b + (hd // rep_x) * sx_g + offs_p * sx_p, mask=mp, other=0.0)
        Bv = tl.load(B_ptr + b * sB_b + (hd // rep_B) * sB_g + offs_n * sB_n, mask=mn, other=0.0)
        Cv = tl.load(C_ptr + b * sC_b + (hd // rep_C) * sC_g + offs_n * sC_n, mask=mn, other=0.0)
        x, Bv, Cv = x.to(tl.float32), Bv.to(tl.float32), Cv.to(tl.float32)
        S = S * tl.exp(tl.load(A_ptr + hd).to(tl.float32) * dt) + (dt * x)[:, None] * Bv[None, :]
        tl.store(s_ptrs, S, mask=mp[:, None] & mn[None, :])
        y = tl.sum(S * Cv[None, :], axis=1)
        if D_ptr is not None:
            y += tl.load(D_ptr + hd).to(tl.float32) * x
        tl.store(y_ptr + (b * tl.num_programs(2) + hd) * P + offs_p, y, mask=mp)  # (b, h, p)


# --------------------------------------------------------- launch wrappers (inputs checked by ssd / ssm_step)


def dot_block(v):
    """Power-of-2 tile covering v (tl.arange needs powers of 2), ≥ 16: the GPU minimum for a tl.dot side."""
    return max(16, triton.next_power_of_2(v))


def dot_prec(t):
    """Dot precision: bf16/fp16 values are exact in TF32. fp32 inputs get 3-pass TF32 (~fp32 accuracy on
    tensor cores): one-pass TF32 is ~1e-3 relative, and "ieee" fp32 dots run on FMA units and spill tens of kB
    of registers at P = N = 64 (tests/test_compile.py)."""
    return "tf32x3" if t.dtype == torch.float32 else "tf32"


def chunk_state_fwd(x, dt, A, B, chunk_size, dt_bias=None):
    """Launch _chunk_state_kernel -> Δ, cs (b, h, c, Q) and chunk states (b, c, h, p, n), all fp32."""
    (b, T, _, p), h, n, c = x.shape, dt.shape[2], B.shape[3], triton.cdiv(x.shape[1], chunk_size)
    f32 = dict(device=x.device, dtype=torch.float32)
    dts, cs = torch.empty(b, h, c, chunk_size, **f32), torch.empty(b, h, c, chunk_size, **f32)
    states = torch.empty(b, c, h, p, n, **f32)
    # fmt: off
    _chunk_state_kernel[(c, b, h)](
        x, dt, A, B, dt_bias, dts, cs, states,
        T, p, n, c, *(h // t.shape[2] for t in (x, B)),  # rep_x, rep_B: head i reads group i // rep
        *x.stride(), *dt.stride(), *B.stride(),
        Q=chunk_size,
        # fp32 tiles take twice the registers of bf16 ones, and 3-pass TF32 splits each operand in two
        BLOCK_K=min(chunk_size, 64 if x.element_size() <= 2 else 16),
        BLOCK_P=dot_block(p), BLOCK_N=dot_block(n), PREC=dot_prec(x),
        num_warps=4 if dot_block(p) * dot_block(n) <= 4096 else 8,
    )
    # fmt: on
    return dts, cs, states


def state_passing_fwd(states, cs, initial_state=None):
    """Launch _state_passing_kernel -> state entering each chunk (b, c, h, p, n), final state (b, h, p, n)."""
    b, c, h, p, n = states.shape
    prev, final = torch.empty_like(states), torch.empty(b, h, p, n, device=states.device, dtype=torch.float32)
    # contiguous fp32, as the kernel indexes the state flat from its sizes
    init = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    BLOCK = min(1024, triton.next_power_of_2(p * n))  # up to 1024 state elements per program
    grid = (triton.cdiv(p * n, BLOCK), b, h)
    _state_passing_kernel[grid](states, cs, init, prev, final, c, p * n, Q=cs.shape[-1], BLOCK=BLOCK)
    return prev, final


def chunk_scan_fwd(x, B, C, dts, cs, prev_states, D=None):
    """Launch _chunk_scan_kernel -> y (b, T, h, p) in x's dtype."""
    (b, T, _, p), (h, c, Q), n = x.shape, dts.shape[1:], B.shape[3]
    y = torch.empty(b, T, h, p, device=x.device, dtype=x.dtype)
    # ptxas -v (tests/test_compile.py) on the model's own launches, whose x, B and C are the conv's strided
    # views (token stride 1, and a p/n stride of T that loses its alignment when T % 16 != 0): 32 rows per
    # program spill at N = 128 in bf16; 16 rows at 4 warps, 8 warps at N = 128, keep the C, B and state tiles
    # in registers
    BLOCK_M, BLOCK_P, BLOCK_N = min(Q, 16), min(dot_block(p), 64), dot_block(n)
    # b·nchunks on grid axis 0: axes 1 and 2 are limited to 65,535 on CUDA, and b·T/Q can pass that
    grid = (b * c, triton.cdiv(Q, BLOCK_M) * triton.cdiv(p, BLOCK_P), h)
    # fmt: off
    _chunk_scan_kernel[grid](
        x, B, C, dts, cs, prev_states, D, y,
        T, p, n, c, *(h // t.shape[2] for t in (x, B, C)),  # rep_x, rep_B, rep_C: head i reads group i // rep
        *x.stride(), *B.stride(), *C.stride(),
        Q=Q, BLOCK_M=BLOCK_M, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, PREC=dot_prec(x),
        num_warps=4 if BLOCK_N <= 64 else 8,
    )
    # fmt: on
    return y


def ssd_triton(x, dt, A, B, C, chunk_size=64, D=None, dt_bias=None, initial_state=None):
    """The three prefill launches -> y (b, T, h, p) in x's dtype and the final state (b, h, p, n) in fp32."""
    A, D, dt_bias = (t if t is None else t.contiguous() for t in (A, D, dt_bias))  # head i at offset i
    dts, cs, states = chunk_state_fwd(x, dt, A, B, chunk_size, dt_bias)
    prev, final = state_passing_fwd(states, cs, initial_state)
    return chunk_scan_fwd(x, B, C, dts, cs, prev, D), final


def ssm_step_fwd(state, x, dt, A, B, C, D=None, dt_bias=None):
    """Launch _ssm_step_kernel: state (b, h, p, n) fp32 updated in place -> y (b, h, p) in x's dtype."""
    (b, _, p), h, n = x.shape, dt.shape[1], B.shape[2]
    A, D, dt_bias = (t if t is None else t.contiguous() for t in (A, D, dt_bias))  # head i at offset i
    y = torch.empty(b, h, p, device=x.device, dtype=x.dtype)
    # fixed rows per program by n, ~512 state elements per tile (mamba_ssm's selective_state_update); never
    # autotuned: an autotune trial would update the state in place more than once
    BLOCK_P = 32 if n <= 16 else 16 if n <= 32 else 8 if n <= 64 else 4
    # fmt: off
    _ssm_step_kernel[(triton.cdiv(p, BLOCK_P), b, h)](
        state, x, dt, A, B, C, D, dt_bias, y,
        p, n, *(h // t.shape[1] for t in (x, B, C)),  # rep_x, rep_B, rep_C: head i reads group i // rep
        *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(),
        BLOCK_P=BLOCK_P, BLOCK_N=triton.next_power_of_2(n), num_warps=4 if n <= 128 else 8,
    )
    # fmt: on
    return y


# ----------------------------------------------------------------------------- dispatchers (the public API)


def _check_inputs(x, dt, A, B, C, D, dt_bias, state, step):
    """Shapes, dtypes and devices, the things the paths would otherwise get silently wrong (or crash on inside
    a kernel). No tensor values are read here, so the check makes no host synchronisation."""
    named = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, state=state)
    for k, t in named.items():
        ok = t is None or (isinstance(t, torch.Tensor) and t.is_floating_point())
        check(ok, f"{k} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    check(
        len({t.device for t in named.values() if t is not None}) == 1,
        "all tensors must be on the same device",
    )
    shapes = f"x {tuple(x.shape)}, dt {tuple(dt.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}"
    t_axis = "T, "
    if step:  # decode inputs have no time axis: check them as a sequence of length 1
        x, dt, B, C, t_axis = x[:, None], dt[:, None], B[:, None], C[:, None], ""
    check(
        (x.dim(), dt.dim(), B.dim(), C.dim()) == (4, 3, 4, 4),
        f"expected x (b, {t_axis}g, p), dt (b, {t_axis}h), B and C (b, {t_axis}g, n); got {shapes}",
    )
    (b, T, _, p), h, n = x.shape, dt.shape[2], B.shape[3]
    same = dt.shape[:2] == B.shape[:2] == C.shape[:2] == (b, T) and C.shape[3] == n
    check(same and T >= 1, f"batch, length (≥ 1) or state sizes disagree: {shapes}")
    for k, t in (("x", x), ("B", B), ("C", C)):
        check(
            t.shape[2] >= 1 and h % t.shape[2] == 0,
            f"{h} heads (dt's last dim) are not divisible by {k}'s {t.shape[2]} groups",
        )
    for k in ("A", "D", "dt_bias"):
        shape = None if named[k] is None else tuple(named[k].shape)
        check(shape in (None, (h,)), f"{k} must have shape ({h},), one value per head; got {shape}")
    shape = None if state is None else tuple(state.shape)
    check(shape in (None, (b, h, p, n)), f"state must have shape (b, h, p, n) = {(b, h, p, n)}, got {shape}")


def _check_A(A):
    """A < 0 for every head; reads A back to the host (one sync), so it runs per prefill, not per step."""
    check(
        bool((A < 0).all()),
        "A must be strictly negative (A = -exp(A_log)); a positive A makes the scan explode",
    )


def use_triton(backend, tensors, state_dtype=torch.float32):
    """The dispatch rule of both kernel files (mla.mla_decode too): "auto" takes Triton for CUDA tensors when
    no gradient is needed (the interpreter is a test tool, not a CPU backend); "triton" insists, and says
    what is missing; "torch" never takes it. tensors[0] decides the device."""
    check(
        backend in ("auto", "torch", "triton"),
        f"backend must be 'auto', 'torch' or 'triton', got {backend!r}",
    )
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if backend == "auto":
        return HAS_TRITON and tensors[0].is_cuda and not needs_grad
    if backend == "triton":
        check(HAS_TRITON, "backend='triton' needs the triton package")
        check(
            tensors[0].is_cuda or os.environ.get("TRITON_INTERPRET") == "1",
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)",
        )
        check(not needs_grad, "the Triton kernels are forward-only in v1: use backend='torch' for gradients")
        bad = [
            t.dtype
            for t in tensors
            if t is not None and t.dtype not in (torch.float32, torch.float16, torch.bfloat16)
        ]
        check(
            not bad and state_dtype == torch.float32,
            "the Triton kernels take float32/float16/bfloat16 tensors and a float32 state, "
            f"got {bad or state_dtype}",
        )
    return backend == "triton"


def ssd(
    x, dt, A, B, C, chunk_size=64, D=None, dt_bias=None, initial_state=None, return_final_state=False,
    backend="auto",
):  # fmt: skip
    """The scan of the Mamba2 layer: x (b, T, g_x, p), dt (b, T, h), A (h,) < 0, B (b, T, g_B, n),
    C (b, T, g_C, n) -> y (b, T, h, p) in x's dtype, plus the final state (b, h, p, n) in fp32 when
    return_final_state.
    backend: "auto" (Triton for CUDA tensors without gradients, else ssd_chunked), "torch" or "triton"."""
    _check_inputs(x, dt, A, B, C, D, dt_bias, initial_state, step=False)
    check(
        chunk_size in (16, 32, 64, 128, 256),
        f"chunk_size must be a power of 2 in [16, 256] (mamba_ssm's Triton SSD gives NaN for others), "
        f"got {chunk_size}",
    )
    _check_A(A)  # one host sync per prefill, none per decode step
    if use_triton(backend, (x, dt, A, B, C, D, dt_bias, initial_state)):
        y, final = ssd_triton(x, dt, A, B, C, chunk_size, D, dt_bias, initial_state)
        return (y, final) if return_final_state else y
    return ssd_chunked(x, dt, A, B, C, chunk_size, D, dt_bias, initial_state, return_final_state)


def ssm_step(state, x, dt, A, B, C, D=None, dt_bias=None, backend="auto"):
    """One decode token: state (b, h, p, n) fp32 updated in place; x (b, g_x, p), dt (b, h), B (b, g_B, n),
    C (b, g_C, n) -> y (b, h, p). No host synchronisation (A < 0 is checked only under ZEBRA_DEBUG=1)."""
    _check_inputs(x, dt, A, B, C, D, dt_bias, state, step=True)
    if DEBUG:
        _check_A(A)
    if use_triton(backend, (x, dt, A, B, C, D, dt_bias), state.dtype):
        return ssm_step_fwd(state, x, dt, A, B, C, D, dt_bias)
    return ssm_step_ref(state, x, dt, A, B, C, D, dt_bias)


# ----------------------------------------------------------------------------- self-test and timing


def random_inputs(b, T, h, p, n, groups=(1, 1, 1), dtype=torch.float32, device="cpu", seed=0):
    """Random ssd() keyword inputs with Mamba2's initial values (mamba_ssm's, kept by Zebra-Llama):
    A = −U(1, 16), dt_bias = softplus⁻¹ of a log-uniform Δ in [1e-3, 0.1]; groups = (g_x, g_B, g_C);
    x, B, C, raw dt, D and the initial state are Gaussian."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    d0 = torch.exp(math.log(1e-3) + math.log(100.0) * torch.rand(h, generator=gen))  # Δ at init, log-uniform
    t = dict(
        x=r(b, T, groups[0], p),
        dt=0.5 * r(b, T, h),
        A=-1.0 - 15.0 * torch.rand(h, generator=gen),
        B=r(b, T, groups[1], n),
        C=r(b, T, groups[2], n),
        D=r(h),
        dt_bias=d0 + torch.log(-torch.expm1(-d0)),
        initial_state=r(b, h, p, n),
    )
    return {k: v.to(device=device, dtype=dtype) for k, v in t.items()}


def rel_rms(a, ref):
    """‖a − ref‖₂ / ‖ref‖₂ in fp64: the error metric of every check (as fla's tests)."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _median_ms(fn, reps):
    fn()  # warm-up; timeit times with time.perf_counter
    return 1e3 * statistics.median(timeit.repeat(fn, number=1, repeat=reps))


def _self_test(backend, inp, y_ref, s_ref):
    """ssd over 77 tokens, and prefill 70 + decode 7 steps from its final state, against the fp64 loop."""
    y, s = ssd(**inp, chunk_size=16, return_final_state=True, backend=backend)
    head = {k: v[:, :70] if k in ("x", "dt", "B", "C") else v for k, v in inp.items()}
    _, state = ssd(**head, chunk_size=16, return_final_state=True, backend=backend)
    per_head = {k: inp[k] for k in ("A", "D", "dt_bias")}
    ys = [
        ssm_step(
            state,
            inp["x"][:, t],
            inp["dt"][:, t],
            B=inp["B"][:, t],
            C=inp["C"][:, t],
            backend=backend,
            **per_head,
        )
        for t in range(70, 77)
    ]
    checks = [
        ("ssd y", y, y_ref),
        ("ssd final state", s, s_ref),
        ("7 steps y", torch.stack(ys, dim=1), y_ref[:, 70:]),
        ("7 steps state", state, s_ref),
    ]
    for name, got, want in checks:
        ok = rel_rms(got, want) < 1e-5
        diff = (got.double().cpu() - want).abs().max()
        print(f"{backend:7s}{name:16s} max abs diff {diff:.1e}  {'OK' if ok else 'NOT OK'}")
        assert ok, (backend, name)


def _timing():
    """CPU: the loop vs ssd_chunked at Zebra-135m's Mamba2 shape; on CUDA also torch vs Triton in bf16."""
    print(
        "\ntiming: b 1, T 4096, h 9, p = n = 64, groups (3, 3, 9), chunk 64, "
        f"{torch.get_num_threads()} CPU threads"
    )
    cpu = random_inputs(1, 4096, 9, 64, 64, groups=(3, 3, 9))
    with torch.no_grad():
        t_seq = _median_ms(lambda: ssm_scan_ref(**cpu), 3)
        t_chunk = _median_ms(lambda: ssd_chunked(**cpu), 7)
    rows = [
        ("sequential loop (ssm_scan_ref), fp32", "cpu", t_seq, 1.0),
        ("chunked (ssd_chunked), fp32", "cpu", t_chunk, t_seq / t_chunk),
    ]
    if torch.cuda.is_available() and HAS_TRITON:
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


if __name__ == "__main__":
    cuda = torch.cuda.is_available()
    kernels = HAS_TRITON and (cuda or os.environ.get("TRITON_INTERPRET") == "1")  # the interpreter is slow
    # every path vs the fp64 loop: Zebra's groups (x, B per KV group, C per head), a ragged length
    ref = random_inputs(2, 77, 4, 16, 24, groups=(2, 2, 4), dtype=torch.float64)
    y_ref, s_ref = ssm_scan_ref(**ref, return_final_state=True)
    inp = {k: v.to("cuda" if cuda else "cpu", torch.float32) for k, v in ref.items()}
    for backend in ["torch"] + ["triton"] * kernels:
        _self_test(backend, inp, y_ref, s_ref)
    _timing()
