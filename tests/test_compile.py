"""Every Triton kernel of ssm_scan.py and mla.py compiles ahead of time for sm_80 and sm_90, without a GPU,
as the model launches it at the paper sizes, and forms its batch/chunk/head offsets in int64.

The launches are recorded from the model's own calls: one model.Mamba2 and one model.MLA mixer per size of
model.SIZES (135m/1b/3b/8b) are built on the meta device, in bf16 and fp32, and run prefill without a cache
(no initial state), prefill into a cache (its state enters as the initial state) and one decode step, at
batch 1 and batch > 1, with each kernel swapped for a recorder. So the kernels see what a GPU run hands them:
x, B and C as the strided views the depthwise conv leaves, dt as a view into in_proj's output, the block
sizes and warps the wrappers pick. Each distinct launch specialisation (argument types, constexprs, ints
equal to 1, 16-byte alignment: what Triton's JIT keys its cache on) goes into `triton.compile` for an
explicit GPUTarget, with the ptxas inside the triton wheel.
A compile error, a kernel no call launched, or a register spill in bf16 (the dtype the paper sizes run in)
fails the first test; the table prints registers and spills per kernel, fp32 included.
The second test reads each compiled kernel's TTIR: a grid axis that indexes a batch row, a chunk or a head
reaches 2^31 elements of offset long before its own count does (mamba_ssm issue #1015: past ~61k tokens), so
no value derived from one may be multiplied in i32.
Run: python -m pytest tests/test_compile.py -q -s   or   python tests/test_compile.py   (prints the table)
"""

import functools
import json
import os
import re
import subprocess
import sys
import time

import pytest
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = (80, 90)
MAX_SHARED = {80: 166912, 90: 232448}  # bytes of shared memory one block may use (A100, H100)
SIZES = ("135m", "1b", "3b", "8b")
# (batch, prefill length): T = 1001 is no multiple of 16 (strides of T lose their alignment hint) and ends
# inside a chunk; the decode steps run on caches of T + 1 rows
CALLS = ((1, 2048), (3, 1001))
# grid axes that index a batch row, a chunk or a head; the other axes count tiles of one dimension (p, n,
# chunk rows, latent splits), whose offsets stay below that dimension's extent
OFFSET_AXES = {
    "_chunk_state_kernel": (0, 1, 2),  # (chunk, batch, head)
    "_state_passing_kernel": (1, 2),  # (p·n tile, batch, head)
    "_chunk_scan_kernel": (0, 2),  # (batch·chunk, row and column tile, head)
    "_ssm_step_kernel": (1, 2),  # (p tile, batch, head)
    "_mla_decode_split_kernel": (0, 1),  # (batch, head block, split)
    "_mla_decode_reduce_kernel": (0, 1),  # (batch, head)
}


@pytest.fixture(scope="module")
def report():
    # compiles in a child process: conftest's TRITON_INTERPRET=1 makes every kernel an interpreted function
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    print(res.stdout)
    lines = res.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), res.stdout[-4000:] + res.stderr[-4000:]
    return json.loads(lines[-1])


def test_kernels_compile_for_sm80_and_sm90_without_spills(report):
    # every kernel launched by the model's calls compiles for both targets, and no bf16 compile spills
    assert report["compiles"] > 0 and not report["failures"], "\n".join(report["failures"])


def test_kernel_offsets_are_int64(report):
    # no kernel multiplies a batch/chunk/head program id (or a value derived from one) in i32; the probe
    # shows the check catches such a product: its int32 variant is flagged, its int64 one is not
    assert report["probe"] == {"int32": True, "int64": False}, report["probe"]
    assert not report["int32_offsets"], "\n".join(report["int32_offsets"])


# ----------------------------------------------------------------------------- the child process
@triton.jit
def _offset_probe_kernel(ptr, stride, WIDE: tl.constexpr):
    """A batch offset formed in i32 (WIDE=False) or i64: the int64 check must flag exactly the first."""
    b = tl.program_id(0)
    if WIDE:
        b = b.to(tl.int64)
    tl.store(ptr + b * stride, 1.0)


class Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, fn):
        self.fn, self.launches, self.call = fn, [], None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.call, args, kwargs))

        return launch


def install_recorders():
    """Swap every @triton.jit kernel of both files (the names ending in _kernel) for a Recorder, and let the
    model's calls take the Triton path as on a GPU."""
    import torch

    import mla
    import ssm_scan

    def use_triton(backend, tensors, state_dtype=torch.float32):
        # the model passes backend="auto", which on CUDA tensors without gradients is the Triton path; the
        # meta tensors here stand for CUDA ones
        assert backend == "auto" and not torch.is_grad_enabled(), backend
        return True

    ssm_scan.use_triton = mla.use_triton = use_triton
    ssm_scan._check_A = lambda A: None  # A < 0 reads values, and meta tensors hold none
    kernels = {}
    for mod in (ssm_scan, mla):
        for name, fn in list(vars(mod).items()):
            if name.endswith("_kernel") and hasattr(fn, "arg_names"):
                kernels[name] = Recorder(fn)
                setattr(mod, name, kernels[name])
    return kernels


def record_model_launches(kernels, dtype):
    """Run the model's mixers at every paper size on the meta device -> {kernel: [(call, args, kwargs)]}."""
    import torch

    import model

    for rec in kernels.values():
        rec.launches = []
    meta = dict(device="meta", dtype=dtype)
    for size in SIZES:
        cfg = model.size_config(size)
        with torch.device("meta"):
            m2, attn = model.Mamba2(cfg).to(dtype), model.MLA(cfg, cfg.pairs_for(cfg.mla_layers[0])).to(dtype)
        cos = sin = torch.empty(1, 1, cfg.head_dim // 2, device="meta")  # the teacher's rope tables, one step
        for b, T in CALLS:
            u, pos = torch.empty(b, T, cfg.d_model, **meta), torch.zeros(b, dtype=torch.long, device="meta")
            ssm_cache = m2.allocate_cache(b, T + 1, dtype, "meta")
            kv_cache = attn.allocate_cache(b, T + 1, dtype, "meta")
            steps = [
                ("prefill", lambda: m2(u)),
                ("prefill+state", lambda: m2(u, cache=ssm_cache)),
                ("decode", lambda: m2(u[:, :1], cache=ssm_cache)),
                ("decode", lambda: attn(u[:, :1], cos, sin, kv_cache, pos)),
            ]
            for call, run in steps:
                for rec in kernels.values():
                    rec.call = f"{size} b={b} T={T} {call}"
                with torch.no_grad():
                    run()
    return {name: rec.launches for name, rec in kernels.items()}


def ptxas_usage(ptx, arch):
    """(registers, spill bytes) from `ptxas -v` of the wheel's own ptxas, as the compile ran it."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [
            get_ptxas(arch).path,
            "-v",
            "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(arch)}",
        ]
        log = subprocess.run(cmd + [src, "-o", src + ".o"], capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


@functools.cache
def binder(fn, arch):
    """Triton's argument binder and backend for sm_<arch>, as the JIT builds them for a device."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def specialise(fn, arch, args, kwargs):
    """The JIT's own view of a launch: its cache key, and what `compile_launch` needs."""
    backend, bind = binder(fn, arch)
    bound, spec, opts = bind(*args, **kwargs)
    return (fn.__name__, arch, str(spec), str(opts)), (fn, kwargs, backend, bound, spec, opts)


def compile_launch(fn, kwargs, backend, bound, spec, opts):
    """Compile one specialised launch -> ((registers, spill bytes, shared bytes), TTIR)."""
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    src = triton.compiler.ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=backend.target, options=options.__dict__)
    return ptxas_usage(k.asm["ptx"], backend.target.arch) + (k.metadata.shared,), k.asm["ttir"]


def int32_offsets(ttir, axes):
    """Lines of a kernel's TTIR that multiply in i32 a value derived from the program ids of `axes`.
    Taint flows forward from `tt.get_program_id` through every op (into loops through their initial
    values and block arguments; values leaving a region only through scf.yield are not followed, and no
    kernel here forms an offset that way); an `arith.muli` with an i32 result and a tainted operand is
    reported."""
    pid_axes = {"x": 0, "y": 1, "z": 2}
    tainted, found = set(), []
    for line in ttir.splitlines():
        code = line.split(" loc(")[0].strip()  # the location suffix names no values
        m = re.match(r"(%[\w.$-]+)(?::\d+)? = (.*)", code)
        if not m:
            continue
        defined, rhs = m.groups()
        pid = re.match(r"tt\.get_program_id ([xyz])", rhs)
        if pid:
            if pid_axes[pid.group(1)] in axes:
                tainted.add(defined)
            continue
        names = {n.split("#")[0] for n in re.findall(r"%[\w.$#-]+", rhs)}
        if not names & tainted:
            continue
        tainted.add(defined)
        if " = " in rhs:  # scf.for: the induction variable and iter_args are defined on this line too
            tainted |= set(re.findall(r"(%[\w.$-]+) = ", rhs))
        if rhs.startswith("arith.muli") and re.search(r"(: |x)i32>?$", rhs):
            found.append(code)
    return found


JOBS = []  # (kernel name, specialised launch) per distinct compile, read by the forked workers


def compile_job(i):
    """One distinct compile, in a worker -> ((registers, spills, shared), int32 offset lines) or an error."""
    name, launch = JOBS[i]
    try:
        usage, ttir = compile_launch(*launch)
    except Exception as e:  # report every failing configuration, not only the first
        return f"{type(e).__name__}: {str(e)[:3000]}"
    return usage, int32_offsets(ttir, OFFSET_AXES.get(name, ()))


def compile_all():
    """Every distinct launch specialisation x target, bf16 and fp32, compiled on up to 8 CPU cores
    -> (rows, results, failures, int32 offset lines). rows: {(kernel, arch, dtype, blocks, warps):
    {blocks, sizes, [(cache key, call)]}}; results: {cache key: ((regs, spills, shared), offsets) | error}."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    rows, jobs, failures, kernels = {}, {}, [], install_recorders()
    for dtype in (torch.bfloat16, torch.float32):
        dt = str(dtype)[6:]
        for name, launches in record_model_launches(kernels, dtype).items():
            if not launches:
                failures.append(f"{name}: no model call launched it")
            if name not in OFFSET_AXES:
                failures.append(f"{name}: no entry in OFFSET_AXES (which grid axes index batch/chunk/head)")
            for arch in TARGETS:
                for call, args, kwargs in launches:
                    key, launch = specialise(kernels[name].fn, arch, args, kwargs)
                    jobs.setdefault(key, (name, launch))
                    blocks = {k: v for k, v in kwargs.items() if k.startswith("BLOCK") or k == "Q"}
                    row = rows.setdefault(
                        (name, arch, dt, str(blocks), kwargs.get("num_warps", 4)),
                        dict(blocks=blocks, sizes=[], keys=[]),
                    )
                    size = call.split()[0]
                    row["sizes"] += [size] * (size not in row["sizes"])
                    row["keys"].append((key, call))
    JOBS[:] = jobs.values()
    # fork: the workers inherit JOBS (meta tensors, kernels) unpickled; nothing has been compiled yet
    workers = min(os.cpu_count(), 8)  # a compile holds a few hundred MB
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        results = dict(zip(jobs, pool.map(compile_job, range(len(JOBS)))))
    offsets = []
    for key, (name, _) in jobs.items():
        if isinstance(results[key], str):
            failures.append(f"{name} sm_{key[1]}: {results[key]}")
        else:
            offsets += [f"{name} sm_{key[1]}: {line}" for line in results[key][1]]
    return rows, results, failures, offsets


def probe():
    """The int64 check on a kernel with a known i32 batch offset, and on its int64 twin."""
    import torch

    out = {}
    for wide in (False, True):
        _, launch = specialise(
            _offset_probe_kernel, 90, (torch.empty(8, device="meta"), 1024), dict(WIDE=wide)
        )
        out["int64" if wide else "int32"] = bool(int32_offsets(compile_launch(*launch)[1], (0,)))
    return out


def main():
    t0 = time.perf_counter()
    rows, results, failures, offsets = compile_all()
    print(f"{'kernel':27s}{'target':>7s}{'dtype':>9s}  {'sizes':15s}{'blocks':44s}", end="")
    print(f"{'warps':>6s}{'specs':>6s}{'regs':>5s}{'spills':>7s}{'smem':>7s}")
    for (name, arch, dt, _, warps), r in sorted(rows.items(), key=lambda kv: kv[0][:3]):
        blocks, sizes = " ".join(f"{k}={v}" for k, v in r["blocks"].items()), ",".join(r["sizes"])
        usage = {key: (results[key][0], call) for key, call in r["keys"] if not isinstance(results[key], str)}
        if not usage:
            continue
        regs, spills, smem = (max(u[i] for u, _ in usage.values()) for i in range(3))
        print(f"{name:27s}{'sm_' + str(arch):>7s}{dt:>9s}  {sizes:15s}{blocks:44s}", end="")
        print(f"{warps:>6d}{len(usage):>6d}{regs:>5}{spills:>7}{smem:>7}")
        for (_, spill, sm), call in usage.values():
            where = f"{name} sm_{arch} {dt} {blocks} warps={warps} ({call})"
            # bf16 is the dtype the paper sizes run in; fp32 (exact test runs) only reports
            if spill and dt == "bfloat16":
                failures.append(f"{where}: spills {spill} B")
            if sm > MAX_SHARED[arch]:  # compiles, but could never launch
                failures.append(f"{where}: shared memory {sm} > {MAX_SHARED[arch]} B")
    print(f"{len(results)} distinct compiles in {time.perf_counter() - t0:.1f} s")
    for f in failures + offsets:
        print("FAIL", f)
    result = dict(compiles=len(results), failures=failures, int32_offsets=offsets, probe=probe())
    print(json.dumps(result))
    return 1 if failures or offsets or result["probe"] != {"int32": True, "int64": False} else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("error: run with TRITON_INTERPRET=0: the compile needs real @triton.jit kernels")
    sys.path.insert(0, ROOT)
    sys.exit(main())
