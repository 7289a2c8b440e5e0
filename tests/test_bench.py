"""bench.py: the KV formula gives the paper's percentages and equals what the caches allocate; the peers decode.
Run: python -m pytest tests/test_bench.py"""

import torch

import bench
import model as M


def test_kv_formula_reproduces_the_paper_and_matches_allocated_bytes():
    pct = {
        s: 100 * bench.zebra_config(s).kv_bytes_per_token() / M.size_config(s).kv_bytes_per_token()
        for s in ("1b", "3b", "8b")
    }
    assert {s: round(v, 3) for s, v in pct.items()} == {"1b": 3.906, "3b": 2.009, "8b": 2.734}
    # paper.md §8.2 by hand: N_MLA (r_kv + d_R) / (L 2 G P)
    assert pct["8b"] == 100 * 8 * (160 + 64) / (32 * 2 * 8 * 128)
    for kinds in (["attn"] * 4, ["mla", "m2", "attn", "m2"]):
        m = M.Model(M.size_config("tiny", kinds=kinds))
        cache = m.allocate_cache(3, 50)
        assert cache.nbytes(("attn", "mla")) == bench.kv_cache_bytes(m.cfg, 50, 3, elt=4)
        assert cache.nbytes(("m2",)) == bench.mamba_state_bytes(m.cfg, 3, elt=4)  # constant in length


def test_time_decode_runs_every_peer_over_a_prefilled_cache(tmp_path):
    import convert

    teacher, _ = convert.load_teacher("tiny")
    teacher.cfg = convert.with_hybrid_fields(teacher.cfg, "tiny")
    paths = bench.make_peers(teacher, str(tmp_path))
    assert set(paths) == {"teacher", "mambainllama", "zebra"}
    res = bench.run_peer(
        paths["mambainllama"], [64], [2], [16], steps=2, repeats=1, device="cpu", dtype=torch.float32
    )
    assert res["decode"][0]["tok_s"] > 0 and res["decode"][0]["kv_bytes"] == bench.kv_cache_bytes(
        M.load_checkpoint(paths["mambainllama"])[0].cfg, 64 + 2 * 2, 2, elt=4
    )
    assert M.load_checkpoint(paths["mambainllama"])[0].cfg.kinds == ["attn", "m2", "attn", "m2"]
