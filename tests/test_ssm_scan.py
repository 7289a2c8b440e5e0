"""Tests for ssm_scan.py: Triton (interpreter on CPU, fp32) = chunked torch = the fp64 sequential loop, on odd lengths, groups,
initial/final states, chaining, prefill + decode, per-kernel steps, gradients, long sequences and bad input (kernels.md §7.1).
Run: python -m pytest tests/test_ssm_scan.py -q   (on a GPU, TRITON_INTERPRET=0 runs the same cases on the compiled kernels)
"""

import importlib.util
import math
import os
import sys

import pytest
import torch

import ssm_scan as S
from ssm_scan import random_inputs, rel_rms, ssd, ssd_chunked, ssm_scan_ref, ssm_step, ssm_step_ref

BACKENDS = ["torch", "triton"]
COMPILED = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEV = "cuda" if COMPILED else "cpu"  # fp32 inputs live here; fp64 references stay on the CPU
LIMIT = (2e-3, 0.05)  # active on part of Mamba2's initial Δ range [1e-3, 0.1]


def case(b=2, L=37, h=2, p=8, n=16, groups=(1, 1, 1), extras=True, seed=0):
    """fp64 inputs; extras = initial state, D, dt_bias and an active dt_limit, else none of them."""
    inp = random_inputs(b, L, h, p, n, groups, dtype=torch.float64, seed=seed)
    if extras:
        return dict(inp, dt_limit=LIMIT)
    return {k: v for k, v in inp.items() if k not in ("D", "dt_bias", "initial_state")}


def f32(inp):
    return {k: v.to(DEV, torch.float32) if torch.is_tensor(v) else v for k, v in inp.items()}


def check_scan(inp, chunk=16, backends=BACKENDS, tol=1e-5):
    """Every backend in fp32 vs the fp64 loop: rel-RMS ≤ tol and max abs ≤ 1e-4·max(1, ‖ref‖∞), outputs and final state."""
    y_ref, s_ref = ssm_scan_ref(**inp, return_final_state=True)
    for backend in backends:
        y, s = ssd(**f32(inp), chunk_size=chunk, return_final_state=True, backend=backend)
        assert (
            y.shape == y_ref.shape
            and y.dtype == torch.float32
            and s.shape == s_ref.shape
            and s.dtype == torch.float32
        )
        for got, ref in ((y, y_ref), (s, s_ref)):
            assert rel_rms(got, ref) <= tol, (backend, rel_rms(got, ref))
            assert (got.double().cpu() - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item()), backend
    return y_ref, s_ref


@pytest.mark.parametrize("extras", [False, True])
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize(
    "L", [1, 7, 15, 16, 17, 53]
)  # 1, 7, chunk − 1, chunk, chunk + 1, 3·chunk + 5 with chunk 16
def test_scan_lengths(L, G, extras):
    check_scan(case(L=L, h=2, groups=(G, G, G), extras=extras, seed=L))


@pytest.mark.parametrize(
    "groups", [(1, 1, 1), (2, 2, 2), (4, 4, 4), (2, 2, 4), (4, 1, 2)]
)  # (2, 2, 4): Zebra's x, B per KV group
def test_groups(groups):
    check_scan(case(h=4, groups=groups))


def test_odd_sizes():
    check_scan(case(L=37, p=20, n=24))  # non-power-of-2 p and n: masks
    check_scan(case(L=5, p=20, n=24))  # shorter than one chunk
    check_scan(case(b=1, L=16, h=1, p=16, n=16))  # exactly one chunk, one head


def test_chunk_size_invariance():
    inp = case(b=1, L=130, groups=(1, 1, 2))
    y_ref = check_scan(inp, chunk=128)[0]  # chunk 128: two row blocks and two sub-blocks in the kernels
    for chunk in (16, 32, 64):
        for backend in BACKENDS:
            assert rel_rms(ssd(**f32(inp), chunk_size=chunk, backend=backend), y_ref) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L1", [16, 21])  # split on and off a chunk boundary
def test_chaining(backend, L1):
    inp = f32(case(L=45, h=4, groups=(2, 2, 4)))
    part = lambda a, b: {k: v[:, a:b] if k in ("x", "dt", "B", "C") else v for k, v in inp.items()}
    y, s = ssd(**inp, chunk_size=16, return_final_state=True, backend=backend)
    y1, s1 = ssd(**part(0, L1), chunk_size=16, return_final_state=True, backend=backend)
    y2, s2 = ssd(
        **dict(part(L1, 45), initial_state=s1), chunk_size=16, return_final_state=True, backend=backend
    )
    assert rel_rms(torch.cat([y1, y2], dim=1), y) <= 1e-5 and rel_rms(s2, s) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_then_decode(backend):
    inp, L0 = case(L=45, h=4, groups=(2, 2, 4)), 39
    y_ref, s_ref = ssm_scan_ref(**inp, return_final_state=True)
    x = f32(inp)
    _, state = ssd(
        **{k: v[:, :L0] if k in ("x", "dt", "B", "C") else v for k, v in x.items()},
        chunk_size=16,
        return_final_state=True,
        backend=backend,
    )
    step = {k: x[k] for k in ("A", "D", "dt_bias", "dt_limit")}
    ys = [
        ssm_step(state, x["x"][:, t], x["dt"][:, t], B=x["B"][:, t], C=x["C"][:, t], backend=backend, **step)
        for t in range(L0, 45)
    ]
    assert rel_rms(torch.stack(ys, dim=1), y_ref[:, L0:]) <= 1e-5 and rel_rms(state, s_ref) <= 1e-5


@pytest.mark.parametrize("n,p,g", [(n, p, g) for n in (16, 64, 128) for p in (64, 20) for g in (1, 2)])
def test_step_kernel(n, p, g):
    inp = random_inputs(2, 1, 2, p, n, groups=(g, g, g), device=DEV, seed=n + p + g)
    cache = torch.randn(2, 2, p, n + 3, device=DEV)
    before, state, ref = (
        cache.clone(),
        cache[..., :n],
        cache[..., :n].double(),
    )  # a strided view: strides must be honoured
    args = (
        inp["x"][:, 0],
        inp["dt"][:, 0],
        inp["A"],
        inp["B"][:, 0],
        inp["C"][:, 0],
        inp["D"],
        inp["dt_bias"],
    )
    y = ssm_step(state, *args, dt_limit=LIMIT, backend="triton")
    y_ref = ssm_step_ref(ref, *(t.double() for t in args), dt_limit=LIMIT)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache[..., :n].double(), ref, rtol=1e-5, atol=1e-5)  # updated in place
    assert torch.equal(cache[..., n:], before[..., n:]) and not torch.equal(cache, before)


@pytest.mark.parametrize("limit", [(0.0, math.inf), LIMIT])
def test_kernels_per_step(limit):
    """Each launch against the torch step function it implements, on the same inputs; raw dt > 20 and ≈ −12 included."""
    inp = f32(case(L=45, h=4, groups=(2, 2, 4)))
    # softplus's identity branch (> 20, at a chunk's end so fp32 cs keeps its precision) and log1p(e^−12) precision
    inp["dt"][:, 12:16], inp["dt"][:, 4:8] = 25.0, -12.0 - inp["dt_bias"]
    x, dt, A, B, C = (inp[k] for k in ("x", "dt", "A", "B", "C"))
    dts, cs, states = S.chunk_state_fwd(x, dt, A, B, 16, inp["dt_bias"], True, limit)
    dts_ref, cs_ref = S.chunk_cumsum(S.process_dt(dt.double(), inp["dt_bias"], True, limit), A.double(), 16)
    torch.testing.assert_close(dts.double(), dts_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(cs.double(), cs_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states, S.chunk_states(x, B, dts, cs), rtol=1e-5, atol=1e-5)
    prev, final = S.state_passing_fwd(states, cs, inp["initial_state"])
    prev_ref, final_ref = S.state_passing(states, cs, inp["initial_state"])
    torch.testing.assert_close(prev, prev_ref)
    torch.testing.assert_close(final, final_ref)
    y = S.chunk_scan_fwd(x, B, C, dts, cs, prev, inp["D"])
    torch.testing.assert_close(
        y, S.chunk_outputs(x, B, C, dts, cs, prev, inp["D"])[:, :45], rtol=1e-5, atol=1e-4
    )


def test_decay_extremes():
    inp = case(L=53, h=2)
    inp["A"][:], inp["dt_limit"] = -16.0, (0.0, 1.0)  # Δ up to 1: cs falls by ~1000 per chunk
    inp["dt"] = inp["dt"] + 8.0
    y_ref = check_scan(inp, chunk=64)[0]
    assert torch.isfinite(y_ref).all()
    long = dict(case(L=53, h=2), dt_softplus=False, dt_limit=(0.0, math.inf), dt_bias=None)
    long["dt"], long["A"] = (
        torch.full_like(long["dt"], 1e-6),
        -torch.ones(2, dtype=torch.float64),
    )  # A·Δ = −1e-6
    check_scan(long)


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_with_nan_padding(backend):
    """x, B, C, dt as strided views into one fused projection whose unused columns and rows past L hold NaN; x and C
    interleave their groups, so their innermost stride is not 1; A, D, dt_bias are strided views too."""
    b, L, h, p, n = 2, 37, 4, 8, 16
    inp = case(b, L, h, p, n, groups=(2, 2, 4))
    buf = torch.full((b, L + 9, 2 * p + 2 * n + 4 * n + h + 4), math.nan, device=DEV)
    x, B, C, dt = torch.split(buf[..., :-4], [2 * p, 2 * n, 4 * n, h], dim=-1)
    x, B, C = (
        x.unflatten(-1, (p, 2)).transpose(-1, -2),
        B.unflatten(-1, (2, n)),
        C.unflatten(-1, (n, 4)).transpose(-1, -2),
    )
    for view, k in ((x, "x"), (B, "B"), (C, "C"), (dt, "dt")):
        view[:, :L] = inp[k].to(DEV, torch.float32)
    per_head = {
        k: torch.stack([v, v], dim=1)[:, 0] for k, v in f32(inp).items() if k in ("A", "D", "dt_bias")
    }  # stride 2
    y = ssd(
        **dict(f32(inp), x=x[:, :L], B=B[:, :L], C=C[:, :L], dt=dt[:, :L], **per_head),
        chunk_size=16,
        backend=backend,
    )
    assert torch.isfinite(y).all() and rel_rms(y, ssm_scan_ref(**inp)) <= 1e-5


def test_gradients_match_sequential():
    """ssd (auto → ssd_chunked on CPU with grads) vs autograd of the fp64 loop, every input, loss on y and final state."""
    inp = case(L=37, h=4, p=4, n=8, groups=(2, 2, 4))
    grads = []
    for fn in (
        lambda **a: ssd(**a, chunk_size=16, return_final_state=True),
        lambda **a: ssm_scan_ref(**a, return_final_state=True),
    ):
        leaves = {k: v.clone().requires_grad_() if torch.is_tensor(v) else v for k, v in inp.items()}
        y, s = fn(**leaves)
        gen = torch.Generator().manual_seed(1)
        w_y, w_s = (
            torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (y, s)
        )  # same weights for both paths
        ((y * w_y).sum() + (s * w_s).sum()).backward()
        grads.append({k: v.grad for k, v in leaves.items() if torch.is_tensor(v)})
    for k, g_ref in grads[1].items():
        assert g_ref is not None and g_ref.abs().sum() > 0, k
        assert rel_rms(grads[0][k], g_ref) <= 1e-10, (k, rel_rms(grads[0][k], g_ref))


def test_no_nan_gradients_under_strong_decay():
    inp = f32(case(L=64, h=2))
    inp["A"][:], inp["dt_limit"], inp["dt"] = (
        -16.0,
        (0.0, 1.0),
        inp["dt"] + 8.0,
    )  # exp(cs_i − cs_j) spans e^±1000 in a chunk
    leaves = {k: v.requires_grad_() if torch.is_tensor(v) else v for k, v in inp.items()}
    y, s = ssd_chunked(**leaves, chunk_size=64, return_final_state=True)
    (y.sum() + s.sum()).backward()
    assert all(torch.isfinite(v.grad).all() for v in leaves.values() if torch.is_tensor(v))


def test_long_sequence():
    """T = 32768, Mamba2's initial values: chunked fp32 vs the fp64 loop within 1e-4 rel-RMS, no NaN or inf."""
    inp = random_inputs(1, 32768, 2, 4, 4, groups=(1, 1, 2), dtype=torch.float64)
    with torch.no_grad():
        y_ref, s_ref = ssm_scan_ref(**inp, return_final_state=True)
        y, s = ssd(**f32(inp), chunk_size=64, return_final_state=True, backend="torch")
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert rel_rms(y, y_ref) <= 1e-4 and rel_rms(s, s_ref) <= 1e-4


def test_backend_choice():
    inp = {k: v.float() if torch.is_tensor(v) else v for k, v in case(L=20).items()}
    assert torch.equal(ssd(**inp, chunk_size=16), ssd_chunked(**inp, chunk_size=16))
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        ssd(**case(L=20), chunk_size=16, backend="triton")  # fp64: the kernels compute in fp32
    with pytest.raises(ValueError, match="forward-only"):
        ssd(**dict(inp, x=inp["x"].requires_grad_()), chunk_size=16, backend="triton")


def test_imports_and_runs_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    spec = importlib.util.spec_from_file_location("ssm_scan_without_triton", S.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    inp = {k: v.float() if torch.is_tensor(v) else v for k, v in case(L=20).items()}
    assert not mod.HAS_TRITON and torch.equal(
        mod.ssd(**inp, chunk_size=16), ssd_chunked(**inp, chunk_size=16)
    )
    with pytest.raises(ValueError, match="needs the triton package"):
        mod.ssd(**inp, chunk_size=16, backend="triton")


BAD_SCAN = [  # (change to valid float32 inputs, words the message must contain)
    (lambda a: dict(a, x=a["x"][:1]), "disagree"),
    (lambda a: dict(a, B=a["B"][..., :7]), "disagree"),
    (lambda a: dict(a, x=a["x"][:, :, 0]), "expected x"),
    (lambda a: dict(a, B=a["B"].new_ones(2, 20, 3, 16)), "not divisible by B's 3 groups"),
    (lambda a: dict(a, x=a["x"].to(torch.int32)), "x must be a floating-point"),
    (lambda a: dict(a, dt=a["dt"].bool()), "dt must be a floating-point"),
    (lambda a: dict(a, chunk_size=48), "chunk_size must be a power of 2"),
    (lambda a: dict(a, chunk_size=8), "chunk_size must be a power of 2"),
    (lambda a: dict(a, A=-a["A"]), "strictly negative"),
    (lambda a: dict(a, A=a["A"][:1]), "A must have shape"),
    (lambda a: dict(a, D=a["D"].new_ones(4, 8)), "D must have shape"),
    (lambda a: dict(a, initial_state=a["initial_state"][..., :5]), "state must have shape"),
    (lambda a: dict(a, dt_limit=(0.5, 0.1)), "dt_limit"),
    (lambda a: dict(a, backend="cuda"), "backend must be"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", range(len(BAD_SCAN)))
def test_bad_scan_input(bad, backend):
    change, words = BAD_SCAN[bad]
    args = change(dict(f32(case(L=20, h=4, groups=(2, 2, 4))), chunk_size=16, backend=backend))
    with pytest.raises(ValueError, match=words):
        ssd(**args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_step_input(backend):
    inp = f32(case(L=1, h=4, groups=(2, 2, 4)))
    state = inp["initial_state"].clone()
    args = dict(
        x=inp["x"][:, 0], dt=inp["dt"][:, 0], A=inp["A"], B=inp["B"][:, 0], C=inp["C"][:, 0], backend=backend
    )
    for state_, change, words in [
        (state[:, :2], {}, "state must have shape"),
        (state, dict(x=inp["x"]), "expected x"),
        (state, dict(C=inp["C"][:, 0, :3]), "not divisible by C's 3"),
        (state, dict(A=inp["A"].abs()), "strictly negative"),
    ]:
        with pytest.raises(ValueError, match=words):
            ssm_step(state_, **dict(args, **change))
    if backend == "triton":
        with pytest.raises(ValueError, match="float32"):
            ssm_step(state.double(), **args)
    assert torch.equal(state, inp["initial_state"])  # nothing was written


@pytest.mark.skipif(not COMPILED, reason="compiled kernels: needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("L,chunk", [(2048, 64), (8192, 256)])
def test_gpu_bf16(L, chunk):
    inp = random_inputs(2, L, 8, 64, 128, groups=(2, 2, 8), device="cuda")
    y_ref, s_ref = ssd(**inp, chunk_size=chunk, return_final_state=True, backend="torch")
    low = dict({k: v.bfloat16() for k, v in inp.items()}, A=inp["A"], initial_state=inp["initial_state"])
    y, s = ssd(**low, chunk_size=chunk, return_final_state=True, backend="triton")
    y_low = ssd(**low, chunk_size=chunk, backend="torch")
    assert rel_rms(y, y_ref) <= max(1e-2, 2 * rel_rms(y_low, y_ref)) and rel_rms(s, s_ref) <= 1e-2
    assert torch.equal(y, ssd(**low, chunk_size=chunk, backend="triton"))  # deterministic: no atomics
