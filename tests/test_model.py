"""model.py: cached decoding = full forward for every layer mix, checkpoints, the paper's numbers.
Run: python -m pytest tests/test_model.py"""

import math

import pytest
import torch

import model as M


def tiny(kinds=None, **kw):
    torch.manual_seed(0)
    return M.Model(M.size_config("tiny", kinds=kinds, **kw)).eval()


@pytest.mark.parametrize("kinds", [None, ["mla"] * 4, ["m2"] * 4, ["mla", "m2", "attn", "m2"]])
def test_prefill_then_decode_equals_full_forward(kinds):
    m = tiny(kinds)
    idx = torch.randint(0, 272, (2, 40))
    with torch.no_grad():
        full = m(idx)
        cache = m.allocate_cache(2, 48)
        steps = [m(idx[:, :8], cache=cache)] + [m(idx[:, t : t + 1], cache=cache) for t in range(8, 40)]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4
    assert cache.pos.tolist() == [40, 40]


def test_ragged_rows_decode_at_their_own_positions():
    m = tiny(["mla", "m2", "attn", "m2"])
    idx = torch.randint(0, 272, (2, 20))
    with torch.no_grad():
        full = m(idx)
        cache = m.allocate_cache(2, 32)
        m(idx[:1, :5], cache=cache.rows(slice(0, 1)))
        m(idx[1:, :11], cache=cache.rows(slice(1, 2)))
        step = m(torch.stack([idx[0, 5], idx[1, 11]])[:, None], cache=cache)
    assert torch.allclose(step[0, 0], full[0, 5], atol=1e-4) and torch.allclose(
        step[1, 0], full[1, 11], atol=1e-4
    )
    with pytest.raises(ValueError, match="cache"):
        m(torch.zeros(2, 30, dtype=torch.long), cache=cache)


def test_rope_llama3_scaling_matches_the_published_rule():
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


def test_checkpoint_roundtrip_is_strict_and_atomic(tmp_path):
    m = tiny(["mla", "m2", "attn", "m2"], rope_pairs={0: [1, 3, 5, 7]})
    path = tmp_path / "x.pt"
    M.save_checkpoint(str(path), m, "test", 7)
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    m2, ck = M.load_checkpoint(str(path))
    assert ck["stage"] == "test" and ck["step"] == 7 and m2.cfg.kinds == m.cfg.kinds
    assert m2.layers[0].self_attn.rope_pairs.tolist() == [1, 3, 5, 7]
    idx = torch.randint(0, 272, (1, 12))
    assert torch.equal(m(idx), m2.eval()(idx))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable zebra checkpoint"):
        M.load_checkpoint(str(path))
    with pytest.raises(FileNotFoundError, match="distill.py"):
        M.load_checkpoint(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize(
    "size,params,teacher_params,kv_pct",
    [("1b", 1.286e9, 1.236e9, 3.906), ("3b", 3.390e9, 3.213e9, 2.009), ("8b", 8.379e9, 8.030e9, 2.734)],
)
def test_paper_param_counts_and_kv_fractions(size, params, teacher_params, kv_pct):
    t = M.size_config(size)
    z = M.size_config(size, kinds=["mla" if i in t.mla_layers else "m2" for i in range(t.n_layer)])
    with torch.device("meta"):
        assert abs(M.Model(z).num_params() / params - 1) < 0.005
        assert abs(M.Model(t).num_params() / teacher_params - 1) < 0.005
    assert round(100 * z.kv_bytes_per_token() / t.kv_bytes_per_token(), 3) == kv_pct


def test_bf16_forward_and_bad_config():
    m = tiny(["mla", "m2", "attn", "m2"]).to(torch.bfloat16)
    assert m(torch.randint(0, 272, (1, 9))).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="kinds"):
        M.size_config("tiny", kinds=["attn", "gru", "attn", "attn"])
    with pytest.raises(ValueError, match="unknown size"):
        M.size_config("2b")
