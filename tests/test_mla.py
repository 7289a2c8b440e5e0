"""mla.py: Triton decode = absorbed torch = decompressed attention (fp32, interpreter), the split rule,
decode without host sync, module cache paths = one full forward, cache size, softmax-scale guard,
project RoPE, bad input.
Run: python -m pytest tests/test_mla.py -q   (on a GPU, TRITON_INTERPRET=0 runs the same cases compiled)
"""

import os
import subprocess
import sys
from functools import partial

import pytest
import torch

import mla
import model
from mla import mla_decode, mla_decode_full, mla_decode_ref_absorbed, mla_decode_ref_naive

NAN = float("nan")
COMPILED = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEV = "cuda" if COMPILED else "cpu"  # every tensor of a backend="triton" call lives here


def rel_rms(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def decode_case(lens, H, G, r=20, dR=16, dN=8, dV=12, S_max=None, seed=0):
    """Random decode inputs on DEV; cache slots at or past each row's length hold NaN (FlashMLA-style)."""
    g, lens = torch.Generator().manual_seed(seed), torch.tensor(lens)
    B, S_max = len(lens), S_max or max(1, int(lens.max()))
    kv = torch.randn(B, S_max, r + dR, generator=g)
    kv[torch.arange(S_max)[None] >= lens[:, None]] = NAN
    c = dict(
        q_nope=torch.randn(B, H, dN, generator=g),
        q_pe=torch.randn(B, H, dR, generator=g),
        kv_cache=kv,
        cache_seqlens=lens,
        W_UK=torch.randn(G, dN, r, generator=g) / 3,
        W_UV=torch.randn(G, dV, r, generator=g) / 3,
        softmax_scale=(dN + dR) ** -0.5,
    )
    return {k: v.to(DEV) if torch.is_tensor(v) else v for k, v in c.items()}


def absorbed_q(c):
    """[q_nope · W_UK[h // (H/G)] ; q_pe], built independently of mla_decode_full: (B, H, r + d_R)."""
    W = c["W_UK"].repeat_interleave(c["q_nope"].shape[1] // c["W_UK"].shape[0], 0)  # (H, d_N, r)
    return torch.cat([torch.einsum("bhd,hdr->bhr", c["q_nope"], W), c["q_pe"]], -1)


def decode(c, q=None, **kw):
    q = absorbed_q(c) if q is None else q
    return mla_decode(q, c["kv_cache"], c["cache_seqlens"], c["softmax_scale"], c["W_UK"].shape[2], **kw)


def check_kernel(c, num_splits=None):
    """Triton vs the fp64 absorbed ref (out_latent, lse); Triton and torch end to end vs the fp64
    decompressed ref."""
    out, lse = decode(c, num_splits=num_splits, backend="triton")
    c64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in c.items()}
    ref_out, ref_lse = mla_decode_ref_absorbed(
        absorbed_q(c64), c64["kv_cache"], c["cache_seqlens"], c["softmax_scale"], c["W_UK"].shape[2]
    )
    assert out.dtype == lse.dtype == torch.float32 and rel_rms(out, ref_out) <= 1e-5
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=0)
    naive = mla_decode_ref_naive(**c64)
    for backend in ("triton", "torch"):
        assert rel_rms(mla_decode_full(**c, num_splits=num_splits, backend=backend), naive) <= 1e-5, backend
    return out, lse


# ----------------------------------------------------------------------------- kernel and references
def test_refs_absorbed_equal_naive_fp64():
    # in fp64 the absorbed torch decode equals decompressed attention; an empty row gives 0 and lse -inf
    c = {
        k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in decode_case([0, 1, 17, 50], H=6, G=2).items()
    }
    out, naive = mla_decode_full(**c, backend="torch"), mla_decode_ref_naive(**c)
    assert torch.isfinite(out).all() and (naive[0] == 0).all()
    torch.testing.assert_close(out, naive, atol=1e-12, rtol=1e-12)
    assert torch.isneginf(decode(c, backend="torch")[1][0]).all()


@pytest.mark.parametrize("S", [1, 2, 63, 64, 65, 1000])
@pytest.mark.parametrize("H,G", [(3, 3), (9, 3), (16, 4)])  # H/n_kv = 1, 3, 4; 9 = a partial 16-head block
def test_kernel_cache_lengths_and_groups(S, H, G):
    # the kernel equals both references at block-edge cache lengths and every heads-per-group ratio
    check_kernel(decode_case([S], H=H, G=G, S_max=S + 3))


def test_kernel_ragged_nan_slots_do_not_change_output():
    # NaN in the unused slots of ragged rows changes no bit of the kernel's output
    # H = 20: two head blocks; r = 48: not a power of 2
    c = decode_case([1, 17, 64, 300], H=20, G=5, r=48, dR=32, S_max=320)
    out, lse = check_kernel(c)
    out0, lse0 = decode(dict(c, kv_cache=c["kv_cache"].nan_to_num(0.0)), backend="triton")
    assert torch.equal(out, out0) and torch.equal(lse, lse0)


@pytest.mark.parametrize("r,dR", [(48, 32), (128, 64), (160, 32)])  # r + d_R = 80, 192, 192: no power of 2
def test_kernel_latent_widths(r, dR):
    # the kernel equals both references at the paper's latent widths, none a power of 2
    check_kernel(decode_case([100, 33], H=4, G=2, r=r, dR=dR))


@pytest.mark.filterwarnings("error::RuntimeWarning")  # empty splits do no 0/0 or inf-inf arithmetic
@pytest.mark.parametrize("num_splits", [1, 2, 7, 40])  # 40 > the 5 blocks of 300 tokens: empty splits
def test_kernel_split_counts(num_splits):
    # any split count, empty splits included, gives the one-split result within fp32 rounding
    c = decode_case([300, 65, 1], H=3, G=1)
    out, lse = check_kernel(c, num_splits)
    out1, lse1 = decode(c, num_splits=1, backend="triton")
    torch.testing.assert_close((out, lse), (out1, lse1), atol=1e-6, rtol=1e-6)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_kernel_zero_length_row():
    # a row with nothing cached gives out 0 and lse -inf on both backends, and leaves its neighbours alone
    c = decode_case([0, 5], H=4, G=2, S_max=8)
    for backend in ("triton", "torch"):
        out, lse = decode(c, backend=backend)
        assert (out[0] == 0).all() and torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all(), backend
    check_kernel(c)


@pytest.mark.parametrize("q_scale", [10.0, 1e-3])  # peaked (logits >> 1) and flat attention
def test_kernel_peaked_flat_and_noncontiguous_q(q_scale):
    # peaked and flat attention through a strided q view equal the fp64 absorbed reference
    c = decode_case([70, 130], H=5, G=5)
    q = absorbed_q(c) * q_scale
    big = torch.zeros(2, 5, q.shape[-1] + 7, device=DEV)
    big[..., 3:-4] = q
    ref_out, ref_lse = mla_decode_ref_absorbed(
        q.double(), c["kv_cache"].double(), c["cache_seqlens"], c["softmax_scale"], 20
    )
    out, lse = decode(c, q=big[..., 3:-4], backend="triton")  # a non-contiguous view into a wider projection
    assert rel_rms(out, ref_out) <= 1e-5 and (lse.double() - ref_lse).abs().max() <= 1e-5


def _changed(args, change):
    """args with each keyword of change replacing its argument, or mapping it when it is a function."""
    return {k: change[k](v) if callable(change.get(k)) else change.get(k, v) for k, v in args.items()}


def decode_call(backend, **change):
    """mla_decode on valid inputs (2 rows of 4 and 6 cached tokens, 2 heads, r 20), changed by `change`."""
    c = decode_case([4, 6], H=2, G=1)
    args = dict(q=absorbed_q(c), kv_lora_rank=20, num_splits=None, backend=backend)
    args.update({k: c[k] for k in ("kv_cache", "cache_seqlens", "softmax_scale")})
    mla_decode(**_changed(args, change))


BAD_DECODE = [  # (case id, change to valid inputs, what the ValueError must say)
    ("no_scale", dict(softmax_scale=None), "softmax_scale"),
    ("q_2d", dict(q=lambda q: q[0]), "q must be"),
    ("q_narrow", dict(q=lambda q: q[..., :-1]), "disagree"),
    ("kv_fp64", dict(kv_cache=torch.Tensor.double), "dtype"),
    # the length range is checked under ZEBRA_DEBUG only (a host sync)
    ("len_past_cache", dict(cache_seqlens=lambda n: n + 1), "outside the allocated cache"),
    ("float_lens", dict(cache_seqlens=torch.Tensor.float), "cache_seqlens"),
    ("zero_splits", dict(num_splits=0), "num_splits must be >= 1"),
]
# both backends; the backend name is ssm_scan.use_triton's check, tested in tests/test_ssm_scan.py
BAD_INPUT = [
    (f"{name}_{backend}", partial(decode_call, backend, **change), words)
    for backend in ("torch", "triton")
    for name, change, words in BAD_DECODE
]


@pytest.mark.parametrize("call,words", [pytest.param(call, words, id=i) for i, call, words in BAD_INPUT])
def test_bad_input(call, words, monkeypatch):
    # each malformed input raises one ValueError naming the problem
    monkeypatch.setattr(mla, "DEBUG", True)
    with pytest.raises(ValueError, match=words):
        call()


def test_import_and_decode_without_triton():
    # without triton mla.py imports, decodes on torch, and backend="triton" raises a ValueError
    code = (
        "import sys; sys.modules['triton'] = None\nimport torch, mla\nassert not mla.HAS_TRITON\n"
        "q, kv, n = torch.randn(1, 2, 24), torch.randn(1, 5, 24), torch.tensor([5])\n"
        "assert mla.mla_decode(q, kv, n, 0.2, 16)[0].shape == (1, 2, 16)\n"
        "try:\n    mla.mla_decode(q, kv, n, 0.2, 16, backend='triton')\nexcept ValueError:\n    print('ok')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.parametrize("size", ["135m", "1b", "3b", "8b"])
def test_default_splits_read_long_runs_and_keep_partials_small(size):
    # batch 1, a 4096-row cache: each split reads >= 256 rows and the fp32 partials (H·(r_kv + 1) floats per
    # split) stay under a quarter of the bf16 cache bytes, at every paper size
    cfg = model.ModelConfig(**model.SIZES[size])
    H, r, width, S_max = cfg.n_head, cfg.kv_lora_rank, cfg.kv_lora_rank + cfg.qk_rope_head_dim, 4096
    splits = mla.num_splits_for(-(-H // 16), S_max, num_sms=132)
    assert splits > 1 and S_max / splits >= mla.MIN_SPLIT_ROWS
    assert H * splits * (r + 1) * 4 <= 0.25 * S_max * width * 2


def test_kernel_default_splits_over_a_long_capacity():
    # the default split count from the capacity (1100 rows: 4 splits), rows far shorter than it included
    c = decode_case([700, 5], H=4, G=2, S_max=1100)
    assert mla.num_splits_for(2, 1100) == 4
    check_kernel(c)


def test_decode_traces_without_host_sync():
    # a whole-graph trace fails on .item(), .tolist(), bool(tensor) or a branch on tensor values: the torch
    # decode path has none, so a compiled decode step (CUDA graphs) can capture it
    c = decode_case([0, 7, 30], H=6, G=2, S_max=40)
    step = torch.compile(mla_decode_full, fullgraph=True, backend="eager", dynamic=False)
    torch.testing.assert_close(step(**c, backend="torch"), mla_decode_full(**c, backend="torch"))


@pytest.mark.skipif(not COMPILED, reason="compiled kernel: needs CUDA and TRITON_INTERPRET=0")
def test_gpu_decode_makes_no_sync():
    # CUDA's sync debug mode raises on any host synchronisation inside the Triton decode
    c = decode_case([1, 100, 1000], H=16, G=8, r=128, dR=32, S_max=1024)
    mla_decode_full(**c, backend="triton")  # compile outside the checked region
    torch.cuda.set_sync_debug_mode("error")
    try:
        mla_decode_full(**c, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="compiled kernel: needs CUDA and TRITON_INTERPRET=0",
)
def test_kernel_bf16_cuda():
    # the compiled bf16 kernel stays within bf16 rounding of the fp64 absorbed reference
    c = decode_case([1, 100, 1000, 4097], H=16, G=8, r=128, dR=32, dN=32, dV=64)
    c = {
        k: (v.cuda().bfloat16() if v.is_floating_point() else v.cuda()) if torch.is_tensor(v) else v
        for k, v in c.items()
    }
    out, lse = decode(c, backend="triton")
    ref, ref_lse = mla_decode_ref_absorbed(
        absorbed_q(c).double(), c["kv_cache"].double(), c["cache_seqlens"], c["softmax_scale"], 128
    )
    assert rel_rms(out, ref) <= 1.6e-2 and (lse.double() - ref_lse).abs().max() <= 1e-3
