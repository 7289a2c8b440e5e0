"""What the hybrid buys: KV cache per token, decode throughput and memory against the teacher and a
MambaInLlama-style hybrid (paper.md §8.2, §15, §17; protocol in kernels.md §8).

Peers, built from the same teacher weights by the same conversion (convert.py) and timed in one run:
  teacher       every layer GQA attention
  mambainllama  every other layer GQA attention, the rest Mamba2 (50 % of the teacher's KV cache)
  zebra         the size's MLA layers, the rest Mamba2
As in the paper's benchmark, decode is timed over caches already filled to the context length with
random contents (decode speed does not depend on the values); prefill is timed separately, for real.

  python bench.py                          # 135m on CPU, fp32, contexts 512..16k, batch 1 and 8 (<= 10 min)
  python bench.py --size 1b --teacher PATH # on a GPU, bf16, contexts up to 32k
  python bench.py --plot bench.png         # also draw throughput and memory (needs matplotlib)
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

import convert
from model import SIZES, load_checkpoint, save_checkpoint, size_config


# ----------------------------------------------------------------------------- KV cache (paper.md §8.2)
def kv_cache_bytes(cfg, S, batch=1, elt=2):
    """Bytes of cache that grow with length for S tokens: the paper's KV formula times the element size."""
    return cfg.kv_bytes_per_token(elt) * S * batch


def mamba_state_bytes(cfg, batch=1, elt=2):
    """The constant Mamba2 state per sequence over all m2 layers: conv state (d_conv-1 inputs of the
    x/B/C channels, elt bytes each) + the fp32 SSM state (H, P, N)."""
    conv = (cfg.d_inner + 2 * cfg.d_xb) * (cfg.d_conv - 1) * elt
    ssm = cfg.n_head * cfg.head_dim * cfg.head_dim * 4
    return batch * cfg.kinds.count("m2") * (conv + ssm)


def zebra_config(size):
    """The size's Zebra hybrid: its published MLA layers, Mamba2 everywhere else."""
    c = size_config(size)
    return size_config(size, kinds=["mla" if i in c.mla_layers else "m2" for i in range(c.n_layer)])


def kv_section():
    rows = []
    for size in ("135m", "1b", "3b", "8b"):
        t, z = size_config(size), zebra_config(size)
        rows.append(
            dict(
                size=size,
                mla_layers=z.mla_layers,
                teacher_bytes=t.kv_bytes_per_token(),
                zebra_bytes=z.kv_bytes_per_token(),
                pct=100 * z.kv_bytes_per_token() / t.kv_bytes_per_token(),
                mamba_state_bytes=mamba_state_bytes(z),
            )
        )
    print("\n== KV cache per token (bf16) ==")
    print(f"{'size':<6}{'MLA layers':<34}{'teacher B':>10}{'zebra B':>9}{'% of T':>9}{'M2 state/seq':>14}")
    for r in rows:
        print(
            f"{r['size']:<6}{str(r['mla_layers']):<34}{r['teacher_bytes']:>10}{r['zebra_bytes']:>9}{r['pct']:>8.3f}%"
            f"{r['mamba_state_bytes'] / 2**20:>11.2f} MiB"
        )
    return rows


# ----------------------------------------------------------------------------- peers
def make_peers(teacher, folder):
    """Build the three peers from the teacher and save them, so each can be timed in its own process."""
    cfg = teacher.cfg
    mla = convert.make_student(teacher, "mla")
    m2 = convert.make_student(teacher, "m2")
    peers = {
        "teacher": teacher,
        "mambainllama": convert.compose_hybrid(teacher, mla, m2, [], attn_layers=range(0, cfg.n_layer, 2)),
        "zebra": convert.compose_hybrid(teacher, mla, m2, cfg.mla_layers),
    }
    paths = {}
    for name, m in peers.items():
        paths[name] = os.path.join(folder, f"{name}.pt")
        save_checkpoint(paths[name], m, "bench_" + name)
    return paths


@torch.no_grad()
def time_decode(model, S, batch, steps, repeats, device):
    """Median seconds per decode step over a cache pre-filled with S random positions per sequence."""
    cache = model.allocate_cache(batch, S + steps * (repeats + 1))
    for c in cache.layers:
        for t in c if isinstance(c, tuple) else (c,):
            t.normal_()
    tok = torch.randint(0, model.cfg.vocab_size, (batch, 1), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for r in range(repeats + 1):  # the first round is warm-up
        cache.pos.fill_(S)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            model(tok, cache=cache)
        sync()
        times.append((time.perf_counter() - t0) / steps)
    kv = cache.nbytes(("attn", "mla"))
    return sorted(times[1:])[len(times[1:]) // 2], kv


@torch.no_grad()
def time_prefill(model, T, device):
    idx = torch.randint(0, model.cfg.vocab_size, (1, T), device=device)
    model(idx[:, :16])
    t0 = time.perf_counter()
    model(idx)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_peer(path, contexts, batches, prefills, steps, repeats, device, dtype):
    """One peer in this process: decode tokens/s per (context, batch), prefill seconds, peak memory."""
    model = load_checkpoint(path, device, dtype)[0].eval()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    out = dict(decode=[], prefill=[])
    for S in contexts:
        for b in batches:
            sec, kv = time_decode(model, S, b, steps, repeats, device)
            assert kv == kv_cache_bytes(model.cfg, S + steps * (repeats + 1), b, dtype.itemsize), (
                "KV formula != allocation"
            )
            out["decode"].append(dict(context=S, batch=b, tok_s=b / sec, kv_bytes=kv))
    for T in prefills:
        out["prefill"].append(dict(tokens=T, seconds=time_prefill(model, T, device)))
    out["peak_mem_bytes"] = torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss()
    return out


def peak_rss():
    """Peak resident bytes of this process. Linux's VmHWM starts afresh at exec; ru_maxrss would carry over the
    parent's peak (the parent holds all three peers when it starts this process)."""
    try:
        return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- report
def plot(path, results, contexts, batch):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot needs matplotlib (pip install matplotlib); {path} not written")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        rows = [d for d in r["decode"] if d["batch"] == batch]
        a.plot([d["context"] for d in rows], [d["tok_s"] for d in rows], "o-", label=name)
        b.plot([d["context"] for d in rows], [d["kv_bytes"] / 2**20 for d in rows], "o-", label=name)
    a.set(xscale="log", xlabel="context", ylabel=f"decode tokens/s (batch {batch})")
    b.set(xscale="log", yscale="log", xlabel="context", ylabel="KV cache MiB")
    a.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description="KV cache, decode throughput and memory of teacher vs hybrids.")
    p.add_argument("--size", default="135m", choices=[s for s in SIZES if s != "tiny"] + ["tiny"])
    p.add_argument("--teacher", help="teacher source (default: the size key; 1b/3b/8b need a path)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--contexts", default=None, help="comma list (default CPU 512,2048,8192,16384; GPU up to 32768)"
    )
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prefills", default=None, help="prefill lengths timed for real (default CPU 512,2048)")
    p.add_argument("--steps", type=int, default=8, help="decode steps per timed round")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--kernels", default="true", choices=["true", "false"], help="also run the kernel self-timings"
    )
    p.add_argument("--plot", help="PNG file for throughput and memory against context")
    p.add_argument("--peer", help=argparse.SUPPRESS)  # internal: time one saved peer in this process
    a = p.parse_args(argv)
    gpu = a.device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    contexts = [
        int(x)
        for x in (a.contexts or ("1024,4096,8192,16384,32768" if gpu else "512,2048,8192,16384")).split(",")
    ]
    batches = [int(x) for x in a.batches.split(",")]
    prefills = [int(x) for x in (a.prefills or ("1024,4096" if gpu else "512,2048")).split(",")]
    torch.set_num_threads(a.threads)
    if a.peer:
        print(json.dumps(run_peer(a.peer, contexts, batches, prefills, a.steps, a.repeats, a.device, dtype)))
        return
    print(f"device {a.device}, dtype {dtype}, torch threads {a.threads}")
    kv_rows = kv_section()
    teacher, _ = convert.load_teacher(a.teacher or a.size)
    teacher.cfg = convert.with_hybrid_fields(teacher.cfg, a.size)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_peers(teacher, tmp)
        del teacher
        for name, path in paths.items():
            print(f"timing {name} ...", flush=True)
            cmd = [
                sys.executable,
                __file__,
                "--peer",
                path,
                "--device",
                a.device,
                "--contexts",
                ",".join(map(str, contexts)),
                "--batches",
                a.batches,
                "--prefills",
                ",".join(map(str, prefills)),
                "--steps",
                str(a.steps),
                "--repeats",
                str(a.repeats),
                "--threads",
                str(a.threads),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"timing {name} failed:\n{res.stderr[-2000:]}")
            results[name] = json.loads(res.stdout.strip().splitlines()[-1])
    print("\n== Decode throughput (tokens/s; caches pre-filled with random contents) ==")
    print(
        f"{'context':>8}{'batch':>6}"
        + "".join(f"{n:>14}" for n in results)
        + f"{'zebra/T':>9}{'zebra/MiL':>10}"
    )
    ratios = []
    for i, d in enumerate(results["teacher"]["decode"]):
        tps = {n: r["decode"][i]["tok_s"] for n, r in results.items()}
        ratios.append(
            dict(
                context=d["context"],
                batch=d["batch"],
                **{f"{n}_tok_s": v for n, v in tps.items()},
                zebra_vs_teacher=tps["zebra"] / tps["teacher"],
                zebra_vs_mambainllama=tps["zebra"] / tps["mambainllama"],
            )
        )
        print(
            f"{d['context']:>8}{d['batch']:>6}"
            + "".join(f"{v:>14.1f}" for v in tps.values())
            + f"{ratios[-1]['zebra_vs_teacher']:>8.2f}x{ratios[-1]['zebra_vs_mambainllama']:>9.2f}x"
        )
    print("\n== Prefill (seconds, batch 1) and peak memory ==")
    for n, r in results.items():
        pre = "  ".join(f"{q['tokens']}: {q['seconds']:.2f}s" for q in r["prefill"])
        print(f"{n:<14}{pre}   peak {'GPU' if gpu else 'RSS'} {r['peak_mem_bytes'] / 2**30:.2f} GiB")
    if a.kernels == "true":
        print("\n== Kernels (the files' own self-timings) ==", flush=True)
        for f in ("ssm_scan.py", "mla.py"):
            res = subprocess.run(
                [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), f)],
                capture_output=True,
                text=True,
            )
            print(
                res.stdout[-3000:]
                + (f"{f} self-test FAILED:\n{res.stderr[-2000:]}" if res.returncode else "")
            )
    if a.plot:
        plot(a.plot, results, contexts, max(batches))
    print(
        json.dumps(
            dict(
                size=a.size,
                device=a.device,
                dtype=str(dtype),
                threads=a.threads,
                kv=kv_rows,
                decode=ratios,
                peers=results,
            )
        )
    )


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")
