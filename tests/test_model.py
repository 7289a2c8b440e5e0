"""model.py: cached decoding = full forward for every layer mix (decode attends over the whole, partly
empty cache), MLA = attention written out head by head, checkpoints and their errors, the paper's numbers.
Run: python -m pytest tests/test_model.py"""

import math
import struct
import zipfile
from functools import partial

import pytest
import torch

import model as M


def tiny(kinds=None, **kw):
    torch.manual_seed(0)
    return M.Model(M.size_config("tiny", kinds=kinds, **kw)).eval()


@pytest.mark.parametrize("kinds", [None, ["mla"] * 4, ["m2"] * 4, ["mla", "m2", "attn", "m2"]])
def test_prefill_then_decode_equals_full_forward(kinds):
    # an 8-token prefill + 32 decode steps in a 48-row cache give the logits of one full forward
    m = tiny(kinds)
    idx = torch.randint(0, 272, (2, 40))
    with torch.no_grad():
        full = m(idx)
        cache = m.allocate_cache(2, 48)
        steps = [m(idx[:, :8], cache=cache)] + [m(idx[:, t : t + 1], cache=cache) for t in range(8, 40)]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4
    assert cache.pos.tolist() == [40, 40]


def ragged_cache(m, idx):
    """Prefill row 0 with 5 tokens and row 1 with 11, each through its own view of one cache of 32 rows."""
    cache = m.allocate_cache(2, 32)
    m(idx[:1, :5], cache=cache.rows(slice(0, 1)))
    m(idx[1:, :11], cache=cache.rows(slice(1, 2)))
    return cache


def test_ragged_rows_decode_and_prefill_at_their_own_positions():
    # rows of lengths 5 and 11 in one cache continue (1 token, then 3) as each row's full forward
    m = tiny(["mla", "m2", "attn", "m2"])
    idx = torch.randint(0, 272, (2, 20))
    with torch.no_grad():
        full, cache = m(idx), ragged_cache(m, idx)
        step = m(torch.stack([idx[0, 5:6], idx[1, 11:12]]), cache=cache)
        chunk = m(torch.stack([idx[0, 6:9], idx[1, 12:15]]), cache=cache)
    got = torch.cat([step, chunk], 1)
    assert (got[0] - full[0, 5:9]).abs().max() <= 1e-4 and (got[1] - full[1, 11:15]).abs().max() <= 1e-4


def rope_complex(u, cos, sin, pairs):
    """Pair i of a half-split block, (u_i, u_{i+n}), as a complex number turned by teacher pair pairs[i]."""
    n = u.shape[-1] // 2
    z = torch.complex(u[..., :n], u[..., n:]) * torch.complex(cos[..., pairs], sin[..., pairs])
    return torch.cat([z.real, z.imag], -1)


def mla_by_hand(m, x, cos, sin, scale):
    """Causal MLA written out head by head with an explicit softmax and rope_complex."""
    cfg, (B, T, _), pairs = m.cfg, x.shape, m.rope_pairs
    H, G, r, dN = cfg.n_head, cfg.n_kv_head, cfg.kv_lora_rank, cfg.qk_nope_head_dim
    q = m.q_b_proj(m.q_a_proj(x)).view(B, T, H, -1)
    q = torch.cat([q[..., :dN], rope_complex(q[..., dN:], cos[:, :, None], sin[:, :, None], pairs)], -1)
    ckv = m.kv_a_proj_with_mqa(x)
    k_r, kv = rope_complex(ckv[..., r:], cos, sin, pairs), m.kv_b_proj(ckv[..., :r]).view(B, T, G, -1)
    heads, future = [], torch.ones(T, T, dtype=torch.bool).triu(1)
    for h in range(H):
        g = h // (H // G)
        s = torch.einsum("btd,bsd->bts", q[:, :, h], torch.cat([kv[:, :, g, :dN], k_r], -1)) * scale
        heads.append(torch.softmax(s.masked_fill(future, float("-inf")), -1) @ kv[:, :, g, dN:])
    return m.out_proj(torch.cat(heads, -1))


def mla_layer(G):
    """The MLA mixer of a tiny all-MLA model with permuted rope pairs and peakier weights (masks matter)."""
    model = tiny(["mla"] * 4, n_kv_head=G, rope_pairs={0: [5, 1, 6, 2]})
    m = model.layers[0].self_attn
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(2.0)
    return model, m


@pytest.mark.parametrize("G", [1, 2])
def test_mla_prefill_and_absorbed_decode_equal_attention_by_hand(G):
    # the decompressed prefill and the absorbed decode step both equal per-head attention at (d_N + d_R)^-1/2
    model, m = mla_layer(G)
    x = torch.randn(2, 7, 64)
    cos, sin = model.rope(torch.arange(7)[None])
    with torch.no_grad():
        want = mla_by_hand(m, x, cos, sin, (8 + 8) ** -0.5)
        cache, pos = m.allocate_cache(2, 7, torch.float32, "cpu"), torch.zeros(2, dtype=torch.long)
        prefill = m(x[:, :6], cos[:, :6], sin[:, :6], cache, pos)
        step = m(x[:, 6:], cos[:, 6:], sin[:, 6:], cache, pos + 6)
    assert (torch.cat([prefill, step], 1) - want).abs().max() <= 1e-4


def test_mla_scale_is_distinguishable_on_the_test_input():
    # the latent-width scale (r_kv + d_R)^-1/2 gives another output: the test above would catch it
    model, m = mla_layer(2)
    x = torch.randn(2, 7, 64)
    cos, sin = model.rope(torch.arange(7)[None])
    with torch.no_grad():
        right, wrong = mla_by_hand(m, x, cos, sin, 16**-0.5), mla_by_hand(m, x, cos, sin, 24**-0.5)
    assert (right - wrong).abs().max() > 1e-2


def test_mla_cache_holds_latent_and_rotated_key_of_the_chosen_pairs():
    # each cache row is [c ; k^R] (r_kv + d_R values), k^R turned by the teacher pairs the layer keeps
    model, m = mla_layer(2)
    x = torch.randn(2, 5, 64)
    cos, sin = model.rope(torch.arange(5)[None])
    cache = m.allocate_cache(2, 5, torch.float32, "cpu")
    with torch.no_grad():
        m(x, cos, sin, cache, torch.zeros(2, dtype=torch.long))
        ckv = m.kv_a_proj_with_mqa(x)
    assert cache.kv.shape == (2, 5, 16 + 8)
    torch.testing.assert_close(cache.kv[..., :16], ckv[..., :16])
    torch.testing.assert_close(cache.kv[..., 16:], rope_complex(ckv[..., 16:], cos, sin, [5, 1, 6, 2]))


def test_rope_llama3_scaling_matches_the_published_rule():
    # every 1b rope frequency equals HF's Llama-3 scaling rule, written out as a loop
    cfg = M.size_config("1b")
    f = M.rope_freqs(cfg).double()
    for j in range(cfg.head_dim // 2):  # HF's _compute_llama3_parameters, written as a loop
        base = 5e5 ** (-2 * j / cfg.head_dim)
        wl = 2 * math.pi / base
        if wl < 8192 / 4:
            want = base
        elif wl > 8192 / 1:
            want = base / 32
        else:
            s = (8192 / wl - 1) / (4 - 1)
            want = (1 - s) * base / 32 + s * base
        assert abs(f[j].item() - want) <= 1e-6 * want


def saved(tmp_path, **kw):
    m = tiny(["mla", "m2", "attn", "m2"], rope_pairs={0: [1, 3, 5, 7]})
    path = str(tmp_path / "x.pt")
    M.save_checkpoint(path, m, "test", 7, **kw)
    return m, path


def test_checkpoint_roundtrip_gives_the_same_model(tmp_path):
    # a saved and reloaded hybrid keeps its stage, step, kinds and rope pairs, and gives identical logits
    m, path = saved(tmp_path)
    m2, ck = M.load_checkpoint(path)
    assert ck["stage"] == "test" and ck["step"] == 7 and m2.cfg.kinds == m.cfg.kinds
    assert m2.layers[0].self_attn.rope_pairs.tolist() == [1, 3, 5, 7]
    idx = torch.randint(0, 272, (1, 12))
    assert torch.equal(m(idx), m2(idx))


def test_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    # a disk that fills up mid-write: OSError naming the folder, nothing left behind, the old file intact
    _, path = saved(tmp_path)
    before = open(path, "rb").read()

    def full_disk(obj, f):
        open(f, "wb").write(b"half a checkpoint")
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=str(tmp_path)):
        saved(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"] and open(path, "rb").read() == before


def flip_weight_byte(path):
    """Flip one byte in the middle of the largest tensor's data in a torch.save zip file (its records are
    stored uncompressed: a local header of 30 bytes + name + extra field, then the raw bytes)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x40]))


def test_weights_digest_changes_with_any_byte_name_dtype_or_shape():
    # the digest covers the bytes, the names, the dtypes and the shapes, and not the order of the entries
    sd = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    base = M.weights_digest(sd)
    changed = [
        {**sd, "a": sd["a"].clone().index_put_((torch.tensor(1), torch.tensor(2)), torch.tensor(5.5))},
        {"c": sd["a"], "b": sd["b"]},
        {**sd, "b": sd["b"].int()},
        {**sd, "a": sd["a"].reshape(3, 2)},
    ]
    assert M.weights_digest(dict(reversed(sd.items()))) == base
    assert len({base, *(M.weights_digest(c) for c in changed)}) == 5


@pytest.mark.parametrize(
    "size,params,teacher_params",
    [("1b", 1.286e9, 1.236e9), ("3b", 3.390e9, 3.213e9), ("8b", 8.379e9, 8.030e9)],
)
def test_paper_param_counts(size, params, teacher_params):
    # the zebra hybrid and its teacher have the published configs' parameter counts within 0.5 % (the
    # official Zebra-Llama README rounds the 1B hybrid to 1.28B; the KV fractions are tests/test_bench.py's)
    t = M.size_config(size)
    z = M.size_config(size, kinds=["mla" if i in t.mla_layers else "m2" for i in range(t.n_layer)])
    with torch.device("meta"):
        assert abs(M.Model(z).num_params() / params - 1) < 0.005
        assert abs(M.Model(t).num_params() / teacher_params - 1) < 0.005


def test_bf16_forward_stays_bf16():
    # a bf16 model gives bf16 logits (the fp32 norms and rope cast back)
    m = tiny(["mla", "m2", "attn", "m2"]).to(torch.bfloat16)
    assert m(torch.randint(0, 272, (1, 9))).dtype == torch.bfloat16


def test_cast_to_bf16_keeps_the_mamba2_scalars_fp32_and_exact():
    # cast(bf16): A_log, dt_bias and D of each Mamba2 layer stay fp32 with the source's very bits (no bf16
    # rounding on the way), every other weight is bf16, the head stays tied; the SSM state is fp32, the
    # other caches bf16, and prefill + decode run
    src = tiny(["mla", "m2", "attn", "m2"])
    m = tiny(["mla", "m2", "attn", "m2"]).cast(torch.bfloat16)
    scalars = {f"layers.{i}.mamba.{n}" for i in (1, 3) for n in ("A_log", "dt_bias", "D")}
    for name, p in m.named_parameters():
        want = src.get_parameter(name) if name in scalars else src.get_parameter(name).bfloat16()
        assert p.dtype == want.dtype and torch.equal(p, want), name
    assert len(scalars) == 6 and m.lm_head.weight is m.embed_tokens.weight
    cache = m.allocate_cache(1, 12)
    assert {t.dtype for c in cache.layers for t in c} == {torch.bfloat16, torch.float32}
    assert all(c.ssm.dtype == torch.float32 for k, c in zip(cache.kinds, cache.layers) if k == "m2")
    with torch.no_grad():
        m(torch.randint(0, 272, (1, 9)), cache=cache)
        assert m(torch.randint(0, 272, (1, 1)), cache=cache).dtype == torch.bfloat16


def test_cpu_has_bf16_reads_the_cpu_flags(tmp_path):
    # avx512_bf16 or amx_bf16 among the flags of a cpuinfo file make it True; AVX2 alone or no file does not
    def has(flags):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\n")
        return M.cpu_has_bf16(str(tmp_path / "cpuinfo"))

    assert [has(f) for f in ("avx512f", "avx512_bf16", "amx_bf16 amx_tile")] == [False, True, True]
    assert not M.cpu_has_bf16(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- bad input -> one clear error
def overfull_cache(tmp):
    """Setup: 30 new tokens for a 32-row cache whose rows hold 5 and 11."""
    m = tiny(["mla", "m2", "attn", "m2"])
    with torch.no_grad():
        cache = ragged_cache(m, torch.randint(0, 272, (2, 20)))

    def call():
        with torch.no_grad():
            m(torch.zeros(2, 30, dtype=torch.long), cache=cache)

    return call


def truncated(tmp):
    _, path = saved(tmp)
    with open(path, "r+b") as f:
        f.truncate(1000)
    return path


def with_nan(tmp):
    m = tiny(["mla", "m2", "attn", "m2"])
    sd = m.state_dict()
    sd["layers.2.mlp.up_proj.weight"][3, 4] = float("nan")
    M.save_checkpoint(str(tmp / "nan.pt"), m, "kd", state_dict=sd)
    return str(tmp / "nan.pt")


def without(*keys, of=None):
    """A saved checkpoint with keys deleted from it, or from its entry `of`."""

    def make(tmp):
        _, path = saved(tmp)
        ck = torch.load(path, weights_only=True)
        for k in keys:
            del (ck[of] if of else ck)[k]
        torch.save(ck, path)
        return path

    return make


def flipped(tmp):
    """A checkpoint with one weight byte flipped: it still unpickles, with a weight changed (so the byte was
    tensor data, not the pickle)."""
    m, path = saved(tmp)
    flip_weight_byte(path)
    raw = torch.load(path, weights_only=True)["model"]
    assert any(not torch.equal(v, raw[k]) for k, v in m.state_dict().items())
    return path


def reading(make, read=M.load_checkpoint):
    """Setup: the file make(tmp_path) writes (or names), given to read."""
    return lambda tmp: partial(read, make(tmp))


def config(size="tiny", **kw):
    return lambda tmp: partial(M.size_config, size, **kw)


BAD_INPUTS = [  # (case, setup(tmp_path) -> the call that must fail, error, message)
    ("prefill past the cache", overfull_cache, ValueError, "cache overflow"),
    ("missing checkpoint", reading(lambda tmp: str(tmp / "missing.pt")), FileNotFoundError, "distill.py"),
    ("a folder", reading(str, M.read_checkpoint), ValueError, "is a folder, not a checkpoint file"),
    ("truncated checkpoint", reading(truncated), ValueError, "not a readable zebra checkpoint"),
    ("NaN weight", reading(with_nan), ValueError, "up_proj.weight holds NaN"),
    ("config lacking keys", reading(without("d_ff", "n_head", of="config")), ValueError, "missing keys"),
    ("no weights digest", reading(without("weights_sha256")), ValueError, "carries no weights digest"),
    ("flipped byte, read_checkpoint", reading(flipped, M.read_checkpoint), ValueError, "x.pt is damaged"),
    ("flipped byte, load_checkpoint", reading(flipped), ValueError, "x.pt is damaged"),
    ("unknown layer kind", config(kinds=["attn", "gru", "attn", "attn"]), ValueError, "kinds must list one"),
    ("3 of 4 rope pairs", config(rope_pairs={0: [1, 2, 3]}), ValueError, "must be 4 teacher pair indices"),
    ("rope pair 8 past 0-7", config(rope_pairs={0: [1, 2, 3, 8]}), ValueError, r"indices in \[0, 8\); got"),
    ("unknown size", config("2b"), ValueError, "unknown size '2b'"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda case: case[0])
def test_bad_input_gives_one_clear_error(case, tmp_path):
    # each bad input is refused with one error of the expected type whose message matches
    _, setup, error, match = case
    call = setup(tmp_path)
    with pytest.raises(error, match=match):
        call()
