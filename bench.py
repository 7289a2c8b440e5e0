"""What the hybrid buys and what it keeps (Zebra-Llama, arXiv 2505.17272): KV cache per token, decode
throughput and memory against the teacher and a MambaInLlama-style hybrid, and zero-shot accuracy retention
on lm-evaluation-harness tasks against the teacher the hybrid was distilled from.

Peers, built from the same teacher weights by the same conversion (convert.py) and timed in one run:
  teacher       every layer GQA attention
  mambainllama  every other layer GQA attention, the rest Mamba2 (50 % of the teacher's KV cache)
  zebra         the size's MLA layers, the rest Mamba2
As in the paper's benchmark, decode is timed over caches already filled to the context length with
random contents (decode speed does not depend on the values); prefill is timed separately, for real.
Each decode rate is printed beside its streaming limit: a step must read every weight and cache byte once,
so it cannot beat batch × read bandwidth / those bytes, with the bandwidth measured here on a large sum.

  python bench.py                          # 135m on CPU, contexts 512..16k, batch 1 and 8 (<= 10 min)
  python bench.py --size 1b --teacher PATH # on a GPU, bf16, contexts up to 32k
  python bench.py --precision fp32         # fp32 even where bf16 is native (default auto: bf16 on CUDA and
                                           # on CPUs with AVX512-BF16 or AMX, else fp32)
  python bench.py --compile                # also time the decode step compiled by torch.compile
  python bench.py --plot bench.png         # also draw throughput and memory (needs matplotlib)
  python bench.py --tasks zebra_mc         # accuracy, teacher vs newest distilled model (pip install lm-eval)
  python bench.py --tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande,openbookqa --ckpt out/135m/dpo.pt
"""

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

import convert
import generate
from model import SIZES, load_checkpoint, save_checkpoint, size_config

REPO = os.path.dirname(os.path.abspath(__file__))
EVALTASK = os.path.join(REPO, "tests", "evaltask")  # the offline task zebra_mc


# ----------------------------------------------------------------------------- KV cache
def kv_cache_bytes(cfg, S, batch=1, elt=2):
    """Bytes of cache that grow with length for S tokens: the paper's KV formula times the element size."""
    return cfg.kv_bytes_per_token(elt) * S * batch


def mamba_state_bytes(cfg, batch=1, elt=2):
    """The constant Mamba2 state per sequence over all m2 layers: conv state (d_conv-1 inputs of the
    x/B/C channels, elt bytes each) + the fp32 SSM state (H, P, N)."""
    conv = (cfg.d_inner + 2 * cfg.d_xb) * (cfg.d_conv - 1) * elt
    ssm = cfg.n_head * cfg.head_dim * cfg.head_dim * 4
    return batch * cfg.kinds.count("m2") * (conv + ssm)


def kv_section():
    rows = []
    for size in ("135m", "1b", "3b", "8b"):
        t = size_config(size)
        z = size_config(size, kinds=convert.hybrid_kinds(t.n_layer, t.mla_layers))
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
            f"{r['size']:<6}{str(r['mla_layers']):<34}{r['teacher_bytes']:>10}{r['zebra_bytes']:>9}"
            f"{r['pct']:>8.3f}%{r['mamba_state_bytes'] / 2**20:>11.2f} MiB"
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


def weight_bytes(model):
    """Weight bytes one decode step reads: every parameter once (a tied head and embedding are one tensor);
    an untied embedding table gives only the batch's rows, counted as nothing."""
    embed = model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    return sum(p.nbytes for p in model.parameters() if tied or p is not embed)


def read_bandwidth(nbytes=2**28, repeats=7, device="cpu"):
    """Bytes per second this machine reads, from the best of `repeats` sums of an nbytes fp32 tensor (far
    larger than any cache), with torch's current thread count."""
    t = torch.ones(nbytes // 4, device=device)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        t.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return t.nbytes / best


def streaming_limit(batch, model_bytes, cache_bytes, bandwidth):
    """Tokens/s of a decode step that did nothing but read its weights and caches once at `bandwidth`."""
    return batch * bandwidth / (model_bytes + cache_bytes)


@torch.no_grad()
def time_decode(model, S, batch, steps, repeats, device, compiled=False):
    """Median seconds per decode step over a cache pre-filled with S random positions per sequence, with the
    step eager or compiled by torch.compile (generate.decode_one, as generate.py --compile runs it)
    -> (seconds, KV bytes (attention and MLA), all cache bytes)."""
    cache = model.allocate_cache(batch, S + steps * (repeats + 1))
    for layer_cache in cache.layers:
        for t in layer_cache:
            t.normal_()
    step = generate.compiled_decode_one(torch.device(device).type) if compiled else generate.decode_one
    tok = torch.randint(0, model.cfg.vocab_size, (batch,), device=device)
    times = []
    for r in range(repeats + 1):  # the first round is warm-up (and compilation)
        cache.pos.fill_(S)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step(model, tok, cache)
        sync(device)
        times.append((time.perf_counter() - t0) / steps)
    return sorted(times[1:])[len(times[1:]) // 2], cache.nbytes(("attn", "mla")), cache.nbytes()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def time_prefill(model, T, device):
    idx = torch.randint(0, model.cfg.vocab_size, (1, T), device=device)
    model(idx[:, :16])
    t0 = time.perf_counter()
    model(idx)
    sync(device)
    return time.perf_counter() - t0


def run_peer(path, contexts, batches, prefills, steps, repeats, device, dtype, compiled=False):
    """One peer in this process, in dtype but Mamba2's per-head scalars (Model.cast): decode tokens/s per
    (context, batch) (also compiled with compiled=True) with the bytes a step reads, prefill seconds, peak
    memory."""
    model = load_checkpoint(path, device)[0].cast(dtype, device).eval()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    out = dict(decode=[], prefill=[], weight_bytes=weight_bytes(model))
    for S in contexts:
        for b in batches:
            sec, kv, cache_bytes = time_decode(model, S, b, steps, repeats, device)
            if kv != kv_cache_bytes(model.cfg, S + steps * (repeats + 1), b, dtype.itemsize):
                raise RuntimeError(f"{path}: allocated KV cache bytes differ from the paper's formula")
            row = dict(context=S, batch=b, tok_s=b / sec, kv_bytes=kv, cache_bytes=cache_bytes)
            if compiled:
                row["tok_s_compiled"] = b / time_decode(model, S, b, steps, repeats, device, compiled=True)[0]
            out["decode"].append(row)
    for T in prefills:
        out["prefill"].append(dict(tokens=T, seconds=time_prefill(model, T, device)))
    out["peak_mem_bytes"] = torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss()
    return out


def peak_rss():
    """Peak resident bytes of this process. Linux's VmHWM starts afresh at exec; ru_maxrss would carry over
    the parent's peak (the parent holds all three peers when it starts this process)."""
    try:
        return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- zero-shot accuracy
# The paper's headline: hybrid accuracy on lm-evaluation-harness zero-shot tasks as a share of the teacher's.
# The harness asks a model for log-likelihoods of (context, continuation) pairs and for greedy generations;
# the functions below answer with our own model and caches, and ZebraLM wraps them as an lm_eval.api.model.LM.
def prefix_id(tok):
    """The token an empty context starts from (lm-eval's HFLM: BOS, else the end-of-text token)."""
    return tok.bos_id if tok.bos_id is not None else tok.eos_id


def encode_pair(tok, context, continuation, specials=False):
    """(context, continuation) text -> (context ids, continuation ids) at HFLM's boundary: trailing spaces of
    the context move to the continuation, the pair is encoded whole and the continuation is the tail past the
    context's own encoding (so a merge across the boundary stays whole). E.g. ("Answer: ", "Paris") encodes
    "Answer: Paris" and scores the ids after those of "Answer:". An empty context becomes the prefix token.
    specials=True: the context is a chat render whose special-token text becomes their ids."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    bos = [tok.bos_id] if tok.bos_id is not None and not specials else []  # a chat render starts with BOS
    if not context:
        return [prefix_id(tok)], tok.encode(continuation, specials)
    whole, ctx = tok.encode(context + continuation, specials), tok.encode(context, specials)
    return bos + ctx, whole[len(ctx) :]


@torch.no_grad()
def score_continuations(model, pairs, batch_size=8):
    """pairs [(context ids, continuation ids)] -> [(sum of log p(continuation | context), whether greedy
    decoding gives the continuation)], in the order given. Rows are batched longest first and right-padded: a
    causal model's outputs at real positions never see the padding. Inputs longer than the context window
    keep their last max_seq_len tokens."""
    device = model.embed_tokens.weight.device
    window = model.cfg.max_seq_len
    out = [(0.0, True) if not cont else None for _, cont in pairs]  # nothing to score: log 1
    order = sorted(
        (i for i, o in enumerate(out) if o is None), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1])
    )
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        # the model reads context + continuation but its last token, which is only a target
        inputs = [(pairs[i][0] + pairs[i][1])[-(window + 1) : -1] for i in rows]
        idx = torch.zeros(len(rows), max(map(len, inputs)), dtype=torch.long)  # (B, T) right-padded
        for b, inp in enumerate(inputs):
            idx[b, : len(inp)] = torch.tensor(inp)
        h = model(idx.to(device), return_layers=True, logits=False)[2][-1]  # (B, T, D) after the final norm
        for b, i in enumerate(rows):
            cont = torch.tensor(pairs[i][1][-window:], device=device)  # (C,)
            end = len(inputs[b])
            logp = model.lm_head(h[b, end - len(cont) : end]).float().log_softmax(-1)  # (C, V)
            out[i] = (logp.gather(-1, cont[:, None]).sum().item(), bool((logp.argmax(-1) == cont).all()))
    return out


def rolling_pairs(ids, prefix, window):
    """A whole document's ids -> (context, continuation) pairs that score every token exactly once, each with
    as much context as the window allows (lm-eval's rolling windows, context length 1, made disjoint).
    E.g. ids [1, 2, 3, 4, 5], prefix 0, window 3 -> ([0], [1, 2, 3]), ([2, 3], [4, 5])."""
    if not ids:
        return []
    pairs, pos = [([prefix], ids[:window])], window
    while pos < len(ids):
        end = min(pos + window, len(ids))
        pairs.append((ids[end - window - 1 : pos], ids[pos:end]))  # context + continuation[:-1]: window ids
        pos = end
    return pairs


def generate_until(model, tok, contexts, until, max_new_tokens, specials=False):
    """Greedy continuations of a batch of context strings, decoded together with the model's caches
    (generate.generate); each stops at the end-of-turn token or once it contains a stop string, and is cut
    before the first stop string. Contexts keep their last max_seq_len - max_new_tokens tokens."""
    window = model.cfg.max_seq_len - max_new_tokens
    if window < 1:
        raise ValueError(
            f"max_gen_toks {max_new_tokens} leaves no room in the context of {model.cfg.max_seq_len}"
        )
    bos = [tok.bos_id] if tok.bos_id is not None and not specials else []
    prompts = [(bos + tok.encode(c, specials))[-window:] or [prefix_id(tok)] for c in contexts]
    out, done = [[] for _ in prompts], [False] * len(prompts)
    for nxt in generate.generate(model, prompts, max_new_tokens, stop_ids={tok.eos_id}):
        for b, t in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if t == tok.eos_id:
                done[b] = True
                continue
            out[b].append(t)
            done[b] = any(u in tok.decode(out[b]) for u in until)
        if all(done):
            break
    texts = [tok.decode(o) for o in out]
    return [min((t.split(u)[0] for u in until), key=len, default=t) for t in texts]


def accuracy_table(acc):
    """acc {"teacher": {task: accuracy}, "hybrid": {...}} -> rows (task, teacher, hybrid, retention %) plus
    the mean row; the paper's retention is the hybrid's mean accuracy over the teacher's."""
    tasks = list(acc["teacher"])
    rows = [(t, acc["teacher"][t], acc["hybrid"][t]) for t in tasks]
    rows.append(("mean", sum(r[1] for r in rows) / len(rows), sum(r[2] for r in rows) / len(rows)))
    return [(t, a, b, 100 * b / a if a else float("nan")) for t, a, b in rows]


def task_accuracy(results):
    """lm-eval results -> {task: accuracy}: acc_norm where the task has it (the paper's metric for ARC,
    HellaSwag, OBQA, PIQA), else acc."""
    return {
        task: r["acc_norm,none"] if "acc_norm,none" in r else r["acc,none"]
        for task, r in results["results"].items()
    }


@functools.cache
def zebra_lm_class():
    """ZebraLM, registered with lm-eval as "zebra"; lm-eval is imported here so that importing bench.py never
    needs it. From Python: ZebraLM = bench.zebra_lm_class(), then lm_eval.simple_evaluate(
    model=ZebraLM(ckpt="out/135m/dpo.pt"), tasks=["arc_easy"]). The lm_eval command line cannot see a model
    registered outside its package: use bench.py --tasks."""
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError:
        raise ValueError("zero-shot tasks need lm-evaluation-harness: pip install lm-eval") from None

    @register_model("zebra")
    class ZebraLM(LM):
        """Any zebra checkpoint or export directory (ckpt=), or a teacher source (teacher=), or a built
        (model, tokenizer); chat_template=True renders contexts in the model's chat format."""

        def __init__(
            self,
            ckpt=None,
            teacher=None,
            model=None,
            tokenizer=None,
            device="cpu",
            batch_size=8,
            max_batch_size=None,
            max_gen_toks=256,
            chat_template=False,
        ):
            super().__init__()
            if model is None:
                model, tokenizer = generate.load_model(ckpt, teacher, device=device)
            self.model, self.tok = model.eval(), tokenizer
            self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> 8
            self.max_gen_toks, self.chat = int(max_gen_toks), chat_template in (True, "True", "true")

        @property
        def tokenizer_name(self):
            return self.tok.name

        def chat_template(self, chat_template=False):
            return self.tok.chat_format or "" if chat_template else ""

        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            return self.tok.decode(self.tok.chat(chat_history, add_generation_prompt))

        def loglikelihood(self, requests, disable_tqdm=False):
            pairs = [encode_pair(self.tok, *r.args, specials=self.chat) for r in requests]
            return score_continuations(self.model, pairs, self.batch_size)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            prefix = prefix_id(self.tok)
            docs = [
                rolling_pairs(self.tok.encode(r.args[0]), prefix, self.model.cfg.max_seq_len)
                for r in requests
            ]
            scores = iter(score_continuations(self.model, [p for d in docs for p in d], self.batch_size))
            return [sum(next(scores)[0] for _ in d) for d in docs]

        def generate_until(self, requests, disable_tqdm=False):
            """Requests with the same stop strings and length limit are generated together, batch_size at
            a time."""
            groups, out = {}, [None] * len(requests)
            for i, r in enumerate(requests):
                until = r.args[1].get("until") or []
                until = (until,) if isinstance(until, str) else tuple(until)
                n = int(r.args[1].get("max_gen_toks", self.max_gen_toks))
                groups.setdefault((until, n), []).append(i)
            for (until, n), rows in groups.items():
                for start in range(0, len(rows), self.batch_size):
                    batch = rows[start : start + self.batch_size]
                    contexts = [requests[i].args[0] for i in batch]
                    texts = generate_until(self.model, self.tok, contexts, until, n, self.chat)
                    for i, text in zip(batch, texts):
                        out[i] = text
            return out

    return ZebraLM


def task_manager(tasks, include_path):
    """An lm-eval TaskManager that knows every task asked for, or one error listing the unknown ones (checked
    before any model is loaded). Local tasks alone skip indexing lm-eval's ~10k task configs."""
    zebra_lm_class()  # says how to install lm-eval when it is missing
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=False)
    if not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include_path)  # lm-eval's own tasks (arc_easy, hellaswag, ...)
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise ValueError(f"unknown lm-eval tasks {unknown}: see `lm_eval ls tasks`, or zebra_mc (offline)")
    return manager


def task_specs(tasks):
    """lm-eval task specs: a task of this repository's tests/evaltask as its YAML config with data_files made
    absolute, other tasks by name. The YAML gives data_files relative to the repository root, which HF
    datasets would resolve against the working directory; absolute, they are found from anywhere."""
    import yaml  # a dependency of lm-eval

    specs = []
    for task in tasks:
        path = os.path.join(EVALTASK, f"{task}.yaml")
        if not os.path.isfile(path):
            specs.append(task)
            continue
        with open(path) as f:
            cfg = yaml.safe_load(f)
        files = cfg["dataset_kwargs"]["data_files"]
        cfg["dataset_kwargs"]["data_files"] = {split: os.path.join(REPO, f) for split, f in files.items()}
        specs.append(cfg)
    return specs


TEACHER_DIMS = ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "head_dim", "d_ff")


def teacher_dims(cfg):
    return {k: getattr(cfg, k) for k in TEACHER_DIMS}


def check_teacher(teacher_cfg, hybrid_cfg, source, path):
    """Refuse a teacher whose dims differ from the hybrid's (a hybrid keeps its teacher's embeddings, MLPs
    and widths): retention against another model means nothing. The error names a size that fits."""
    t, h = teacher_dims(teacher_cfg), teacher_dims(hybrid_cfg)
    if t != h:
        diff = [k for k in TEACHER_DIMS if t[k] != h[k]]
        fits = [s for s in SIZES if teacher_dims(size_config(s)) == h]
        raise ValueError(
            f"{path} has {', '.join(f'{k} {h[k]}' for k in diff)}, but teacher {source} has "
            f"{', '.join(f'{k} {t[k]}' for k in diff)}: it was distilled from another teacher; pass that one "
            f"with {f'--size {fits[0]}' if fits else '--teacher PATH'}"
        )


def load_teacher_for(hybrid_cfg, path, source, device, dtype):
    """(model, tokenizer) of the teacher source to score the hybrid at path against, refused when its dims
    differ (a size key before anything is loaded or downloaded)."""
    if source in SIZES:
        check_teacher(size_config(source), hybrid_cfg, source, path)
    teacher = generate.load_model(teacher=source, device=device, dtype=dtype)
    check_teacher(teacher[0].cfg, hybrid_cfg, source, path)
    return teacher


def accuracy_section(teacher, hybrid, tasks, limit, manager, batch_size=8, chat_template=False):
    """(model, tokenizer) of teacher and hybrid through the same lm-eval tasks -> printed accuracy and
    retention table, and {"teacher"/"hybrid": {task: accuracy}}."""
    from lm_eval import simple_evaluate

    ZebraLM = zebra_lm_class()
    specs, acc = task_specs(tasks), {}
    for name, (model, tok) in (("teacher", teacher), ("hybrid", hybrid)):
        print(f"lm-eval: {name} on {', '.join(tasks)} ...", flush=True)
        lm = ZebraLM(model=model, tokenizer=tok, batch_size=batch_size, chat_template=chat_template)
        try:
            res = simple_evaluate(
                model=lm,
                tasks=specs,
                limit=limit,
                task_manager=manager,
                apply_chat_template=chat_template,
                bootstrap_iters=0,
                log_samples=False,
            )
        except ConnectionError as e:
            raise OSError(
                f"{e}: lm-eval's hub tasks download their datasets, which needs network access (or a filled "
                "HF cache); the local task zebra_mc runs offline"
            ) from None
        acc[name] = task_accuracy(res)
    print("\n== Zero-shot accuracy (lm-evaluation-harness) ==")
    print(f"{'task':<16}{'teacher':>9}{'hybrid':>9}{'retention':>11}")
    rows = accuracy_table(acc)
    for task, a, b, r in rows if len(rows) > 2 else rows[:1]:  # a mean of one task is that task
        print(f"{task:<16}{100 * a:>8.1f}%{100 * b:>8.1f}%{r:>10.1f}%")
    return acc


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


def throughput_section(a, contexts, batches, prefills):
    """Time the three peers, each in its own process so that peak memory is its own -> {peer: results}."""
    teacher, _ = convert.load_teacher(a.teacher or a.size)
    teacher.cfg = convert.with_hybrid_fields(teacher.cfg, a.size)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_peers(teacher, tmp)
        del teacher
        for name, path in paths.items():
            print(f"timing {name} ...", flush=True)
            cmd = [sys.executable, __file__, "--peer", path, "--device", a.device, "--steps", str(a.steps)]
            cmd += ["--contexts", ",".join(map(str, contexts)), "--batches", ",".join(map(str, batches))]
            cmd += ["--prefills", ",".join(map(str, prefills)), "--repeats", str(a.repeats)]
            cmd += ["--threads", str(a.threads), "--precision", a.precision]
            cmd += ["--compile"] if a.compile else []
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"timing {name} failed:\n{res.stderr[-2000:]}")
            results[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return results


def print_throughput(results, gpu, bandwidth):
    """The decode and prefill tables -> rows of tokens/s, each peer's streaming limit and zebra's speed-up per
    (context, batch)."""
    print("\n== Decode throughput (tokens/s; caches pre-filled with random contents) ==")
    print(
        f"each cell: tokens/s of its limit, batch × {bandwidth / 1e9:.1f} GB/s read (measured here) / the "
        "bytes of weights and caches a step reads"
    )
    names = "".join(f"{n:>18}" for n in results)
    print(f"{'context':>8}{'batch':>6}{names}{'zebra/T':>9}{'zebra/MiL':>10}")
    ratios = []
    for i, d in enumerate(results["teacher"]["decode"]):
        tps = {n: r["decode"][i]["tok_s"] for n, r in results.items()}
        limits = {
            n: streaming_limit(d["batch"], r["weight_bytes"], r["decode"][i]["cache_bytes"], bandwidth)
            for n, r in results.items()
        }
        ratios.append(
            dict(
                context=d["context"],
                batch=d["batch"],
                **{f"{n}_tok_s": v for n, v in tps.items()},
                **{f"{n}_limit_tok_s": v for n, v in limits.items()},
                zebra_vs_teacher=tps["zebra"] / tps["teacher"],
                zebra_vs_mambainllama=tps["zebra"] / tps["mambainllama"],
            )
        )
        cells = "".join(f"{f'{v:.1f} of {limits[n]:.1f}':>18}" for n, v in tps.items())
        r = ratios[-1]
        print(
            f"{d['context']:>8}{d['batch']:>6}{cells}"
            f"{r['zebra_vs_teacher']:>8.2f}x{r['zebra_vs_mambainllama']:>9.2f}x"
        )
    if "tok_s_compiled" in results["teacher"]["decode"][0]:
        print("\n== Decode step compiled by torch.compile (tokens/s: eager -> compiled) ==")
        print(f"{'context':>8}{'batch':>6}" + "".join(f"{n:>22}" for n in results))
        for i, d in enumerate(results["teacher"]["decode"]):
            pairs = [
                f"{r['decode'][i]['tok_s']:.1f} -> {r['decode'][i]['tok_s_compiled']:.1f}"
                for r in results.values()
            ]
            cells = "".join(f"{c:>22}" for c in pairs)
            print(f"{d['context']:>8}{d['batch']:>6}{cells}")
    print("\n== Prefill (seconds, batch 1) and peak memory ==")
    for n, r in results.items():
        pre = "  ".join(f"{q['tokens']}: {q['seconds']:.2f}s" for q in r["prefill"])
        print(f"{n:<14}{pre}   peak {'GPU' if gpu else 'RSS'} {r['peak_mem_bytes'] / 2**30:.2f} GiB")
    return ratios


def kernel_self_timings():
    print("\n== Kernels (the files' own self-timings) ==", flush=True)
    for f in ("ssm_scan.py", "mla.py"):
        path = os.path.join(REPO, f)
        res = subprocess.run([sys.executable, path], capture_output=True, text=True)
        failed = f"{f} self-test FAILED:\n{res.stderr[-2000:]}" if res.returncode else ""
        print(res.stdout[-3000:] + failed)


def int_list(text):
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be a positive integer")
    return values


def main(argv=None):
    p = argparse.ArgumentParser(
        description="KV cache, decode throughput and memory of teacher vs hybrids; with --tasks, zero-shot "
        "accuracy of the teacher vs the distilled hybrid (lm-evaluation-harness)."
    )
    p.add_argument("--size", default="135m", choices=list(SIZES), help="model size (default 135m)")
    p.add_argument(
        "--teacher",
        help="teacher source (default: for --tasks the one the checkpoint records, else the size key; "
        "1b/3b/8b need a path)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--contexts", type=int_list, help="comma list (default CPU 512,2048,8192,16384; GPU to 32768)"
    )
    p.add_argument("--batches", type=int_list, default=[1, 8], help="comma list of batch sizes (default 1,8)")
    p.add_argument("--prefills", type=int_list, help="prefill lengths timed for real (default CPU 512,2048)")
    p.add_argument("--steps", type=int, default=8, help="decode steps per timed round (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds, the median is reported (default 3)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument(
        "--precision",
        choices=generate.PRECISIONS,
        default="auto",
        help="weights' dtype; auto (default): bf16 on CUDA and on CPUs with native bf16, else fp32",
    )
    p.add_argument(
        "--kernels", action=argparse.BooleanOptionalAction, default=True, help="run the kernel self-timings"
    )
    p.add_argument("--compile", action="store_true", help="also time decode with the step torch.compile'd")
    p.add_argument("--plot", help="PNG file for throughput and memory against context")
    p.add_argument("--tasks", help="comma list of lm-eval tasks, e.g. arc_easy,hellaswag or zebra_mc (local)")
    p.add_argument("--ckpt", help="the hybrid for --tasks: checkpoint or export directory (default: newest)")
    p.add_argument("--out-dir", default="out", help="where distill.py wrote its checkpoints (default out)")
    p.add_argument("--limit", type=int, help="at most this many documents per task (a quick run)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="sequences per forward in --tasks")
    p.add_argument(
        "--include-path",
        default=EVALTASK,
        help="folder of extra lm-eval task YAMLs (default: tests/evaltask, the offline zebra_mc task)",
    )
    p.add_argument("--chat-template", action="store_true", help="render --tasks contexts as chat turns")
    p.add_argument("--peer", help=argparse.SUPPRESS)  # internal: time one saved peer in this process
    a = p.parse_args(argv)
    for name in ("steps", "repeats", "threads", "eval_batch_size", "limit"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer")
    gpu = a.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA build of torch and a GPU; use --device cpu")
    dtype = generate.precision_dtype(a.precision, a.device)
    contexts = a.contexts or ([1024, 4096, 8192, 16384, 32768] if gpu else [512, 2048, 8192, 16384])
    prefills = a.prefills or ([1024, 4096] if gpu else [512, 2048])
    torch.set_num_threads(a.threads)
    if a.peer:
        res = run_peer(a.peer, contexts, a.batches, prefills, a.steps, a.repeats, a.device, dtype, a.compile)
        print(json.dumps(res))
        return
    print(f"device {a.device}, dtype {dtype} (--precision {a.precision}), torch threads {a.threads}")
    report = dict(size=a.size, device=a.device, dtype=str(dtype), threads=a.threads, kv=kv_section())
    if a.tasks:
        tasks = a.tasks.split(",")
        manager = task_manager(tasks, a.include_path)
        path = a.ckpt or generate.newest_checkpoint(a.out_dir, a.size)
        model, tok, ckpt = generate.load_distilled(path, a.device, dtype)
        # the teacher the checkpoint records having been distilled from, unless --teacher says otherwise
        source = a.teacher or ckpt.get("teacher") or a.size
        teacher = load_teacher_for(model.cfg, path, source, a.device, dtype)
        report["accuracy"] = accuracy_section(
            teacher, (model, tok), tasks, a.limit, manager, a.eval_batch_size, a.chat_template
        )
    else:
        results = throughput_section(a, contexts, a.batches, prefills)
        bandwidth = read_bandwidth(device=a.device)
        report.update(decode=print_throughput(results, gpu, bandwidth), peers=results, read_bytes_s=bandwidth)
        if a.kernels:
            kernel_self_timings()
        if a.plot:
            plot(a.plot, results, contexts, max(a.batches))
    print(json.dumps(report))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")
