"""Tests for ssm_scan.py: Triton (interpreter on CPU, fp32) = chunked torch = the fp64 sequential loop,
on odd lengths, groups, initial/final states, chaining, prefill + decode, each kernel against the loop run
chunk by chunk on every grid axis, gradients, autocast, long sequences, host-sync-free decode and bad input.
Run: python -m pytest tests/test_ssm_scan.py -q
     (on a GPU, TRITON_INTERPRET=0 runs the same cases on the compiled kernels)
"""

import importlib.util
import math
import os
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import ssm_scan as S
from ssm_scan import random_inputs, rel_rms, ssd, ssd_chunked, ssm_scan_ref, ssm_step, ssm_step_ref

BACKENDS = ["torch", "triton"]
COMPILED = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEV = "cuda" if COMPILED else "cpu"  # fp32 inputs live here; fp64 references stay on the CPU


def case(b=2, T=37, h=2, p=8, n=16, groups=(1, 1, 1), extras=True, seed=0):
    """fp64 inputs; extras = initial state, D and dt_bias, else none of them."""
    inp = random_inputs(b, T, h, p, n, groups, dtype=torch.float64, seed=seed)
    if extras:
        return inp
    return {k: v for k, v in inp.items() if k not in ("D", "dt_bias", "initial_state")}


def f32(inp):
    return {k: v.to(DEV, torch.float32) if torch.is_tensor(v) else v for k, v in inp.items()}


def tokens(inp, a, b):
    """Tokens a..b-1 of a case: the per-token inputs sliced, the per-head ones kept."""
    return {k: v[:, a:b] if k in ("x", "dt", "B", "C") else v for k, v in inp.items()}


def check_scan(inp, chunk=16, backends=BACKENDS, tol=1e-5):
    """Every backend in fp32 vs the fp64 loop: rel-RMS ≤ tol and max abs ≤ 1e-4·max(1, ‖ref‖∞),
    outputs and final state."""
    y_ref, s_ref = ssm_scan_ref(**inp, return_final_state=True)
    for backend in backends:
        y, s = ssd(**f32(inp), chunk_size=chunk, return_final_state=True, backend=backend)
        assert y.shape == y_ref.shape and s.shape == s_ref.shape and y.dtype == s.dtype == torch.float32
        for got, ref in ((y, y_ref), (s, s_ref)):
            assert rel_rms(got, ref) <= tol, (backend, rel_rms(got, ref))
            assert (got.double().cpu() - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item()), backend
    return y_ref, s_ref


@pytest.mark.parametrize("extras", [False, True])
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("T", [1, 7, 15, 16, 17, 53])  # 1, 7, chunk − 1, chunk, chunk + 1, 3·chunk + 5
def test_scan_lengths(T, G, extras):
    # every path equals the loop at lengths around the chunk size, with and without the optional inputs
    check_scan(case(T=T, h=2, groups=(G, G, G), extras=extras, seed=T))


@pytest.mark.parametrize("groups", [(1, 1, 1), (2, 2, 2), (4, 4, 4), (2, 2, 4), (4, 1, 2)])
def test_groups(groups):
    # x, B and C each map head i to their own group i // (h/g); (2, 2, 4) is Zebra's layout
    check_scan(case(h=4, groups=groups))


@pytest.mark.parametrize("T,p,n", [(37, 20, 24), (5, 20, 24), (16, 16, 16)])
def test_odd_sizes(T, p, n):
    # non-power-of-2 p and n (masks), shorter than one chunk, and exactly one chunk
    check_scan(case(T=T, p=p, n=n))


def test_chunk_size_invariance():
    # chunk 128 (8 row blocks and 8 sub-blocks of 16 in the fp32 kernels) and 16/32/64 give the same y
    inp = case(b=1, T=130, groups=(1, 1, 2))
    y_ref = check_scan(inp, chunk=128)[0]
    for chunk in (16, 32, 64):
        for backend in BACKENDS:
            assert rel_rms(ssd(**f32(inp), chunk_size=chunk, backend=backend), y_ref) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T1", [16, 21])  # split on and off a chunk boundary
def test_chaining(backend, T1):
    # two calls chained through the final state equal one call over the whole sequence
    inp = f32(case(T=45, h=4, groups=(2, 2, 4)))
    y, s = ssd(**inp, chunk_size=16, return_final_state=True, backend=backend)
    y1, s1 = ssd(**tokens(inp, 0, T1), chunk_size=16, return_final_state=True, backend=backend)
    rest = dict(tokens(inp, T1, 45), initial_state=s1)
    y2, s2 = ssd(**rest, chunk_size=16, return_final_state=True, backend=backend)
    assert rel_rms(torch.cat([y1, y2], dim=1), y) <= 1e-5 and rel_rms(s2, s) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_then_decode(backend):
    # prefill 39 tokens, then 6 decode steps from its final state, equal the loop over all 45
    inp, T0 = case(T=45, h=4, groups=(2, 2, 4)), 39
    y_ref, s_ref = ssm_scan_ref(**inp, return_final_state=True)
    x = f32(inp)
    _, state = ssd(**tokens(x, 0, T0), chunk_size=16, return_final_state=True, backend=backend)
    per_head = {k: x[k] for k in ("A", "D", "dt_bias")}
    ys = [
        ssm_step(
            state, x["x"][:, t], x["dt"][:, t], B=x["B"][:, t], C=x["C"][:, t], backend=backend, **per_head
        )
        for t in range(T0, 45)
    ]
    assert rel_rms(torch.stack(ys, dim=1), y_ref[:, T0:]) <= 1e-5 and rel_rms(state, s_ref) <= 1e-5


@pytest.mark.parametrize("n,p,g", [(n, p, g) for n in (16, 24, 64, 128) for p in (64, 20) for g in (1, 2)])
def test_step_kernel(n, p, g):
    # the step kernel = the torch step on a strided state view, updated in place; n = 24 is not a power of 2,
    # so the lanes past n must be masked: B and C sit in NaN-padded rows, the state rows have 9 spare columns
    inp = random_inputs(2, 1, 2, p, n, groups=(g, g, g), device=DEV, seed=n + p + g)
    cache = torch.randn(2, 2, p, n + 9, device=DEV)
    before, state, ref = cache.clone(), cache[..., :n], cache[..., :n].double().cpu()
    args = [inp[k][:, 0] if k in ("x", "dt", "B", "C") else inp[k] for k in ("x", "dt", "A", "B", "C", "D")]
    for i in (3, 4):  # B, C -> views of the first n columns of (b, g, n + 9) buffers full of NaN
        padded = torch.full((2, g, n + 9), math.nan, device=DEV)
        padded[..., :n] = args[i]
        args[i] = padded[..., :n]
    y = ssm_step(state, *args, dt_bias=inp["dt_bias"], backend="triton")
    y_ref = ssm_step_ref(ref, *(t.double().cpu() for t in args), dt_bias=inp["dt_bias"].double().cpu())
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache[..., :n].double().cpu(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache[..., n:], before[..., n:]) and not torch.equal(cache, before)


# (h, p, n): the small case, p = 72 > 64 gives two P blocks in _chunk_scan_kernel, and p·n = 32·48 = 1536
# > 1024 gives two programs per head in _state_passing_kernel
KERNEL_SHAPES = [(4, 8, 16), (2, 72, 16), (2, 32, 48)]


def loop_per_chunk(inp, Q, prev=None):
    """The fp64 loop run on each chunk of Q tokens alone, from prev[:, k] (b, c, h, p, n) or from zero: what
    the prefill kernels compute per chunk -> outputs (b, T, h, p), each chunk's last state (b, c, h, p, n)."""
    d = {k: v.double() for k, v in inp.items()}
    ys, states = [], []
    for k, t0 in enumerate(range(0, d["x"].shape[1], Q)):
        init = None if prev is None else prev[:, k].double()
        y, s = ssm_scan_ref(**dict(tokens(d, t0, t0 + Q), initial_state=init), return_final_state=True)
        ys.append(y)
        states.append(s)
    return torch.cat(ys, dim=1), torch.stack(states, dim=1)


@pytest.mark.parametrize("h,p,n", KERNEL_SHAPES)
def test_chunk_state_kernel(h, p, n):
    # Δ and cs (b, h, c, Q) of _chunk_state_kernel = softplus and the in-chunk cumsum of A·Δ, Δ = 0 past
    # T; its chunk states (step 2) = the loop's final state over each chunk alone from zero; raw dt > 20
    # (softplus's identity branch, at a chunk's end so fp32 cs keeps its precision) and ≈ −12
    inp = f32(case(T=45, h=h, p=p, n=n, groups=(2, 2, h)))
    inp["dt"][:, 12:16], inp["dt"][:, 4:8] = 25.0, -12.0 - inp["dt_bias"]
    x, dt, A, B = (inp[k] for k in ("x", "dt", "A", "B"))
    dts, cs, states = S.chunk_state_fwd(x, dt, A, B, 16, inp["dt_bias"])
    delta = S.process_dt(dt.double(), inp["dt_bias"].double())  # (b, T, h)
    dts_ref = F.pad(delta, (0, 0, 0, 3)).view(2, 3, 16, h).permute(0, 3, 1, 2)  # (b, h, c, Q)
    torch.testing.assert_close(dts.double(), dts_ref, rtol=1e-6, atol=0)
    cs_ref = (dts_ref * A.double()[:, None, None]).cumsum(-1)
    torch.testing.assert_close(cs.double(), cs_ref, rtol=1e-5, atol=1e-5)
    _, states_ref = loop_per_chunk(inp, 16)
    torch.testing.assert_close(states.double(), states_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h,p,n", KERNEL_SHAPES)
def test_state_passing_kernel(h, p, n):
    # the states entering each chunk and the final state (step 3) = S ← exp(cs_last)·S + the chunk's state
    # in fp64, every element of p·n
    gen = torch.Generator().manual_seed(p)
    states = torch.randn(2, 3, h, p, n, generator=gen).to(DEV)
    cs = -torch.rand(2, h, 3, 16, generator=gen).cumsum(-1).to(DEV)
    init = torch.randn(2, h, p, n, generator=gen).to(DEV)
    prev, final = S.state_passing_fwd(states, cs, init)
    s, prev_ref = init.double(), []
    for k in range(3):
        prev_ref.append(s)
        s = torch.exp(cs[:, :, k, -1].double())[..., None, None] * s + states[:, k].double()  # (b, h, p, n)
    torch.testing.assert_close(prev.double(), torch.stack(prev_ref, dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double(), s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h,p,n", KERNEL_SHAPES)
def test_chunk_scan_kernel(h, p, n):
    # y of _chunk_scan_kernel (steps 1 and 4 + D·x, every P block) given the state entering each chunk = the
    # loop over each chunk alone from that state
    inp = f32(case(T=45, h=h, p=p, n=n, groups=(2, 2, h)))
    x, dt, A, B, C, D = (inp[k] for k in ("x", "dt", "A", "B", "C", "D"))
    dts, cs, _ = S.chunk_state_fwd(x, dt, A, B, 16, inp["dt_bias"])  # as the prefill makes them
    prev = torch.randn(2, dts.shape[2], h, p, n, generator=torch.Generator().manual_seed(1)).to(DEV)
    y = S.chunk_scan_fwd(x, B, C, dts, cs, prev, D)
    y_ref, _ = loop_per_chunk(inp, 16, prev)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-4)


def test_strong_decay():
    # A·Δ ≈ −128 per token (cs falls by ~8000 per chunk): every path stays finite and equals the loop
    inp = case(T=53, h=2)
    inp["A"][:], inp["dt"] = -16.0, inp["dt"] + 8.0
    y_ref = check_scan(inp, chunk=64)[0]
    assert torch.isfinite(y_ref).all()


def test_weak_decay():
    # A·Δ = −1e-6 per token (Δ = softplus(log(1e-6)) ≈ 1e-6): cs sums many tiny terms, losing none
    inp = case(T=53, h=2, extras=False)
    inp["dt"], inp["A"] = torch.full_like(inp["dt"], math.log(1e-6)), -torch.ones(2, dtype=torch.float64)
    check_scan(inp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_with_nan_padding(backend):
    # x, B, C, dt as strided views into one fused projection whose unused columns and rows past T hold NaN
    # (x and C interleave their groups, so their innermost stride is not 1; A, D, dt_bias are strided too)
    # give the loop's output
    b, T, h, p, n = 2, 37, 4, 8, 16
    inp = case(b, T, h, p, n, groups=(2, 2, 4))
    buf = torch.full((b, T + 9, 2 * p + 2 * n + 4 * n + h + 4), math.nan, device=DEV)
    x, B, C, dt = torch.split(buf[..., :-4], [2 * p, 2 * n, 4 * n, h], dim=-1)
    x, B, C = x.unflatten(-1, (p, 2)).transpose(-1, -2), B.unflatten(-1, (2, n)), C.unflatten(-1, (n, 4))
    C = C.transpose(-1, -2)
    for view, k in ((x, "x"), (B, "B"), (C, "C"), (dt, "dt")):
        view[:, :T] = inp[k].to(DEV, torch.float32)
    per_head = {
        k: torch.stack([v, v], dim=1)[:, 0] for k, v in f32(inp).items() if k in ("A", "D", "dt_bias")
    }
    views = dict(f32(inp), x=x[:, :T], B=B[:, :T], C=C[:, :T], dt=dt[:, :T], **per_head)  # stride 2 per head
    y = ssd(**views, chunk_size=16, backend=backend)
    assert torch.isfinite(y).all() and rel_rms(y, ssm_scan_ref(**inp)) <= 1e-5


def test_gradients_match_sequential():
    # gradients of ssd (auto -> ssd_chunked on CPU with grads) for every input, loss on y and the final
    # state, equal autograd through the fp64 loop
    inp = case(T=37, h=4, p=4, n=8, groups=(2, 2, 4))

    def chunked(**a):
        return ssd(**a, chunk_size=16, return_final_state=True)

    def loop(**a):
        return ssm_scan_ref(**a, return_final_state=True)

    grads = []
    for fn in (chunked, loop):
        leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
        y, s = fn(**leaves)
        gen = torch.Generator().manual_seed(1)
        w_y, w_s = (torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (y, s))  # same for both
        ((y * w_y).sum() + (s * w_s).sum()).backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for k, g_ref in grads[1].items():
        assert g_ref is not None and g_ref.abs().sum() > 0, k
        assert rel_rms(grads[0][k], g_ref) <= 1e-10, (k, rel_rms(grads[0][k], g_ref))


def test_no_nan_gradients_under_strong_decay():
    # exp(cs_i − cs_j) spans e^±8000 inside a chunk: masking before exp keeps every gradient finite
    inp = f32(case(T=64, h=2))
    inp["A"][:], inp["dt"] = -16.0, inp["dt"] + 8.0
    leaves = {k: v.requires_grad_() for k, v in inp.items()}
    y, s = ssd_chunked(**leaves, chunk_size=64, return_final_state=True)
    (y.sum() + s.sum()).backward()
    assert all(torch.isfinite(v.grad).all() for v in leaves.values())


def test_fp32_state_under_bf16_autocast():
    # under bf16 autocast (distill.py's training) the chunked scan still computes in fp32: the state's error
    # stays at fp32 level (bf16 matmuls gave ~2.5e-3)
    inp = case(T=256, h=4, p=16, n=16, groups=(2, 2, 4))
    _, s_ref = ssm_scan_ref(**inp, return_final_state=True)
    with torch.autocast("cpu", torch.bfloat16):
        y, s = ssd_chunked(**{k: v.float() for k, v in inp.items()}, chunk_size=64, return_final_state=True)
    assert s.dtype == torch.float32 and rel_rms(s, s_ref) <= 1e-5


def test_fp32_step_under_bf16_autocast():
    # the torch decode step also ignores autocast: its state update matches fp64
    inp = case(T=1, h=4, groups=(2, 2, 4))
    state, ref = inp["initial_state"].float(), inp["initial_state"].clone()
    args = [inp[k][:, 0] if k in ("x", "dt", "B", "C") else inp[k] for k in ("x", "dt", "A", "B", "C", "D")]
    ssm_step_ref(ref, *args, dt_bias=inp["dt_bias"])
    with torch.autocast("cpu", torch.bfloat16):
        ssm_step_ref(state, *(t.float() for t in args), dt_bias=inp["dt_bias"].float())
    assert rel_rms(state, ref) <= 1e-6


def test_decode_step_traces_without_host_sync():
    # a whole-graph trace fails on .item(), bool(tensor) or a branch on tensor values: none in the decode step
    inp = f32(case(T=1, h=4, groups=(2, 2, 4)))
    state = inp["initial_state"].clone()
    args = [inp[k][:, 0] if k in ("x", "dt", "B", "C") else inp[k] for k in ("x", "dt", "A", "B", "C", "D")]
    step = torch.compile(ssm_step, fullgraph=True, backend="eager", dynamic=False)
    y = step(state, *args, dt_bias=inp["dt_bias"], backend="torch")
    want = ssm_step_ref(inp["initial_state"].clone(), *args, dt_bias=inp["dt_bias"])
    torch.testing.assert_close(y, want)


@pytest.mark.skipif(not COMPILED, reason="compiled kernels: needs CUDA and TRITON_INTERPRET=0")
def test_gpu_decode_step_makes_no_sync():
    # CUDA's sync debug mode raises on any host synchronisation inside the Triton decode step
    inp = {k: v.cuda() for k, v in f32(case(T=1, h=4, groups=(2, 2, 4))).items()}
    args = [inp[k][:, 0] if k in ("x", "dt", "B", "C") else inp[k] for k in ("x", "dt", "A", "B", "C", "D")]
    state = inp["initial_state"].clone()
    ssm_step(state, *args, dt_bias=inp["dt_bias"], backend="triton")  # compile outside the checked region
    torch.cuda.set_sync_debug_mode("error")
    try:
        ssm_step(state, *args, dt_bias=inp["dt_bias"], backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_long_sequence():
    # at T = 32768 with Mamba2's initial values, chunked fp32 stays finite and within 1e-4 rel-RMS of the loop
    inp = random_inputs(1, 32768, 2, 4, 4, groups=(1, 1, 2), dtype=torch.float64)
    with torch.no_grad():
        y_ref, s_ref = ssm_scan_ref(**inp, return_final_state=True)
        y, s = ssd(**f32(inp), chunk_size=64, return_final_state=True, backend="torch")
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert rel_rms(y, y_ref) <= 1e-4 and rel_rms(s, s_ref) <= 1e-4


def test_auto_backend_on_cpu_is_chunked_torch():
    # backend="auto" on CPU tensors runs ssd_chunked (the interpreter is a test tool, not a CPU backend)
    inp = {k: v.float() for k, v in case(T=20).items()}
    assert torch.equal(ssd(**inp, chunk_size=16), ssd_chunked(**inp, chunk_size=16))


def test_imports_and_runs_without_triton(monkeypatch):
    # without triton the module imports, the torch path runs, and backend="triton" says what is missing
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    spec = importlib.util.spec_from_file_location("ssm_scan_without_triton", S.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    inp = {k: v.float() for k, v in case(T=20).items()}
    assert not mod.HAS_TRITON
    assert torch.equal(mod.ssd(**inp, chunk_size=16), ssd_chunked(**inp, chunk_size=16))
    with pytest.raises(ValueError, match="needs the triton package"):
        mod.ssd(**inp, chunk_size=16, backend="triton")


def _changed(args, change):
    """args with each keyword of change replacing its argument, or mapping it when it is a function."""
    return {k: change[k](v) if callable(change.get(k)) else change.get(k, v) for k, v in args.items()}


def scan_call(**change):
    """ssd on valid float32 inputs (T 20, 4 heads, Zebra's groups (2, 2, 4), chunk 16, backend="triton"),
    changed by `change`."""
    ssd(**_changed(dict(f32(case(T=20, h=4, groups=(2, 2, 4))), chunk_size=16, backend="triton"), change))


def step_call(backend, **change):
    """ssm_step on valid float32 decode inputs, changed by `change`; a rejected step leaves the state as it
    was."""
    inp = f32(case(T=1, h=4, groups=(2, 2, 4)))
    args = dict(state=inp["initial_state"].clone(), backend=backend, A=inp["A"])
    args.update({k: inp[k][:, 0] for k in ("x", "dt", "B", "C")})
    try:
        ssm_step(**_changed(args, change))
    except ValueError:
        assert torch.equal(args["state"], inp["initial_state"]), "a rejected step wrote the state"
        raise


FP64 = dict.fromkeys(("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state"), torch.Tensor.double)
BAD_SCAN = [  # (case id, change to valid inputs, what the ValueError must say)
    ("x_short", dict(x=lambda x: x[:1]), "disagree"),
    ("B_narrow", dict(B=lambda B: B[..., :7]), "disagree"),
    ("x_3d", dict(x=lambda x: x[:, :, 0]), "expected x"),
    ("B_3_groups", dict(B=lambda B: B.new_ones(2, 20, 3, 16)), "not divisible by B's 3 groups"),
    ("x_int", dict(x=lambda x: x.to(torch.int32)), "x must be a floating-point"),
    ("chunk_48", dict(chunk_size=48), "chunk_size must be a power of 2"),
    ("A_positive", dict(A=torch.neg), "strictly negative"),
    ("A_one", dict(A=lambda A: A[:1]), "A must have shape"),
    ("state_narrow", dict(initial_state=lambda s: s[..., :5]), "state must have shape"),
    ("backend_cuda", dict(backend="cuda"), "backend must be"),
    ("fp64_to_triton", FP64, "float32/float16/bfloat16"),
    # the kernels are forward-only: asking for them with a gradient is an error, not a silent detach
    ("grad_to_triton", dict(x=torch.Tensor.requires_grad_), "forward-only"),
]
BAD_STEP = [  # A's sign is checked per decode step under ZEBRA_DEBUG only (it reads A back to the host)
    ("state_narrow", dict(state=lambda s: s[:, :2]), "state must have shape"),
    ("x_with_time_axis", dict(x=lambda x: x[:, None]), "expected x"),
    ("C_3_groups", dict(C=lambda C: C[:, :3]), "not divisible by C's 3"),
    ("A_positive", dict(A=torch.abs), "strictly negative"),
]
BAD_INPUT = [(name, partial(scan_call, **change), words) for name, change, words in BAD_SCAN] + [
    (f"step_{name}_{backend}", partial(step_call, backend, **change), words)
    for backend in BACKENDS
    for name, change, words in BAD_STEP
]


@pytest.mark.parametrize("call,words", [pytest.param(call, words, id=i) for i, call, words in BAD_INPUT])
def test_bad_input(call, words, monkeypatch):
    # each malformed input raises one ValueError that names the problem
    monkeypatch.setattr(S, "DEBUG", True)
    with pytest.raises(ValueError, match=words):
        call()


@pytest.mark.skipif(not COMPILED, reason="compiled kernels: needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("T,chunk,p", [(2048, 64, 64), (8192, 256, 128)])
def test_gpu_bf16(T, chunk, p):
    # bf16 kernels at 1b (p = 64) and 3b/8b (p = 128) head sizes: within 1e-2 of fp32 torch and no worse than
    # 2x bf16 torch; deterministic (no atomics)
    inp = random_inputs(2, T, 8, p, p, groups=(2, 2, 8), device="cuda")
    y_ref, s_ref = ssd(**inp, chunk_size=chunk, return_final_state=True, backend="torch")
    low = dict({k: v.bfloat16() for k, v in inp.items()}, A=inp["A"], initial_state=inp["initial_state"])
    y, s = ssd(**low, chunk_size=chunk, return_final_state=True, backend="triton")
    y_low = ssd(**low, chunk_size=chunk, backend="torch")
    assert rel_rms(y, y_ref) <= max(1e-2, 2 * rel_rms(y_low, y_ref)) and rel_rms(s, s_ref) <= 1e-2
    assert torch.equal(y, ssd(**low, chunk_size=chunk, backend="triton"))
