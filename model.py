"""One model class for the teacher, the two ILD students, the bench peers and the Zebra hybrid.

Zebra-Llama (arXiv 2505.17272) keeps a pre-trained Llama's blocks and swaps each layer's mixer:
"attn" (the teacher's grouped-query attention), "mla" (DeepSeek-V3's multi-head latent attention)
or "m2" (MambaInLlama's Mamba2 SSM). `ModelConfig.kinds` says which one each layer has. The three
mixers live here; their math lives beside its kernels: ssm_scan.py (the SSD scan and decode step) and
mla.py (absorbed MLA decode). Every block is the Llama pre-norm block h = h + mixer(norm(h));
h = h + mlp(norm(h)). "Official" below means the authors' code, https://github.com/AMD-AGI/AMD-Hybrid-Models
(paths inside its Zebra-Llama/ folder, e.g. hybrid/mla/hybrid_model.py for the MLA block); "[project]"
marks where this file departs from it.

Decoding keeps one cache per layer (AttnCache, MLACache, SSMCache), allocated once at its full length
S_max and written in place. A decode step (T = 1) attends over the whole allocation with a mask and reads
nothing back to the host, so it can be compiled into a CUDA graph (generate.py --compile).

Glossary (shape letters used in the comments):
  B batch, T tokens in this call, S cache rows attended (S_max allocated), D d_model, L layers, V vocab,
  H query heads, G KV groups (n_kv_head), P head dim (= Mamba2 state size N here), Q scan chunk,
  r_q / r_kv MLA query / latent ranks, d_N / d_R / d_V MLA nope / rope / value head dims.

Run the tests: python -m pytest tests/test_model.py
"""

import hashlib
import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import ssm_scan
from mla import mla_decode_full

KINDS = ("attn", "mla", "m2")


# ----------------------------------------------------------------------------- config
@dataclass
class ModelConfig:
    vocab_size: int
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    head_dim: int
    d_ff: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3 rope scaling (1.0 = none): factor, low/high freq factor, original context
    rope_factor: float = 1.0
    rope_low_freq: float = 1.0
    rope_high_freq: float = 4.0
    rope_orig_ctx: int = 8192
    tie_embeddings: bool = True
    max_seq_len: int = 8192
    kinds: list = None  # layer kind per index; None = all "attn" (the teacher)
    # hybrid fields: the size's default MLA layers and the MLA shapes (see SIZES)
    mla_layers: list = field(default_factory=list)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_pair_rule: str = "high"  # how the MLA rope pairs were chosen (convert.select_rope_pairs)
    rope_pairs: dict = None  # {layer: [teacher pair index, ...]} for MLA layers; None = "high" pairs
    # Mamba2 as the official train_hybrid/train_distill.py builds it: expand 1, H heads with
    # P = N = head_dim, x/B per KV group, C per head
    d_conv: int = 4
    chunk_size: int = 64

    def __post_init__(self):
        if self.kinds is None:
            self.kinds = ["attn"] * self.n_layer
        self.kinds = list(self.kinds)
        self.mla_layers = [int(i) for i in self.mla_layers]
        bad = [k for k in self.kinds if k not in KINDS]
        if len(self.kinds) != self.n_layer or bad:
            raise ValueError(f"kinds must list one of {KINDS} per layer ({self.n_layer}); got {self.kinds}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if "mla" in self.kinds or self.mla_layers:
            if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
                raise ValueError(
                    f"qk_rope_head_dim {self.qk_rope_head_dim} must be even and <= head_dim {self.head_dim}"
                )
            if self.v_head_dim != self.head_dim:
                raise ValueError(
                    f"v_head_dim {self.v_head_dim} must equal head_dim {self.head_dim} (out_proj is copied)"
                )
        # checkpoints store dicts as JSON-like data: layer keys may come back as strings
        pairs = self.rope_pairs or {}
        self.rope_pairs = {int(i): [int(j) for j in p] for i, p in pairs.items()}
        for i, p in self.rope_pairs.items():
            if len(p) != self.qk_rope_head_dim // 2 or not all(0 <= j < self.head_dim // 2 for j in p):
                raise ValueError(
                    f"rope_pairs of layer {i} must be {self.qk_rope_head_dim // 2} teacher pair indices "
                    f"in [0, {self.head_dim // 2}); got {p}"
                )
        self.n_rep = self.n_head // self.n_kv_head  # query heads per KV group
        self.d_inner = self.n_head * self.head_dim  # Mamba2 x/C width (expand 1)
        self.d_xb = self.n_kv_head * self.head_dim  # Mamba2 x/B width before the GQA repeat

    @classmethod
    def from_dict(cls, d, source):
        """The config stored in a checkpoint or an exported config.json; missing or unknown keys are named."""
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing, unknown = sorted(required - d.keys()), sorted(d.keys() - known)
        if missing or unknown:
            keys = ", ".join(
                f"{name} keys {k}" for name, k in (("missing", missing), ("unknown", unknown)) if k
            )
            raise ValueError(
                f"the model config in {source} has {keys}: it was written by another program or version; "
                "convert or export it again"
            )
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"the model config in {source} is inconsistent: {e}") from None

    def layer_kind(self, i):
        return self.kinds[i]

    def pairs_for(self, i):
        """The teacher rotation pairs kept by MLA layer i (default "high": the highest frequencies)."""
        return self.rope_pairs.get(i, list(range(self.qk_rope_head_dim // 2)))

    def kv_bytes_per_token(self, elt=2):
        """Cache bytes that grow with each token (what the paper's KV-cache sizes count): 2*G*P per attention
        layer, r_kv + d_R per MLA layer, nothing for Mamba2 (its state is constant). elt = bytes per element
        (2 for bf16)."""
        per = {
            "attn": 2 * self.n_kv_head * self.head_dim,
            "mla": self.kv_lora_rank + self.qk_rope_head_dim,
            "m2": 0,
        }
        return elt * sum(per[k] for k in self.kinds)

    def to_dict(self):
        d = asdict(self)
        d["rope_pairs"] = {str(k): v for k, v in self.rope_pairs.items()}
        return d


# Exact keys only: no fuzzy matching, nothing guessed from file names. 1b/3b/8b: the paper's published
# configs (layer lists, ranks and dims of the official configs/*/zebra_*_8bt_SFT.yaml); [project] 135m: a
# SmolLM2-135M teacher with ranks scaled from the 1B ratios; tiny: a random Llama for tests and the smoke run.
# One line per group: the teacher's dims, its attention heads, the MLA layers and ranks, the MLA head dims.
_LLAMA3 = dict(vocab_size=128256, rope_theta=5e5, rope_factor=32.0, max_seq_len=131072)
SIZES = {
    "tiny": (
        dict(vocab_size=272, n_layer=4, d_model=64, d_ff=128, max_seq_len=512, chunk_size=16)
        | dict(n_head=4, n_kv_head=2, head_dim=16)
        | dict(mla_layers=[0, 2], q_lora_rank=32, kv_lora_rank=16)
        | dict(qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)
    ),
    "135m": (
        dict(vocab_size=49152, n_layer=30, d_model=576, d_ff=1536, rope_theta=1e5, max_seq_len=8192)
        | dict(n_head=9, n_kv_head=3, head_dim=64)
        | dict(mla_layers=[0, 6, 12, 18, 24, 28], q_lora_rank=384, kv_lora_rank=48)
        | dict(qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64)
    ),
    "1b": (
        _LLAMA3
        | dict(n_layer=16, d_model=2048, d_ff=8192)
        | dict(n_head=32, n_kv_head=8, head_dim=64)
        | dict(mla_layers=[0, 5, 10, 14], q_lora_rank=1344, kv_lora_rank=128)
        | dict(qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64)
    ),
    "3b": (
        _LLAMA3
        | dict(n_layer=28, d_model=3072, d_ff=8192)
        | dict(n_head=24, n_kv_head=8, head_dim=128)
        | dict(mla_layers=[0, 5, 10, 16, 21, 26], q_lora_rank=1536, kv_lora_rank=128)
        | dict(qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128)
    ),
    "8b": (
        _LLAMA3
        | dict(n_layer=32, d_model=4096, d_ff=14336, rope_factor=8.0, tie_embeddings=False)  # Llama-3.1
        | dict(n_head=32, n_kv_head=8, head_dim=128)
        | dict(mla_layers=[0, 4, 8, 12, 16, 20, 25, 30], q_lora_rank=2048, kv_lora_rank=160)
        | dict(qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128)
    ),
}


def size_config(size, **overrides):
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    return ModelConfig(**{**SIZES[size], **overrides})


# ----------------------------------------------------------------------------- shared pieces
def cpu_has_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether this processor multiplies bf16 natively (AVX512-BF16 or AMX), from the flags of cpuinfo.
    Without either, torch runs bf16 matmuls emulated, slower than fp32."""
    if not os.path.isfile(cpuinfo):
        return False
    with open(cpuinfo) as f:
        flags = next((line.split() for line in f if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 so bf16 activations keep their precision (as HF Llama)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_freqs(cfg, device=None):
    """Rotation frequency of each of the head_dim/2 RoPE pairs, with Llama-3 scaling.

    Pair j rotates dims (j, j + head_dim/2) (HF half-split layout, the only layout in this repo).
    Llama-3 scaling divides low frequencies (wavelength > orig_ctx / low_freq) by `rope_factor`,
    keeps high ones (wavelength < orig_ctx / high_freq) and blends linearly in between.
    """
    j = torch.arange(0, cfg.head_dim, 2, device=device, dtype=torch.float64)
    f = cfg.rope_theta ** (-j / cfg.head_dim)  # (head_dim/2,)
    if cfg.rope_factor != 1.0:
        wavelen = 2 * math.pi / f
        u = (cfg.rope_orig_ctx / wavelen - cfg.rope_low_freq) / (cfg.rope_high_freq - cfg.rope_low_freq)
        smooth = (1 - u) * f / cfg.rope_factor + u * f
        f = torch.where(
            wavelen < cfg.rope_orig_ctx / cfg.rope_high_freq,
            f,
            torch.where(wavelen > cfg.rope_orig_ctx / cfg.rope_low_freq, f / cfg.rope_factor, smooth),
        )
    return f.float()


def apply_rope(x, cos, sin):
    """x (B, T, H, P) in the half-split layout: pair i is (x_i, x_{i+P/2}) and turns by the angle whose
    cos/sin (B|1, T, P/2) sit in column i. MLA passes the columns of its kept teacher pairs."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, T, H, P/2) each
    cos, sin = cos[:, :, None], sin[:, :, None]  # (B|1, T, 1, P/2)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------- per-layer caches
# One NamedTuple per layer kind. Each is allocated once at its full length S_max (Model.allocate_cache) and
# written in place, so a compiled decode step sees the same tensors at every call.
class AttnCache(NamedTuple):
    k: torch.Tensor  # (B, S_max, G, P) rotated keys
    v: torch.Tensor  # (B, S_max, G, P)


class MLACache(NamedTuple):
    kv: torch.Tensor  # (B, S_max, r_kv + d_R): per token [latent c ; rotated shared key k^R]


class SSMCache(NamedTuple):
    conv: torch.Tensor  # (B, C_conv, d_conv - 1): the last inputs of the causal conv
    ssm: torch.Tensor  # (B, H, P, N) fp32: the SSM state (constant size, whatever the length)


def cached_len(pos, T, S_max):
    """How many cache rows a call with T new tokens attends over, rows past each sequence's length masked.

    Decode (T == 1) takes the whole allocation: a step never reads a length back to the host, so it can be
    captured in a CUDA graph (generate.py checks prompt + new tokens <= S_max once, up front). Prefill reads
    the longest row back once to skip the empty tail, and checks that the new tokens fit.
    """
    if T == 1:
        return S_max
    S = int(pos.max()) + T
    if S > S_max:
        raise ValueError(
            f"cache overflow: position {S} > cache length {S_max}; allocate a longer cache (max_len) "
            "or shorten the prompt"
        )
    return S


def write_rows(buf, new, pos):
    """Write new (B, T, ...) into buf (B, S_max, ...) at rows pos[b] .. pos[b]+T-1 of each sequence b."""
    B, T = new.shape[:2]
    rows = pos[:, None] + torch.arange(T, device=pos.device)  # (B, T)
    buf[torch.arange(B, device=pos.device)[:, None], rows] = new.to(buf.dtype)


def causal_mask(pos, T, S):
    """(B, 1, T, S) bool: query t of row b sees keys s <= pos[b] + t (per-row lengths in one batch)."""
    q = pos[:, None] + torch.arange(T, device=pos.device)  # (B, T)
    return (torch.arange(S, device=pos.device) <= q[:, :, None])[:, None]


# ----------------------------------------------------------------------------- GQA attention (teacher)
class Attention(nn.Module):
    """Llama grouped-query attention: H query heads share G key/value heads."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, G, P = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, H * P, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, G * P, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, G * P, bias=False)
        self.o_proj = nn.Linear(H * P, cfg.d_model, bias=False)

    def allocate_cache(self, batch, max_len, dtype, device):
        shape = (batch, max_len, self.cfg.n_kv_head, self.cfg.head_dim)
        return AttnCache(
            torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        )

    def forward(self, x, cos, sin, cache=None, pos=None):
        """x (B, T, D). Without a cache: causal over the T tokens. With one: the T tokens continue each
        sequence b at pos[b] (the caller advances pos)."""
        B, T, _ = x.shape
        H, G, P = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        q = apply_rope(self.q_proj(x).view(B, T, H, P), cos, sin)  # (B, T, H, P)
        k = apply_rope(self.k_proj(x).view(B, T, G, P), cos, sin)  # (B, T, G, P)
        v = self.v_proj(x).view(B, T, G, P)
        if cache is not None:
            S = cached_len(pos, T, cache.k.shape[1])
            write_rows(cache.k, k, pos)
            write_rows(cache.v, v, pos)
        if cache is None or S == T:  # training, or prompts into an empty cache: plain causal SDPA
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|G, T, P)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, H, T, P)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, H * P))
        # Fold the H/G query heads of a group into the query axis so the cache is read once,
        # never repeated in memory: q (B, G, rep*T, P) against k, v (B, G, S, P).
        rep = H // G
        q = q.view(B, T, G, rep, P).permute(0, 2, 3, 1, 4).reshape(B, G, rep * T, P)
        mask = causal_mask(pos, T, S)[:, :, None].expand(B, 1, rep, T, S).reshape(B, 1, rep * T, S)
        k, v = cache.k[:, :S].transpose(1, 2), cache.v[:, :S].transpose(1, 2)  # (B, G, S, P)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, G, rep*T, P)
        y = y.view(B, G, rep, T, P).permute(0, 3, 1, 2, 4).reshape(B, T, H * P)  # back to (B, T, H*P)
        return self.o_proj(y)


# ----------------------------------------------------------------------------- MLA mixer
class MLA(nn.Module):
    """Multi-head latent attention as the official hybrid/mla/hybrid_mla_layer.py, with its DeepSeek-V3
    parameter names (use_lora_layer_norm=false: no norms between the projections).

    q = q_b(q_a(x)) split per head into [q^N (d_N) ; q^R (d_R)]; [c ; k^R] = kv_a(x) with c the r_kv latent
    and k^R one rope key shared by all heads; per KV group g, [k^N_g ; v_g] = kv_b(c), and head h reads group
    h // (H/G). [project] The rope block turns with the teacher's own rotation pairs `rope_pairs` (d_R/2
    teacher pair indices, chosen at conversion) at the teacher's frequencies; the official code uses a YaRN
    table over each head's last d_R dims. The cache keeps [c ; rotated k^R] per token; training and prefill
    decompress K and V, decode absorbs kv_b into the query and the output (mla.py's docstring).
    """

    def __init__(self, cfg, rope_pairs):
        super().__init__()
        self.cfg = cfg
        H, G, r = cfg.n_head, cfg.n_kv_head, cfg.kv_lora_rank
        dN, dR, dV = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        # logits scale: the per-head query width d_N + d_R, as in the teacher; never the width r_kv + d_R of
        # the absorbed decode's dot products, which would change the softmax
        self.scale = (dN + dR) ** -0.5
        self.q_a_proj = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=False)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * (dN + dR), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.d_model, r + dR, bias=False)
        self.kv_b_proj = nn.Linear(r, G * (dN + dV), bias=False)
        self.out_proj = nn.Linear(H * dV, cfg.d_model, bias=False)
        self.register_buffer("rope_pairs", torch.as_tensor(rope_pairs, dtype=torch.long))

    def allocate_cache(self, batch, max_len, dtype, device):
        width = self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim
        return MLACache(torch.zeros(batch, max_len, width, dtype=dtype, device=device))

    def attend(self, q_nope, q_pe, c, k_pe, mask):
        """Decompressed attention: q (B, T, H, ·), latents c (B, S, r_kv), k_pe (B, S, d_R).
        mask (B, 1, T, S) or None = causal over T = S."""
        cfg = self.cfg
        (B, T, H, _), S, G = q_nope.shape, c.shape[1], cfg.n_kv_head
        dN, dR, dV = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        k_nope, v = self.kv_b_proj(c).view(B, S, G, dN + dV).split([dN, dV], -1)  # (B, S, G, ·)
        q = torch.cat([q_nope, q_pe], -1).transpose(1, 2)  # (B, H, T, d_N + d_R)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(B, S, G, dR)], -1)  # (B, S, G, d_N + d_R)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, G, S, ·)
        # enable_gqa maps head h to group h // (H/G) (Llama's repeat_kv grouping) without copying K/V
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True
        )  # (B, H, T, d_V)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, H * dV))

    def forward(self, x, cos, sin, cache=None, pos=None):
        """x (B, T, D), cos/sin (B|1, T, head_dim/2) the teacher's tables; cache and pos as Attention."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, r = cfg.n_head, cfg.kv_lora_rank
        dN, dR, dV = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q_nope, q_pe = self.q_b_proj(self.q_a_proj(x)).view(B, T, H, dN + dR).split([dN, dR], -1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([r, dR], -1)  # (B, T, r_kv), (B, T, d_R)
        cos, sin = cos[..., self.rope_pairs], sin[..., self.rope_pairs]  # (B|1, T, d_R/2): the kept pairs
        q_pe = apply_rope(q_pe, cos, sin)  # (B, T, H, d_R)
        k_pe = apply_rope(k_pe[:, :, None], cos, sin)[:, :, 0]  # (B, T, d_R): one key shared by all heads
        if cache is None:
            return self.attend(q_nope, q_pe, c, k_pe, None)
        S = cached_len(pos, T, cache.kv.shape[1])
        write_rows(cache.kv, torch.cat([c, k_pe], -1), pos)  # (B, T, r_kv + d_R)
        if T == 1:
            # weight absorption (DeepSeek-V3 inference/model.py): kv_b_proj rows are [k^N ; v] per group, so
            # W_UK and W_UV are views, no copy
            W = self.kv_b_proj.weight.view(cfg.n_kv_head, dN + dV, r)  # (G, d_N + d_V, r_kv)
            # cache_seqlens = pos + 1: the new token, just written, attends to itself
            o = mla_decode_full(q_nope[:, 0], q_pe[:, 0], cache.kv, pos + 1, W[:, :dN], W[:, dN:], self.scale)
            return self.out_proj(o.reshape(B, 1, H * dV))  # o (B, H, d_V)
        if S == T:  # prompts into an empty cache: causal over the T tokens, as without a cache
            return self.attend(q_nope, q_pe, c, k_pe, None)
        rows = cache.kv[:, :S]  # (B, S, r_kv + d_R)
        return self.attend(q_nope, q_pe, rows[..., :r], rows[..., r:], causal_mask(pos, T, S))


# ----------------------------------------------------------------------------- Mamba2 mixer
class Mamba2(nn.Module):
    """The Mamba2 variant of MambaInLlama / Zebra (official hybrid/mamba2/hybrid_mamba2_layer.py): expand 1,
    H heads, P = N = head_dim.

    in_proj emits [z | x | B | C | dt] of widths [H*P, G*P, G*P, H*P, H]; x and B keep the teacher's G
    KV groups (MambaInLlama's init seeds them from W_V and W_K) and head h reads group h // (H/G) inside
    the scan, C has one group per head (seeded from W_Q). A depthwise causal conv (k = d_conv) runs over
    [x | B | C] before any repeat.
    """

    # The per-head scalars, kept fp32 by Model.cast whatever the weights' dtype: they set every token's step
    # Δ = softplus(dt + dt_bias) and decay exp(Δ·A), which compound over the sequence; bf16 keeps 8 bits of
    # mantissa. mamba_ssm's Mamba2 builds D in fp32 whatever its dtype and reads A as -exp(A_log.float()).
    FP32 = ("A_log", "dt_bias", "D")

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H = cfg.n_head
        self.conv_dim = cfg.d_xb * 2 + cfg.d_inner
        self.in_proj = nn.Linear(cfg.d_model, 2 * cfg.d_inner + 2 * cfg.d_xb + H, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, bias=True)
        # random parts as mamba_ssm's Mamba2: dt ~ logU[1e-3, 0.1] stored as softplus^-1,
        # A ~ -U[1, 16]
        dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = RMSNorm(cfg.d_inner, eps=1e-5)  # gated, per head group of P channels
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=False)

    def allocate_cache(self, batch, max_len, dtype, device):
        H, P = self.cfg.n_head, self.cfg.head_dim
        return SSMCache(
            torch.zeros(batch, self.conv_dim, self.cfg.d_conv - 1, dtype=dtype, device=device),
            torch.zeros(batch, H, P, P, dtype=torch.float32, device=device),
        )

    def forward(self, u, cos=None, sin=None, cache=None, pos=None):
        """u (B, T, D); cos/sin/pos unused (no positions in an SSM), the cache advances in place."""
        if cache is not None and u.shape[1] == 1:
            return self.step(u, cache)
        cfg = self.cfg
        B, T, _ = u.shape
        H, G, P, K = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_conv
        z, xBC, dt = self.in_proj(u).split([cfg.d_inner, self.conv_dim, H], dim=-1)
        # causal depthwise conv over time: left context is the conv state (zeros at the start)
        xBC = xBC.transpose(1, 2)  # (B, C_conv, T)
        ctx = cache.conv if cache is not None else xBC.new_zeros(B, self.conv_dim, K - 1)
        xpad = torch.cat([ctx.to(xBC.dtype), xBC], dim=-1)  # (B, C_conv, d_conv-1+T)
        if cache is not None:
            cache.conv.copy_(xpad[..., -(K - 1) :])
        # one multiply-add per tap from the bias up, as step() below and in oneDNN's order (fp32 gives
        # F.conv1d's bits); unlike a depthwise F.conv1d it stays fast in bf16 on CPUs without native bf16
        w, y = self.conv1d.weight[:, 0, :, None], self.conv1d.bias[:, None]  # (C_conv, K, 1), (C_conv, 1)
        for k in range(K):
            y = torch.addcmul(y, xpad[..., k : k + T], w[:, k])  # (B, C_conv, T)
        xBC = y
        x, Bm, C = F.silu(xBC).transpose(1, 2).split([cfg.d_xb, cfg.d_xb, cfg.d_inner], dim=-1)
        x, Bm, C = x.view(B, T, G, P), Bm.view(B, T, G, P), C.view(B, T, H, P)
        A = -torch.exp(self.A_log.float())  # (H,) < 0
        y, final = ssm_scan.ssd(
            x,
            dt,
            A,
            Bm,
            C,
            chunk_size=cfg.chunk_size,
            D=self.D,
            dt_bias=self.dt_bias,
            initial_state=cache.ssm if cache is not None else None,
            return_final_state=True,
        )  # (B, T, H, P)
        if cache is not None:
            cache.ssm.copy_(final)
        return self.gate_norm_out(y, z, u.dtype)

    def gate_norm_out(self, y, z, dtype):
        """y, z (B, T, H·P) -> out_proj of the gated RMSNorm: the gate before the norm
        (norm_before_gate=False), then RMSNorm per head group of P channels, in fp32."""
        B, T, H, P = *z.shape[:2], self.cfg.n_head, self.cfg.head_dim
        y = y.reshape(B, T, H, P).float() * F.silu(z.float()).view(B, T, H, P)
        y = F.rms_norm(y, (P,), eps=self.norm.eps).reshape(B, T, -1)
        return self.out_proj((y * self.norm.weight.float()).to(dtype))

    def step(self, u, cache):
        """One decode token: u (B, 1, D) -> (B, 1, D), the conv and SSM states advanced in place. The forward
        for T = 1 in fewer, larger ops, as mamba_ssm's Mamba2.step (its torch path without causal_conv1d and
        selective_state_update): a decode token is a few thousand numbers per layer, so its time goes to the
        count of ops, not to their size. In fp32 it rounds as the forward's conv and ssm_scan.ssm_step_ref do
        (the same products and sums, in the same order); the conv and the SSM run in fp32 whatever the
        weights' dtype."""
        cfg = self.cfg
        B, H, G, P = u.shape[0], cfg.n_head, cfg.n_kv_head, cfg.head_dim
        rep = H // G  # heads per x/B group
        z, xBC, dt = self.in_proj(u[:, 0]).split([cfg.d_inner, self.conv_dim, H], dim=-1)  # (B, ·)
        # the conv over the window [kept inputs ; new input], one multiply-add per tap from the bias up, in
        # the order of oneDNN's depthwise conv1d, so fp32 gives the prefill's bits
        window = torch.cat([cache.conv, xBC[..., None].to(cache.conv.dtype)], -1)  # (B, C_conv, d_conv)
        cache.conv.copy_(window[..., 1:])
        xBC = self.conv1d.bias.float()  # (C_conv,)
        for x_k, w_k in zip(window.float().unbind(-1), self.conv1d.weight[:, 0].float().unbind(-1)):
            xBC = torch.addcmul(xBC, x_k, w_k)  # (B, C_conv)
        x, Bm, C = F.silu(xBC).split([cfg.d_xb, cfg.d_xb, cfg.d_inner], dim=-1)
        A = -torch.exp(self.A_log.float())  # (H,) < 0
        if ssm_scan.use_triton("auto", (x, dt, A)):  # the fused kernel (mamba_ssm's selective_state_update)
            x, Bm, C = x.view(B, G, P), Bm.view(B, G, P), C.view(B, H, P)
            y = ssm_scan.ssm_step(cache.ssm, x, dt, A, Bm, C, D=self.D, dt_bias=self.dt_bias)  # (B, H, P)
            return self.gate_norm_out(y[:, None], z[:, None], u.dtype)
        # S <- exp(Δ·A)·S + outer(Δ·x, B), head h reading x/B group h // rep without repeating them in
        # memory: the state seen as (B·G, rep·P, N) takes a group's outer products as one batched matmul
        delta = F.softplus(dt.float() + self.dt_bias.float())  # (B, H)
        x = x.view(B, G, 1, P)
        dx = delta.view(B, G, rep, 1) * x  # (B, G, rep, P)
        S = cache.ssm.mul_(torch.exp(delta * A)[..., None, None])  # (B, H, P, N)
        S.view(B * G, rep * P, P).baddbmm_(dx.reshape(B * G, rep * P, 1), Bm.reshape(B * G, 1, P))
        y = torch.einsum("bhpn,bhn->bhp", S, C.reshape(B, H, P))  # (B, H, P)
        y = y.view(B, G, rep, P) + self.D.float().view(G, rep, 1) * x  # the skip D·x
        return self.gate_norm_out(y, z[:, None], u.dtype)


# ----------------------------------------------------------------------------- blocks and the model
class Block(nn.Module):
    """Pre-norm Llama block with the mixer of this layer's kind; returns (h, mixer output) for ILD."""

    def __init__(self, cfg, i):
        super().__init__()
        self.kind = cfg.layer_kind(i)
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # upstream names: HF Llama and the official MLA layer use self_attn, the Mamba2 layer mamba
        if self.kind == "attn":
            self.self_attn = Attention(cfg)
        elif self.kind == "mla":
            self.self_attn = MLA(cfg, cfg.pairs_for(i))
        else:
            self.mamba = Mamba2(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    @property
    def mixer(self):
        return self.mamba if self.kind == "m2" else self.self_attn

    def forward(self, h, cos, sin, cache=None, pos=None, mixer_only=False):
        a = self.mixer(self.input_layernorm(h), cos, sin, cache, pos)
        if mixer_only:  # ILD's mixer target: the MLP is the teacher's and stays frozen
            return a
        h = h + a  # out of place: FSDP2 hooks must see a fresh tensor
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, a


class Cache:
    """Decode state of a whole model: one AttnCache / MLACache / SSMCache per layer (`layers`) and each
    sequence's length `pos` (B,). `rows(sl)` views a subset of sequences (prefill one prompt of a batch
    in place)."""

    def __init__(self, layers, pos, kinds):
        self.layers, self.pos, self.kinds = layers, pos, kinds

    def rows(self, sl):
        return Cache([type(c)(*(t[sl] for t in c)) for c in self.layers], self.pos[sl], self.kinds)

    def nbytes(self, kinds=KINDS):
        """Bytes held by the layers of the given kinds (("attn", "mla") = what grows with length)."""
        return sum(t.nbytes for k, c in zip(self.kinds, self.layers) if k in kinds for t in c)


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def allocate_cache(self, batch, max_len, dtype=None, device=None):
        """A zeroed Cache for `batch` sequences of up to max_len tokens (prompt + generated)."""
        w = self.embed_tokens.weight
        dtype, device = dtype or w.dtype, device or w.device
        layers = [b.mixer.allocate_cache(batch, max_len, dtype, device) for b in self.layers]
        cache = Cache(layers, torch.zeros(batch, dtype=torch.long, device=device), self.cfg.kinds)
        if torch.device(device).type == "cuda":  # a compiled step's CUDA graphs write these very tensors
            for t in [cache.pos, *(t for c in layers for t in c)]:
                torch._dynamo.mark_static_address(t, guard=False)
        return cache

    def rope(self, positions):
        """cos, sin (B, T, head_dim/2) of the teacher's frequencies at `positions` (B, T)."""
        ang = positions[..., None].float() * rope_freqs(self.cfg, positions.device)
        return ang.cos(), ang.sin()

    def forward(
        self, idx, cache=None, return_layers=False, layer_inputs=None, logits=True, mixers_only=False
    ):
        """idx (B, T) -> logits (B, T, V). With a cache, the T tokens continue each sequence at cache.pos and
        the cache advances. return_layers adds per layer the block inputs, block outputs (the last one after
        the final norm) and mixer outputs; layer_inputs (L tensors (B, T, D)) feeds block i the given input
        instead of block i-1's output: ILD's teacher forcing, as the official trainer/kd_trainer.py; with
        mixers_only, only the mixer outputs, one per layer, and no MLP runs."""
        B, T = idx.shape
        if cache is None and T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        pos = cache.pos if cache is not None else None
        start = pos[:, None] if cache is not None else torch.zeros(1, 1, dtype=torch.long, device=idx.device)
        cos, sin = self.rope(start + torch.arange(T, device=idx.device))  # (B|1, T, head_dim/2)
        if mixers_only:
            return [block(h, cos, sin, mixer_only=True) for block, h in zip(self.layers, layer_inputs)]
        caches = cache.layers if cache is not None else [None] * len(self.layers)
        h = self.embed_tokens(idx) if layer_inputs is None else None
        ins, outs, mixes = [], [], []
        for i, (block, c) in enumerate(zip(self.layers, caches)):
            h = h if layer_inputs is None else layer_inputs[i]
            ins.append(h)
            h, a = block(h, cos, sin, c, pos)
            outs.append(h)
            mixes.append(a)
        if cache is not None:
            cache.pos += T
        h = outs[-1] = self.norm(h)
        out = self.lm_head(h) if logits else None
        return (out, ins, outs, mixes) if return_layers else out

    @classmethod
    def from_state_dict(cls, cfg, sd):
        """Build on the meta device (no memory), then take the tensors of sd, strictly."""
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(sd, strict=True, assign=True)
        if cfg.tie_embeddings:  # assign=True gives each tensor its own Parameter: tie the head again
            model.lm_head.weight = model.embed_tokens.weight
        return model.eval()

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights count once

    def cast(self, dtype=None, device=None):
        """-> self moved to device and cast to dtype for decoding (generate.py, bench.py), except Mamba2's
        per-head scalars (Mamba2.FP32), which stay fp32, converted from the source values, not from a bf16
        rounding of them. load_checkpoint's dtype casts every tensor alike (.to()), as training wants."""
        keep = [(m, name) for m in self.modules() if isinstance(m, Mamba2) for name in Mamba2.FP32]
        fp32 = [getattr(m, name).detach().to(device=device, dtype=torch.float32) for m, name in keep]
        self.to(device=device, dtype=dtype)
        for (m, name), t in zip(keep, fp32):
            getattr(m, name).data = t
        return self


# ----------------------------------------------------------------------------- checkpoints and side files
def atomic_write(path, write):
    """Write a file all at once: write(tmp) fills a temp file beside path, then os.replace publishes it, so a
    reader never sees half a file. On failure (disk full, unwritable folder) the temp file is removed and
    the error names the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(
            f"could not write {path} ({e}): check free space and write permission of {folder}"
        ) from None


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    atomic_write(path, write)


def read_json(path):
    """A JSON side file (smart.json, eval.json, data.json, config.json); a damaged one is named, with
    the fix."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is damaged ({e}): rerun the step that writes it, or put back a good copy"
        ) from None


def weights_digest(state_dict):
    """sha256 (hex) over each tensor's name, dtype, shape and raw bytes, in name order: any changed byte of
    any weight changes it. The bytes are hashed in place (no copy of a CPU or memory-mapped tensor)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # (nbytes,)
    return h.hexdigest()


def save_checkpoint(path, model, stage, step=0, tokenizer=None, state_dict=None, **extra):
    """One format for every stage, written atomically, with weights_digest of the weights so that a damaged
    file is refused when read. state_dict: an already gathered one (FSDP2), else the model's own.
    extra: more entries, e.g. teacher= the teacher source (a size key or a path) the weights come from."""
    sd = model.state_dict() if state_dict is None else state_dict
    ckpt = dict(
        config=model.cfg.to_dict(),
        model=sd,
        weights_sha256=weights_digest(sd),
        stage=stage,
        step=step,
        tokenizer=tokenizer.spec() if tokenizer is not None else None,
        **extra,
    )
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def read_checkpoint(path, device="cpu"):
    """The checkpoint dict (config, model, stage, step, tokenizer, ...) of a file written by
    save_checkpoint, without building a model. A missing, truncated, foreign or damaged file, or a config
    with missing keys, gives one error naming it and the fix."""
    if os.path.isdir(path):
        raise ValueError(
            f"{path} is a folder, not a checkpoint file: pass the .pt file (an export folder of "
            "`convert.py --export` is read by generate.py and bench.py)"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no checkpoint at {path}: run `python distill.py` or `python convert.py` first"
        )
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=True)
        if not isinstance(ckpt.get("config"), dict) or "model" not in ckpt:
            raise ValueError("no config and model entries")
    except Exception as e:  # a truncated or foreign file: say which and what to do
        raise ValueError(
            f"{path} is not a readable zebra checkpoint ({type(e).__name__}: {e}): rerun the stage that "
            "wrote it, or pass another checkpoint"
        ) from None
    if "weights_sha256" not in ckpt:
        raise ValueError(
            f"{path} carries no weights digest: it was written by an older version of this code; rerun the "
            "stage that wrote it"
        )
    if weights_digest(ckpt["model"]) != ckpt["weights_sha256"]:
        raise ValueError(
            f"{path} is damaged: its weights do not match the digest written with them (a changed byte on "
            "disk or in a copy); copy it again from a good source, or rerun the stage that wrote it"
        )
    ModelConfig.from_dict(ckpt["config"], path)
    return ckpt


def check_finite(state_dict, source):
    """Refuse weights holding NaN or inf (a diverged run, a damaged file): name the first bad tensor."""
    for name, t in state_dict.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"{source}: tensor {name} holds NaN or inf values (a diverged run or a damaged file); "
                "use an earlier checkpoint or rerun the stage that wrote it"
            )


def model_from_checkpoint(ckpt, source, device="cpu", dtype=None):
    """-> (model, ckpt) from a checkpoint dict (read_checkpoint's, or an export folder's read by convert):
    built on the meta device and filled strictly from it; non-finite weights are refused."""
    check_finite(ckpt["model"], source)
    try:
        model = Model.from_state_dict(ModelConfig.from_dict(ckpt["config"], source), ckpt["model"])
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
        raise ValueError(f"{source}: the weights do not fit its config ({e}); convert it again") from None
    return model.to(device=device, dtype=dtype), ckpt


def load_checkpoint(path, device="cpu", dtype=None):
    """-> (model, ckpt dict) from a checkpoint file (see read_checkpoint and model_from_checkpoint)."""
    return model_from_checkpoint(read_checkpoint(path, device), path, device, dtype)
