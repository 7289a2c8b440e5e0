"""One model class for the teacher, the two ILD students, the bench peers and the Zebra hybrid.

Zebra-Llama (arXiv 2505.17272) keeps a pre-trained Llama's blocks and swaps each layer's mixer:
"attn" (the teacher's GQA attention, paper.md §2), "mla" (multi-head latent attention, mla.py,
paper.md §3) or "m2" (Mamba2 SSM, paper.md §5). `ModelConfig.kinds` says which one each layer has.
Every block is the Llama pre-norm block h = h + mixer(norm(h)); h = h + mlp(norm(h)) (paper.md §7).

Glossary (shape letters used in the comments):
  B batch, T tokens in this call, S cache length, D d_model, L layers, V vocab,
  H query heads, G KV groups (n_kv_head), P head dim (= Mamba2 state size N here), Q scan chunk,
  r_q / r_kv MLA query / latent ranks, d_N / d_R / d_V MLA nope / rope / value head dims.

Run the tests: python -m pytest tests/test_model.py
"""

import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import mla as mla_mod
import ssm_scan

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
    rope_factor: float = (
        1.0  # Llama-3 rope scaling (1.0 = none): factor, low/high freq factor, original context
    )
    rope_low_freq: float = 1.0
    rope_high_freq: float = 4.0
    rope_orig_ctx: int = 8192
    tie_embeddings: bool = True
    max_seq_len: int = 8192
    kinds: list = None  # layer kind per index; None = all "attn" (the teacher)
    # hybrid fields (paper.md §3.6, §8): the size's default MLA layers and the MLA shapes
    mla_layers: list = field(default_factory=list)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_pair_rule: str = "high"  # how the MLA rope pairs were chosen (convert.select_rope_pairs)
    rope_pairs: dict = None  # {layer: [teacher pair index, ...]} for MLA layers; None = "high" pairs
    # Mamba2 (paper.md §5.1): expand 1, H heads with P = N = head_dim, x/B per KV group, C per head
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
        self.n_rep = self.n_head // self.n_kv_head  # query heads per KV group
        self.d_inner = self.n_head * self.head_dim  # Mamba2 x/C width (expand 1)
        self.d_xb = self.n_kv_head * self.head_dim  # Mamba2 x/B width before the GQA repeat

    def layer_kind(self, i):
        return self.kinds[i]

    def pairs_for(self, i):
        """The teacher rotation pairs kept by MLA layer i (default "high": the highest frequencies)."""
        return self.rope_pairs.get(i, list(range(self.qk_rope_head_dim // 2)))

    def kv_bytes_per_token(self, elt=2):
        """Cache bytes that grow with each token (paper.md §8.2): 2*G*P per attention layer, r_kv + d_R per MLA
        layer, nothing for Mamba2 (its state is constant). elt = bytes per element (2 for bf16)."""
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


def _llama(**kw):
    return dict(rope_theta=5e5, rope_factor=32.0, max_seq_len=131072, vocab_size=128256, **kw)


# Exact keys only (style.md rule 6). 1b/3b/8b: the paper's published configs (paper.md §3.6, §8.1);
# 135m: the project's SmolLM2 config (§8.4); tiny: a random Llama for tests and the smoke run.
SIZES = {
    "tiny": dict(
        vocab_size=272,
        n_layer=4,
        d_model=64,
        n_head=4,
        n_kv_head=2,
        head_dim=16,
        d_ff=128,
        max_seq_len=512,
        mla_layers=[0, 2],
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=16,
        chunk_size=16,
    ),
    "135m": dict(
        vocab_size=49152,
        n_layer=30,
        d_model=576,
        n_head=9,
        n_kv_head=3,
        head_dim=64,
        d_ff=1536,
        rope_theta=1e5,
        max_seq_len=8192,
        mla_layers=[0, 6, 12, 18, 24, 28],
        q_lora_rank=384,
        kv_lora_rank=48,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=64,
    ),
    "1b": _llama(
        n_layer=16,
        d_model=2048,
        n_head=32,
        n_kv_head=8,
        head_dim=64,
        d_ff=8192,
        mla_layers=[0, 5, 10, 14],
        q_lora_rank=1344,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=64,
    ),
    "3b": _llama(
        n_layer=28,
        d_model=3072,
        n_head=24,
        n_kv_head=8,
        head_dim=128,
        d_ff=8192,
        mla_layers=[0, 5, 10, 16, 21, 26],
        q_lora_rank=1536,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=64,
        v_head_dim=128,
    ),
    "8b": dict(
        _llama(
            n_layer=32,
            d_model=4096,
            n_head=32,
            n_kv_head=8,
            head_dim=128,
            d_ff=14336,
            mla_layers=[0, 4, 8, 12, 16, 20, 25, 30],
            q_lora_rank=2048,
            kv_lora_rank=160,
            qk_nope_head_dim=64,
            qk_rope_head_dim=64,
            v_head_dim=128,
        ),
        rope_factor=8.0,
        tie_embeddings=False,
    ),
}


def size_config(size, **overrides):
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    return ModelConfig(**{**SIZES[size], **overrides})


# ----------------------------------------------------------------------------- shared pieces
class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 so bf16 activations keep their precision (as HF Llama)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_freqs(cfg, device=None):
    """Rotation frequency of each of the head_dim/2 RoPE pairs, with Llama-3 scaling (paper.md §3.4).

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
    """x (B, T, H, P) half-split layout; cos/sin (B|1, T, P/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, T, H, P/2) each
    cos, sin = cos[:, :, None], sin[:, :, None]  # (B, T, 1, P/2)
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


def write_rows(buf, new, pos):
    """Write new (B, T, ...) into buf (B, S, ...) at rows pos[b] .. pos[b]+T-1 of each sequence b."""
    B, T = new.shape[:2]
    if int(pos.max()) + T > buf.shape[1]:
        raise ValueError(
            f"cache overflow: position {int(pos.max()) + T} > cache length {buf.shape[1]}; "
            "allocate a longer cache (max_len) or shorten the prompt"
        )
    rows = pos[:, None] + torch.arange(T, device=pos.device)  # (B, T)
    buf[torch.arange(B, device=pos.device)[:, None], rows] = new.to(buf.dtype)


def causal_mask(pos, T, S):
    """(B, 1, T, S) bool: query t of row b sees keys s <= pos[b] + t (per-row lengths in one batch)."""
    q = pos[:, None] + torch.arange(T, device=pos.device)  # (B, T)
    return (torch.arange(S, device=pos.device) <= q[:, :, None])[:, None]


# ----------------------------------------------------------------------------- GQA attention (teacher)
class Attention(nn.Module):
    """Llama grouped-query attention; the cache is (k, v), each (B, S, G, P)."""

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
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    def forward(self, x, cos, sin, cache=None, pos=None):
        B, T, _ = x.shape
        H, G, P = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        q = apply_rope(self.q_proj(x).view(B, T, H, P), cos, sin)  # (B, T, H, P)
        k = apply_rope(self.k_proj(x).view(B, T, G, P), cos, sin)  # (B, T, G, P)
        v = self.v_proj(x).view(B, T, G, P)
        if cache is None:
            rep = H // G  # training/full forward: plain causal SDPA over T tokens
            q, k, v = (
                q.transpose(1, 2),
                k.repeat_interleave(rep, 2).transpose(1, 2),
                v.repeat_interleave(rep, 2).transpose(1, 2),
            )
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, P)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, H * P))
        kc, vc = cache
        write_rows(kc, k, pos)
        write_rows(vc, v, pos)
        S = int(pos.max()) + T
        # Fold the H/G query heads of a group into the query axis so the cache is read once,
        # never repeated in memory: q (B, G, rep*T, P) against k, v (B, G, S, P).
        rep = H // G
        q = q.view(B, T, G, rep, P).permute(0, 2, 3, 1, 4).reshape(B, G, rep * T, P)
        mask = causal_mask(pos, T, S)[:, :, None].expand(B, 1, rep, T, S).reshape(B, 1, rep * T, S)
        y = F.scaled_dot_product_attention(
            q, kc[:, :S].transpose(1, 2), vc[:, :S].transpose(1, 2), attn_mask=mask
        )
        y = y.view(B, G, rep, T, P).permute(0, 3, 1, 2, 4).reshape(B, T, H * P)  # back to (B, T, H*P)
        return self.o_proj(y)


# ----------------------------------------------------------------------------- Mamba2 mixer
class Mamba2(nn.Module):
    """The Mamba2 variant of MambaInLlama / Zebra (paper.md §5): expand 1, H heads, P = N = head_dim.

    in_proj emits [z | x | B | C | dt] of widths [H*P, G*P, G*P, H*P, H]; x and B keep the teacher's G
    KV groups (they are seeded from W_V and W_K, paper.md §6) and head h reads group h // (H/G) inside
    the scan, C has one group per head (seeded from W_Q). A depthwise causal conv (k = d_conv) runs over
    [x | B | C] before any repeat. The cache is (conv_state (B, C_conv, d_conv-1), ssm_state (B, H, P, N) fp32).
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, P = cfg.n_head, cfg.head_dim
        self.conv_dim = cfg.d_xb * 2 + cfg.d_inner
        self.in_proj = nn.Linear(cfg.d_model, 2 * cfg.d_inner + 2 * cfg.d_xb + H, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, bias=True)
        # random parts as mamba_ssm (paper.md §5.3): dt ~ logU[1e-3, 0.1] stored as softplus^-1, A ~ -U[1, 16]
        dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = RMSNorm(cfg.d_inner, eps=1e-5)  # gated, per head group of P channels
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=False)

    def allocate_cache(self, batch, max_len, dtype, device):
        H, P = self.cfg.n_head, self.cfg.head_dim
        return (
            torch.zeros(batch, self.conv_dim, self.cfg.d_conv - 1, dtype=dtype, device=device),
            torch.zeros(batch, H, P, P, dtype=torch.float32, device=device),
        )

    def forward(self, u, cos=None, sin=None, cache=None, pos=None, backend="auto"):
        cfg = self.cfg
        B, T, _ = u.shape
        H, G, P = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        z, xBC, dt = self.in_proj(u).split([cfg.d_inner, self.conv_dim, H], dim=-1)
        # causal depthwise conv over time: left context is the conv state (zeros at the start)
        xBC = xBC.transpose(1, 2)  # (B, C_conv, T)
        ctx = cache[0] if cache is not None else xBC.new_zeros(B, self.conv_dim, cfg.d_conv - 1)
        xpad = torch.cat([ctx.to(xBC.dtype), xBC], dim=-1)  # (B, C_conv, d_conv-1+T)
        if cache is not None:
            cache[0].copy_(xpad[..., -(cfg.d_conv - 1) :])
        xBC = F.silu(F.conv1d(xpad, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)).transpose(
            1, 2
        )
        x, Bm, C = xBC.split([cfg.d_xb, cfg.d_xb, cfg.d_inner], dim=-1)
        x, Bm, C = x.view(B, T, G, P), Bm.view(B, T, G, P), C.view(B, T, H, P)
        A = -torch.exp(self.A_log.float())  # (H,) < 0
        if cache is not None and T == 1:
            y = ssm_scan.ssm_step(
                cache[1],
                x[:, 0],
                dt[:, 0],
                A,
                Bm[:, 0],
                C[:, 0],
                D=self.D,
                dt_bias=self.dt_bias,
                backend=backend,
            )[:, None]  # (B, 1, H, P)
        else:
            init = cache[1] if cache is not None else None
            y, final = ssm_scan.ssd(
                x,
                dt,
                A,
                Bm,
                C,
                chunk_size=cfg.chunk_size,
                D=self.D,
                dt_bias=self.dt_bias,
                initial_state=init,
                return_final_state=True,
                backend=backend,
            )
            if cache is not None:
                cache[1].copy_(final)
        y = y.reshape(B, T, H, P).float() * F.silu(z.float()).view(
            B, T, H, P
        )  # gate before the norm (norm_before_gate=False)
        y = F.rms_norm(y, (P,), eps=self.norm.eps).reshape(B, T, -1)  # RMSNorm per head group of P channels
        return self.out_proj((y * self.norm.weight.float()).to(u.dtype))


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
            self.self_attn = mla_mod.MLA(
                cfg.d_model,
                cfg.n_head,
                cfg.n_kv_head,
                cfg.q_lora_rank,
                cfg.kv_lora_rank,
                cfg.qk_nope_head_dim,
                cfg.qk_rope_head_dim,
                cfg.v_head_dim,
                cfg.pairs_for(i),
            )
        else:
            self.mamba = Mamba2(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    @property
    def mixer(self):
        return self.mamba if self.kind == "m2" else self.self_attn

    def forward(self, h, cos, sin, cache=None, pos=None):
        a = self.mixer(self.input_layernorm(h), cos, sin, cache, pos)
        h = h + a  # out of place: FSDP2 hooks must see a fresh tensor (paper.md §7)
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, a


class Cache:
    """Decode state of a whole model: one entry per layer plus each sequence's length `pos` (B,).

    attn: (k, v) each (B, S, G, P); mla: latent rows (B, S, r_kv + d_R); m2: (conv, ssm) constant size.
    `rows(sl)` views a subset of sequences (prefill one prompt of a batch in place).
    """

    def __init__(self, layers, pos, kinds):
        self.layers, self.pos, self.kinds = layers, pos, kinds

    def rows(self, sl):
        pick = lambda c: tuple(t[sl] for t in c) if isinstance(c, tuple) else c[sl]
        return Cache([pick(c) for c in self.layers], self.pos[sl], self.kinds)

    def nbytes(self, kinds=KINDS):
        """Bytes held by the layers of the given kinds (("attn", "mla") = what grows with length)."""
        return sum(
            t.nbytes
            for k, c in zip(self.kinds, self.layers)
            if k in kinds
            for t in (c if isinstance(c, tuple) else (c,))
        )


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
        w = self.embed_tokens.weight
        dtype, device = dtype or w.dtype, device or w.device
        layers = [b.mixer.allocate_cache(batch, max_len, dtype, device) for b in self.layers]
        return Cache(layers, torch.zeros(batch, dtype=torch.long, device=device), self.cfg.kinds)

    def rope(self, positions):
        """cos, sin (B, T, head_dim/2) of the teacher's frequencies at `positions` (B, T)."""
        ang = positions[..., None].float() * rope_freqs(self.cfg, positions.device)
        return ang.cos(), ang.sin()

    def forward(self, idx, cache=None, return_layers=False, layer_inputs=None, logits=True):
        """idx (B, T) -> logits (B, T, V). With a cache, the T tokens continue each sequence at cache.pos and
        the cache advances. return_layers adds per layer the block inputs, block outputs (the last one after
        the final norm) and mixer outputs; layer_inputs (L tensors (B, T, D)) feeds block i the given input
        instead of block i-1's output: ILD's teacher forcing (paper.md §10)."""
        B, T = idx.shape
        if cache is None and T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        pos = cache.pos if cache is not None else torch.zeros(1, dtype=torch.long, device=idx.device)
        cos, sin = self.rope(pos[:, None] + torch.arange(T, device=idx.device))
        h = self.embed_tokens(idx) if layer_inputs is None else None
        ins, outs, mixes = [], [], []
        for i, block in enumerate(self.layers):
            h = h if layer_inputs is None else layer_inputs[i]
            ins.append(h)
            h, a = block(
                h,
                cos,
                sin,
                cache.layers[i] if cache is not None else None,
                pos if cache is not None else None,
            )
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
    """A JSON side file (smart.json, eval.json, data.json, config.json); a damaged one is named, with the fix."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged ({e}): delete it and rerun the step that writes it") from None


def save_checkpoint(path, model, stage, step=0, tokenizer=None, state_dict=None, **extra):
    """One format for every stage (style.md rule 19), written atomically.
    state_dict: an already gathered one (FSDP2), else the model's own."""
    ckpt = dict(
        config=model.cfg.to_dict(),
        model=model.state_dict() if state_dict is None else state_dict,
        stage=stage,
        step=step,
        tokenizer=tokenizer.spec() if tokenizer is not None else None,
        **extra,
    )
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def read_checkpoint(path, device="cpu"):
    """The checkpoint dict of a file (config, model, stage, step, ...), without building a model; a missing,
    truncated or foreign file gives one error naming it and the fix."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no checkpoint at {path}: run `python distill.py` or `python convert.py` first"
        )
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=True)
        ModelConfig(**ckpt["config"])
        ckpt["model"]
    except Exception as e:  # a truncated or foreign file: say which and what to do
        raise ValueError(
            f"{path} is not a readable zebra checkpoint ({type(e).__name__}: {e}); delete it and rerun"
        ) from None
    return ckpt


def load_checkpoint(path, device="cpu", dtype=None):
    """-> (model, ckpt dict). Built on the meta device and filled from the file (strict)."""
    ckpt = read_checkpoint(path, device)
    model = Model.from_state_dict(ModelConfig(**ckpt["config"]), ckpt["model"])
    return model.to(device=device, dtype=dtype) if dtype else model, ckpt
