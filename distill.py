"""The Zebra-Llama post-training pipeline: teacher -> students -> ILD -> SMART -> hybrid -> KD -> DPO -> eval.

Stages (paper.md §1, one checkpoint file each under out/<size>/, skipped when finished, resumed when not):
  init_mla.pt, init_m2.pt   all-MLA (SVD init) and all-Mamba2 (attention-seeded) students   convert.make_student
  ild_mla.pt, ild_m2.pt     intermediate layer distillation, teacher-forced per layer        §10  ild_loss
  smart.json                which layers stay MLA (sensitivity scores, near-uniform windows) §9   smart_scores/select
  hybrid_init.pt            the hybrid composed from the two ILD students and the teacher    §1   convert.compose_hybrid
  kd.pt                     end-to-end KL(p_teacher || p_student) distillation               §11  kd_loss
  dpo_pairs.jsonl, dpo.pt   DPO against the frozen KD model                                   §12  dpo_loss
  eval.json                 held-out perplexity, KL and top-1 agreement to the teacher, KV cache per token

  python distill.py                      # 135m: SmolLM2-135M-Instruct + chitchat corpus, CPU
  python distill.py --size tiny          # random tiny teacher, every stage in about a minute
  python distill.py --size 1b --teacher /path/to/Llama-3.2-1B-Instruct
  torchrun --nproc_per_node 8 distill.py --size 8b --teacher PATH   # DDP; FSDP2 for 8b
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import convert
from generate import reply
from model import Block, Model, load_checkpoint, read_checkpoint, rope_freqs, save_checkpoint, size_config


# ----------------------------------------------------------------------------- configuration
@dataclass
class DistillConfig:
    size: str = "135m"
    teacher: str = ""  # size key or path to a Llama directory / GGUF; default: the size itself
    out_dir: str = "out"
    data: str = ""  # chat JSONL ({"messages": [...]} per line); default: the chitchat corpus
    dpo_data: str = ""  # JSONL {prompt, chosen, rejected}; default: built from teacher vs KD student replies
    cache_dir: str = ""  # downloads (teacher, corpus); default $ZEBRA_CACHE or ~/.cache/zebra
    max_chats: int = 0  # use only the first N conversations (0 = all)
    seq_len: int = 2048
    batch_size: int = 8  # sequences per optimizer step, summed over ranks
    ild_steps: int = 1000
    kd_steps: int = 4000
    dpo_steps: int = 100
    ild_lr: float = 2e-4  # paper.md §10
    kd_lr: float = 8e-5  # §11
    dpo_lr: float = 5e-7  # §12
    warmup: float = 0.01  # fraction of steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ce_weight: float = 0.0  # KD loss = KL + ce_weight * CE (the paper uses pure KL)
    dpo_beta: float = 0.01
    dpo_pairs: int = 64
    dpo_max_new: int = 64
    smart_batches: int = 4
    eval_batches: int = 8
    mla_layers: str = ""  # e.g. "0,6,12,18,24,28": skip SMART
    rope_rule: str = "2norm"  # MLA rope pairs: 2norm (calibrated) or high
    stage: str = ""  # rerun only this stage
    force: bool = False  # rerun every stage
    ckpt_every: int = 100
    log_every: int = 10
    seed: int = 42
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP (8b: a student plus the teacher exceed one GPU)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    # memory plan, micro-batching, precision (issue 10)
    kd_batch_size: int = 8  # KD sequences per optimizer step, summed over ranks (--batch-size: ILD's)
    dpo_batch_size: int = 4  # DPO preference pairs per optimizer step, summed over ranks
    dpo_warmup: float = 0.1  # DPO's warmup fraction (paper.md §12); --warmup is ILD's and KD's
    micro_batch: int = 0  # sequences (DPO: pairs) per forward and rank; 0 = chosen by the memory plan
    plan: bool = False  # print the memory plan per stage (from SIZES; no weights are loaded) and exit
    memory_gb: float = 0.0  # memory per device the plan may use (GiB); 0 = the CUDA device's, or free RAM
    world: int = 0  # processes the plan assumes (--plan on one machine for 8 GPUs); 0 = this run's
    precision: str = "auto"  # training matmuls: bf16 autocast (fp32 master weights, scan, losses) or fp32
    dry_run: bool = (
        False  # every stage once at the real shapes: random bf16 teacher, short sequences, 1-2 steps
    )


# Per-size defaults. 1b/3b/8b are the official configs (paper.md §10-§12): global batches per optimizer step
# (ILD batch_size, KD kd_batch_size sequences of 2048 tokens; DPO dpo_batch_size pairs), peak learning rates,
# warmup 0.01 (DPO 0.1) and token budgets: ILD 20 % of 6.8B tokens = 1.36B per student, KD 1 epoch of the 80 %
# (1b: 5.44B tokens) or the official max_steps (3b 37,842, 8b 72,021). The paper distils KD and DPO from
# Llama-3.1-8B-Instruct for every size (a separate KD teacher; --plan counts its memory). tiny/135m are
# CPU presets: short sequences and few steps so that every stage runs in minutes on 2 cores.
PRESETS = {
    "tiny": dict(
        seq_len=64,
        batch_size=4,
        kd_batch_size=4,
        dpo_batch_size=2,
        ild_steps=30,
        kd_steps=40,
        dpo_steps=6,
        ild_lr=2e-3,
        kd_lr=1e-3,
        dpo_lr=1e-5,
        dpo_pairs=8,
        dpo_max_new=12,
        smart_batches=2,
        eval_batches=2,
        max_chats=400,
        ckpt_every=10,
        log_every=10,
        rope_rule="high",
    ),
    "135m": dict(
        seq_len=256,
        batch_size=4,
        kd_batch_size=4,
        dpo_batch_size=2,
        ild_steps=30,
        kd_steps=80,
        dpo_steps=8,
        ild_lr=1e-3,
        kd_lr=2e-4,
        dpo_lr=2e-6,
        dpo_pairs=16,
        dpo_max_new=32,
        smart_batches=1,
        eval_batches=4,
        ckpt_every=10,
    ),
    "1b": dict(
        batch_size=96,
        ild_steps=6_917,
        ild_lr=2e-4,
        kd_batch_size=192,
        kd_steps=13_835,
        kd_lr=8e-5,
        dpo_batch_size=32,
        dpo_lr=5e-7,
    ),
    "3b": dict(
        batch_size=96,
        ild_steps=6_917,
        ild_lr=2e-4,
        kd_batch_size=96,
        kd_steps=37_842,
        kd_lr=4e-5,
        dpo_batch_size=32,
        dpo_lr=5e-7,
    ),
    "8b": dict(
        batch_size=48,
        ild_steps=13_835,
        ild_lr=1e-4,
        kd_batch_size=64,
        kd_steps=72_021,
        kd_lr=4e-5,
        dpo_batch_size=32,
        dpo_lr=5e-7,
        fsdp=True,
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    for f in fields(DistillConfig):
        kw = dict(type=(lambda s: s.lower() in ("1", "true", "yes")) if f.type is bool else f.type)
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            default=None,
            help=f"default {f.default!r} (per-size presets apply)",
            **kw,
        )
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    size = given.get("size", DistillConfig.size)
    if size not in PRESETS:
        raise ValueError(f"unknown --size {size!r}: choose one of {', '.join(PRESETS)}")
    return DistillConfig(**{**PRESETS[size], **given})


# ----------------------------------------------------------------------------- distributed
def setup_distributed(cfg):
    """(rank, world). Under torchrun: one process per device, gloo on CPU, nccl on GPU."""
    if "RANK" not in os.environ:
        return 0, 1
    dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(cfg.device)
    return dist.get_rank(), dist.get_world_size()


def wrap_model(model, cfg, world):
    """DDP for sizes that fit one device; FSDP2 (fully_shard per block, then the root) with --fsdp (8b)."""
    if world == 1:
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        return fully_shard(model)
    return torch.nn.parallel.DistributedDataParallel(model)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def full_state_dict(model):
    """The unwrapped model's full state dict; under FSDP2 every rank joins the gather, rank 0 receives it."""
    if not hasattr(model, "reshard"):  # plain or DDP
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ----------------------------------------------------------------------------- data
def read_jsonl(path, record, form):
    """The records of a JSONL file; malformed lines are reported with their line numbers (record() asserts the form)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no data file at {path}: pass a JSONL file with one {form} per line")
    rows, bad = [], []
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        try:
            rows += [record(json.loads(line))] if line.strip() else []
        except Exception:
            bad.append(n)
    if bad:
        raise ValueError(
            f"{path}: {len(bad)} malformed line(s), first at line(s) {bad[:5]}; each line must be {form}"
        )
    return rows


def chat_record(d):
    assert isinstance(d["messages"], list) and d["messages"]
    assert all(
        isinstance(m["content"], str) and m["role"] in ("system", "user", "assistant") for m in d["messages"]
    )
    return d["messages"]


PAIR_FORM = '{"prompt": ..., "chosen": ..., "rejected": ...}'


def pair_record(d):
    assert all(isinstance(d[k], str) for k in ("prompt", "chosen", "rejected"))
    return d


def prepare_data(cfg, tok, out):
    """Tokenize chats with the teacher's chat template and pack them into (N, seq_len) uint32 memmaps.
    Split by conversation: the last 5 % are held out (never trained on); of the rest the first 20 % feed
    ILD and the other 80 % KD (paper.md §13). Reused on the next run when source and tokenizer match."""
    meta_path = os.path.join(out, "data.json")
    source = cfg.data or "chitchat-dataset==0.9.0"
    key = dict(
        source=source, max_chats=cfg.max_chats, seq_len=cfg.seq_len, tokenizer=tok.name, n_vocab=tok.n_vocab
    )
    if os.path.isfile(meta_path):
        meta = json.load(open(meta_path))
        if meta["key"]["source"] == source and meta["key"] != key:
            raise ValueError(
                f"{out} holds data prepared with {meta['key']}, not {key} (another teacher vocabulary or "
                f"length); use another --out-dir or delete {meta_path}"
            )
        if meta["key"] == key:
            return meta
    chat_form = '{"messages": [{"role": ..., "content": ...}, ...]}'
    chats = (
        read_jsonl(cfg.data, chat_record, chat_form)
        if cfg.data
        else convert.chitchat_chats(cfg.cache_dir or None)
    )
    chats = chats[: cfg.max_chats] if cfg.max_chats else chats
    if not chats:
        raise ValueError(
            f"{source} holds no conversations: give a chat JSONL with one {{'messages': [...]}} per line"
        )
    n_held = max(1, len(chats) // 20)
    n_ild = (len(chats) - n_held) // 5
    splits = {"ild": chats[:n_ild], "kd": chats[n_ild:-n_held], "heldout": chats[-n_held:]}
    meta = dict(
        key=key, prompts=[c[0]["content"] for c in splits["kd"][:512] if c[0]["role"] == "user"], n={}
    )
    for name, part in splits.items():
        ids = []
        for msgs in tqdm(part, desc=f"tokenize {name}", leave=False):
            ids.extend(tok.chat(msgs, add_generation_prompt=False))
        n = len(ids) // cfg.seq_len
        if n == 0:
            raise ValueError(
                f"the {name} split has {len(ids)} tokens, fewer than one sequence of {cfg.seq_len}: "
                "give more data (--data, --max-chats) or a shorter --seq-len"
            )
        arr = np.memmap(
            os.path.join(out, f"data_{name}.bin"), dtype=np.uint32, mode="w+", shape=(n, cfg.seq_len)
        )
        arr[:] = np.asarray(ids[: n * cfg.seq_len], dtype=np.uint32).reshape(n, cfg.seq_len)
        arr.flush()
        meta["n"][name] = n
    json.dump(meta, open(meta_path + ".tmp", "w"))
    os.replace(meta_path + ".tmp", meta_path)
    return meta


def batch_rows(step, batch_size, n_rows, rank=0, world=1, micro=0, n_micro=1):
    """Positions (into a split of n_rows rows, or a list of DPO pairs) of micro-batch `micro` of `n_micro` of
    this rank's share of global step `step`. The global batch is rows step*batch_size ... +batch_size-1
    (wrapping around): rank r takes the r-th contiguous slice of batch_size // world, which is split into
    n_micro near-equal parts. The union over ranks and micro-batches is the same for every world and
    n_micro, so resuming, torchrun and an out-of-memory retry see the same global batch."""
    per_rank = batch_size // world
    part = np.array_split(np.arange(rank * per_rank, (rank + 1) * per_rank), n_micro)[micro]
    return [int((step * batch_size + j) % n_rows) for j in part]


def get_batch(out, meta, split, step, cfg, rank=0, world=1, micro=0, n_micro=1):
    """The rows batch_rows picks from a split, through a fixed shuffle of the split (seeded, so resuming
    at a step gives the same data), as a (rows, seq_len) int64 tensor on cfg.device."""
    arr = np.memmap(os.path.join(out, f"data_{split}.bin"), dtype=np.uint32, mode="r").reshape(
        -1, cfg.seq_len
    )
    order = np.random.default_rng(cfg.seed).permutation(len(arr))
    rows = batch_rows(step, stage_batch(cfg, split), len(arr), rank, world, micro, n_micro)
    return torch.from_numpy(arr[np.sort(order[rows])].astype(np.int64)).to(cfg.device)


# ----------------------------------------------------------------------------- losses
def ild_layer_losses(student, teacher, idx):
    """Teacher-forced layer losses of the official code (paper.md §10), one per layer: every student block
    gets the teacher's input to that block; per-token L2 distance (not squared) of the block outputs (the last
    one after the final norm) plus that of the mixer outputs, averaged over tokens. We follow the code rather
    than the paper's MSE: the code produced the published models."""
    with torch.no_grad():
        _, t_in, t_out, t_mix = teacher(idx, return_layers=True, logits=False)
    _, _, s_out, s_mix = student(idx, return_layers=True, layer_inputs=t_in, logits=False)
    return torch.stack([l2(so, to) + l2(sm, tm) for so, to, sm, tm in zip(s_out, t_out, s_mix, t_mix)])


def l2(a, b):
    """Per-token L2 distance (not squared) over the hidden dimension, averaged over tokens, in fp32."""
    return (a.float() - b.float()).norm(dim=-1).mean()


def ild_loss(student, teacher, idx):
    per_layer = ild_layer_losses(student, teacher, idx)
    return per_layer.sum(), dict(first=per_layer[0].item(), last=per_layer[-1].item())


def kd_loss(s_logits, t_logits, chunk=1024):
    """KL(p_T || p_S) per token at temperature 1, averaged over all positions (the official code sums per
    sequence: the same up to scale, paper.md §11). Computed over chunks of positions in fp32."""
    s, t = s_logits.flatten(0, -2), t_logits.flatten(0, -2)  # (B*T, V)
    total = 0.0
    for i in range(0, s.shape[0], chunk):
        ls, lt = F.log_softmax(s[i : i + chunk].float(), -1), F.log_softmax(t[i : i + chunk].float(), -1)
        total = total + (lt.exp() * (lt - ls)).sum()
    return total / s.shape[0]


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """Sigmoid DPO (paper.md §12): -log sigma(beta * ((pi_c - ref_c) - (pi_r - ref_r))) over sequence
    log-probs."""
    return -F.logsigmoid(beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected))).mean()


def seq_logprobs(model, idx, mask):
    """Sum of log p(token) over the positions where mask is 1 (the response), per sequence."""
    return (token_logprobs(model(idx[:, :-1]), idx[:, 1:]) * mask[:, 1:]).sum(-1)


def token_logprobs(logits, targets):
    """log p(target) per position in fp32: logits (B, T, V), targets (B, T) -> (B, T)."""
    return F.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]


# ----------------------------------------------------------------------------- SMART (paper.md §9)
def smart_select(scores, n_mla):
    """Choose n_mla layers (paper.md §9): layers 0 and L-2 forced (the published lists' terminal MLA layers), every gap
    within one of the uniform gap (L-2)/(n_mla-1) (all published lists obey this), and the largest total score among such
    sets, found by dynamic programming over (k-th chosen layer, its index). E.g. L 16, n 4: gaps 4..5, as [0, 5, 10, 14]."""
    L = len(scores)
    if not 2 <= n_mla <= L - 1:
        raise ValueError(f"SMART needs 2 <= N_MLA <= L-1 = {L - 1}, got {n_mla}")
    t = (L - 2) / (n_mla - 1)
    lo, hi = max(1, math.ceil(t) - 1), math.floor(t) + 1
    best = {(0, 0): (scores[0], [0])}  # (k, i) -> (total, layers) with the k-th MLA layer at i
    for k in range(1, n_mla):
        for i in range(1, L - 1):
            prev = [best[k - 1, j] for j in range(i - hi, i - lo + 1) if (k - 1, j) in best]
            if prev:
                total, layers = max(prev, key=lambda p: p[0])
                best[k, i] = (total + scores[i], layers + [i])
    return best[n_mla - 1, L - 2][1]


@torch.no_grad()
def smart_scores(teacher, m2, mla, batches):
    """s_i = KL(all-M2) - KL(all-M2 with layer i from the all-MLA student): how much one MLA layer helps."""
    kls = np.zeros(teacher.cfg.n_layer + 1)
    for idx in tqdm(batches, desc="SMART batches", leave=False):
        t = teacher(idx)
        kls[-1] += kd_loss(m2(idx), t).item()
        for i in range(teacher.cfg.n_layer):
            keep, m2.layers[i] = m2.layers[i], mla.layers[i]
            kls[i] += kd_loss(m2(idx), t).item()
            m2.layers[i] = keep
    return (kls[-1] - kls[:-1]) / len(batches), kls[-1] / len(batches)


# ----------------------------------------------------------------------------- training loop
def stage_batch(cfg, stage):
    """Global batch of a stage (or data split) per optimizer step: sequences (ILD, KD; SMART and evaluation
    batches are ILD-sized) or preference pairs (DPO)."""
    return {"kd": cfg.kd_batch_size, "dpo": cfg.dpo_batch_size}.get(stage, cfg.batch_size)


def accumulate(model, step_loss, step, per_rank, micro, amp, say):
    """Forward and backward of one global step, this rank's share of per_rank rows in micro-batches of at
    most `micro` rows; the micro losses are weighted by their share of rows, so the gradient is that of the
    whole share whatever the split. On torch.OutOfMemoryError the gradients are cleared, the micro-batch is
    halved (the global batch stays) and the step is redone. Returns (loss, terms, micro)."""
    while True:
        n_micro = math.ceil(per_rank / micro)
        total, terms = 0.0, {}
        try:
            for m in range(n_micro):
                # this micro-batch's share of the rank's rows, by the rule step_loss slices with
                w = len(batch_rows(step, per_rank, per_rank, 0, 1, m, n_micro)) / per_rank
                with sync_gradients(model, m == n_micro - 1):
                    with amp:
                        loss, t = step_loss(model, step, m, n_micro)
                    (loss * w).backward()
                total = total + loss.detach() * w
                terms = {k: terms.get(k, 0.0) + v * w for k, v in t.items()}
            return total, terms, micro
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # hand the failed try's blocks back before the smaller one
            if micro == 1:
                raise MemoryError(
                    f"out of memory at step {step} with one sequence per forward: use more GPUs "
                    "(torchrun, --fsdp true) or a shorter --seq-len (python distill.py --plan shows the need)"
                ) from None
            micro //= 2
            say(f"out of memory at step {step}: micro-batch halved to {micro}, the step is redone")


def sync_gradients(model, last):
    """Gradient accumulation without a collective per micro-batch: DDP and FSDP2 reduce only on the last."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    if hasattr(model, "no_sync") and not last:  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def train(stage, model, step_loss, cfg, path, steps, lr, rank, world, tok):
    """AdamW + warmup/cosine + clipping + micro-batches (+ bf16 autocast, --precision), tqdm, a log line,
    an atomic checkpoint every ckpt_every steps; rerunning after a kill resumes at the last checkpoint.
    step_loss(model, step, micro, n_micro) -> (loss, terms): micro-batch `micro` of `n_micro` of this
    rank's share of global step `step` (rows from batch_rows)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    warm = max(1, int((cfg.dpo_warmup if stage == "dpo" else cfg.warmup) * steps))

    def schedule(s):  # linear warmup, then cosine to 0
        return min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    start, history = 0, []
    if os.path.isfile(path):  # an unfinished checkpoint of this stage: resume
        ck = read_checkpoint(path, cfg.device)
        unwrap(model).load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start, history = ck["step"], ck["history"]
        torch.set_rng_state(ck["rng"])
        if rank == 0:
            tqdm.write(f"[{stage}] resuming from step {start}/{steps}")
    model.train()
    amp = torch.autocast(cfg.device.split(":")[0], dtype=torch.bfloat16, enabled=amp_dtype(cfg) is not None)
    per_rank = stage_batch(cfg, stage) // world
    # main sets cfg.micro_plan ({stage: micro-batch}, not a flag) from the memory plan
    micro = min(per_rank, cfg.micro_batch or getattr(cfg, "micro_plan", {}).get(stage) or per_rank)

    def say(msg):
        if rank == 0:
            tqdm.write(f"[{stage}] {msg}")

    bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps, disable=rank != 0)
    t0, tokens = time.time(), 0
    stop = f"stopped; the last good checkpoint {path} is kept (lower --{stage.split('_')[0]}-lr and rerun)"
    for step in bar:
        try:
            loss, terms, micro = accumulate(model, step_loss, step, per_rank, micro, amp, say)
        except ValueError as e:  # diverged weights fail the kernels' input checks (e.g. A_log overflowing)
            raise FloatingPointError(f"[{stage}] step {step}: {e}; training diverged, {stop}") from None
        if world > 1:  # log the loss of the global batch: the mean over ranks
            dist.all_reduce(loss := loss.detach().clone())
            loss /= world
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"[{stage}] loss is {loss.item()} at step {step}: {stop}")
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        history.append(round(loss.item(), 6))
        tokens += stage_batch(cfg, stage) * cfg.seq_len
        bar.set_postfix(
            loss=f"{loss.item():.4f}",
            lr=f"{sched.get_last_lr()[0]:.2e}",
            tok_s=f"{tokens / (time.time() - t0):.0f}",
        )
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            eta = (time.time() - t0) / (step + 1 - start) * (steps - step - 1)
            say(
                f"step {step + 1}/{steps} loss {loss.item():.4f} "
                + " ".join(f"{k} {v:.4f}" for k, v in terms.items())
                + f" lr {sched.get_last_lr()[0]:.2e} tok/s {tokens / (time.time() - t0):.0f} eta {eta:.0f}s"
            )
        # FSDP2 runs keep only finished stages: resuming sharded optimizer state is not implemented
        if rank == 0 and not cfg.fsdp and (step + 1) % cfg.ckpt_every == 0 and step + 1 < steps:
            save_checkpoint(
                path,
                unwrap(model),
                stage,
                step + 1,
                tok,
                optimizer=opt.state_dict(),
                scheduler=sched.state_dict(),
                history=history,
                rng=torch.get_rng_state(),
            )
    model.eval()
    sd = full_state_dict(model)
    if rank == 0:
        save_checkpoint(path, unwrap(model), stage, steps, tok, state_dict=sd, done=True, history=history)
    if world > 1:
        dist.barrier()
    return unwrap(model)


# ----------------------------------------------------------------------------- memory plan (issue 10)
GiB = 2**30
PLAN_STAGES = ("ild_mla", "ild_m2", "kd", "dpo")


def cpu_has_bf16():
    """Whether this processor multiplies bf16 natively (AVX512-BF16 or AMX), from /proc/cpuinfo."""
    if not os.path.isfile("/proc/cpuinfo"):
        return False
    flags = next((line.split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(cfg):
    """The autocast dtype of training, None for plain fp32: --precision bf16, or auto on CUDA (as the official
    runs) and on CPUs with native bf16. Under --dry-run the weights themselves are bf16: no autocast."""
    if cfg.dry_run or cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16" or cfg.device.startswith("cuda") or cpu_has_bf16():
        return torch.bfloat16
    return None


def teacher_dtype(cfg):
    """The dtype teachers are kept in: bf16 where training autocasts to bf16 (as the official runs: the
    teacher then computes in bf16 anyway, and the students' SVD init barely notices the rounding), else the
    default dtype (fp32; bf16 under --dry-run)."""
    return amp_dtype(cfg) or torch.get_default_dtype()


def block_params(cfg, kind):
    """Parameters of one block of this kind, counted on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(
            p.numel() for p in Block(dataclasses.replace(cfg, kinds=[kind] * cfg.n_layer), 0).parameters()
        )


def saved_bytes(fn, exclude):
    """Bytes of the distinct storages autograd saves for backward while fn() runs, plus those of the tensors
    fn returns (kept until the loss is formed), leaving out the storages in `exclude` (weights, inputs
    counted elsewhere)."""
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in exclude:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    for t in out:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def per_token(fn, lengths=(64, 128)):
    """(bytes per token, constant bytes) of fn(T), from its saved bytes at two lengths: the slope is the
    activation memory per token, the intercept what does not grow with T (bf16 copies of the weights that
    autocast keeps for backward)."""
    (t1, b1), (t2, b2) = [(T, fn(T)) for T in lengths]
    slope = (b2 - b1) / (t2 - t1)
    return slope, max(0.0, b1 - slope * t1)


def block_memory(cfg, kind, teacher_forced, amp):
    """(params, bytes per token, constant bytes) of one training block of this kind at the real dims,
    measured on the CPU with random weights: its forward saves what backward needs. Teacher-forced (ILD):
    the input is the teacher's (no gradient) and the loss terms of ild_layer_losses are included; chained
    (KD, DPO): the input is the previous block's output."""
    c = dataclasses.replace(cfg, kinds=[kind] * cfg.n_layer)
    block = Block(c, 0)
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def saved(T):
        x = torch.randn(1, T, cfg.d_model, requires_grad=not teacher_forced)
        ang = torch.arange(T)[None, :, None] * rope_freqs(c)  # (1, T, head_dim/2)
        target = torch.randn(1, T, cfg.d_model)

        def fn():
            with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                h, a = block(x, ang.cos(), ang.sin())
                return [l2(h, target) + l2(a, target)] if teacher_forced else [h]

        return saved_bytes(fn, weights | ({x.untyped_storage().data_ptr()} if teacher_forced else set()))

    return (sum(p.numel() for p in block.parameters()), *per_token(saved))


def loss_memory(cfg, stage, amp, t_dtype):
    """Bytes per token of the logits and the loss on them, measured like block_memory: the student's logits
    (autocast dtype) with what the loss saves, plus the teacher's logits for KD."""

    def saved(T):
        s = torch.randn(T, cfg.vocab_size, dtype=amp or torch.float32, requires_grad=True)
        if stage == "kd":
            t = torch.randn(T, cfg.vocab_size, dtype=t_dtype)
            return saved_bytes(lambda: [kd_loss(s, t), s, t], set())
        return saved_bytes(lambda: [token_logprobs(s[None], torch.zeros(1, T, dtype=torch.long)), s], set())

    return per_token(saved, (32, 64))[0]


def memory_budget(cfg):
    """Bytes one process may use: --memory-gb, else the CUDA device's total memory, else the RAM available
    now plus what this process already holds (a teacher loaded before the plan counts in the plan)."""
    if cfg.memory_gb:
        return cfg.memory_gb * GiB, f"{cfg.memory_gb:g} GiB per device (--memory-gb)"
    if cfg.device.startswith("cuda"):
        total = torch.cuda.get_device_properties(cfg.device).total_memory
        return total, f"{total / GiB:.1f} GiB on {torch.cuda.get_device_name(cfg.device)}"
    kb = {
        line.split(":")[0]: int(line.split()[1])
        for path in ("/proc/meminfo", "/proc/self/status")
        for line in open(path)
        if line.startswith(("MemAvailable:", "VmRSS:"))
    }
    free = (kb["MemAvailable"] + kb["VmRSS"]) * 1024
    return free, f"{free / GiB:.1f} GiB of RAM (available + this process)"


def memory_plan(cfg, tcfg, world, kd_tcfg=None):
    """Per training stage, the estimated peak memory per device and the micro-batch that fits in 90 % of
    the budget (the rest: allocator slack, CUDA context, transients). Static: student weights (fp32 master),
    gradients and AdamW state of the trainable ones (sharded over ranks under --fsdp), the teacher (and a
    separate KD teacher) in their dtypes, DPO's reference model; per sequence: the activations backward
    needs (block_memory) plus the teacher's kept layer outputs (ILD) or logits and loss (loss_memory).
    tcfg: the teacher's config with the hybrid fields. Returns {stage: dict of bytes and the split}."""
    amp, budget = amp_dtype(cfg), memory_budget(cfg)[0]
    t_dtype, master = teacher_dtype(cfg), torch.get_default_dtype().itemsize  # master: fp32 (dry run bf16)
    t_bytes = t_dtype.itemsize

    def embed(c):  # embeddings, the untied head, the final norm
        return c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2) + c.d_model

    shard = world if cfg.fsdp else 1
    blocks = {k: block_memory(tcfg, k, False, amp) for k in ("mla", "m2")}
    ild = {k: block_memory(tcfg, k, True, amp) for k in ("mla", "m2")}
    teacher = (embed(tcfg) + tcfg.n_layer * block_params(tcfg, "attn")) * t_bytes
    kd_teacher = 0 if kd_tcfg is None else (embed(kd_tcfg) + kd_tcfg.n_layer * block_params(kd_tcfg, "attn"))
    kd_teacher *= t_bytes
    hybrid = ["mla" if i in tcfg.mla_layers else "m2" for i in range(tcfg.n_layer)]
    plan = {}
    for stage in PLAN_STAGES:
        if stage.startswith("ild"):
            n, tok, const = ild[stage[4:]]
            params, trainable = embed(tcfg) + tcfg.n_layer * n, tcfg.n_layer * n + tcfg.d_model
            act, const = tcfg.n_layer * tok, tcfg.n_layer * const
            logits = 2 * tcfg.n_layer * tcfg.d_model * t_bytes  # the teacher's block inputs and mixer outputs
            transient = tok  # backward of one teacher-forced layer: its temporaries, about its saved size
        else:
            n, tok, const = (sum(v) for v in zip(*(blocks[k] for k in hybrid)))
            params = trainable = embed(tcfg) + n
            act = tok + 2 * tcfg.d_model * 4  # + the final norm's input and the head's (fp32 bound)
            logits = loss_memory(tcfg, stage, amp, t_dtype)
            # backward starts with the fp32 gradient of the logits, then one layer's temporaries at a time
            transient = max(blocks[k][1] for k in hybrid) + tcfg.vocab_size * 4
        seq = cfg.seq_len * (2 if stage == "dpo" else 1)  # a DPO pair: chosen and rejected, <= seq_len each
        row = dict(
            weights=params * master / shard,
            grads=trainable * master / shard,
            optimizer=trainable * 2 * master / shard,
            teacher=teacher,
            kd_teacher=kd_teacher if stage in ("kd", "dpo") else 0,
            reference=params * master if stage == "dpo" else 0,
            casts=const,
            act_token=act,
            logits_token=logits,
            transient_token=transient,
        )
        static = sum(row[k] for k in ("weights", "grads", "optimizer", "teacher", "kd_teacher", "reference"))
        static += const
        row["per_seq"] = seq * (act + logits + transient)
        per_rank = stage_batch(cfg, stage) // world
        fit = int((0.9 * budget - static) // row["per_seq"])
        micro = min(per_rank, cfg.micro_batch or max(1, fit))
        n_micro = math.ceil(per_rank / micro)
        micro = math.ceil(per_rank / n_micro)
        row.update(
            micro=micro, n_micro=n_micro, fits=fit >= 1, peak=static + micro * row["per_seq"], budget=budget
        )
        plan[stage] = row
    return plan


def dtype_name(dtype):
    return {None: "off", torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def print_plan(cfg, plan, world):
    """The plan as a table, one row per stage, GiB per device (per token: KiB)."""
    print(
        f"memory plan: --size {cfg.size}, {world} process(es){' (FSDP2)' if cfg.fsdp else ''}, "
        f"budget {memory_budget(cfg)[1]}, seq_len {cfg.seq_len}, autocast {dtype_name(amp_dtype(cfg))}, "
        f"weights {dtype_name(torch.get_default_dtype())}, teacher {dtype_name(teacher_dtype(cfg))}"
    )
    cols = ("weights", "grads", "optimizer", "teacher", "kd_teacher", "reference", "casts")
    head = " ".join(f"{c:>10}" for c in cols)
    print(f"{'stage':<8}{head}{'act/tok':>9}{'lgt/tok':>9}{'per seq':>9}{'peak':>8}  micro x accum x ranks")
    for stage, r in plan.items():
        gib = " ".join(f"{r[c] / GiB:>10.2f}" for c in cols)
        split = f"{r['micro']} x {r['n_micro']} x {world} = {stage_batch(cfg, stage)}"
        print(
            f"{stage:<8}{gib}{r['act_token'] / 1024:>9.1f}{r['logits_token'] / 1024:>9.1f}"
            f"{r['per_seq'] / GiB:>9.2f}{r['peak'] / GiB:>8.2f}  {split}"
            + ("" if r["fits"] else "  DOES NOT FIT: one sequence exceeds the budget")
        )
    print("GiB per device; act/tok and lgt/tok in KiB per token (ILD: the teacher's kept layer outputs)")


# the --dry-run settings: the size's real shapes, everything else as small as a CPU allows
DRY_RUN = dict(
    seq_len=64,
    batch_size=2,
    kd_batch_size=2,
    dpo_batch_size=1,
    ild_steps=2,
    kd_steps=2,
    dpo_steps=1,
    dpo_pairs=2,
    dpo_max_new=4,
    smart_batches=1,
    eval_batches=1,
    max_chats=300,
    log_every=1,
)


def configure_run(cfg):
    """main's first hook: checks this section's flags; --dry-run applies DRY_RUN, keeps every weight in bf16
    (a 1b student's fp32 weights and AdamW state alone take ~17 GB, and evaluation holds five models) and
    writes under <out-dir>/dry-run; --plan prints the plan from SIZES and returns True (main exits)."""
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"--precision {cfg.precision!r}: choose auto, fp32 or bf16")
    if cfg.micro_batch < 0 or cfg.memory_gb < 0 or cfg.world < 0:
        raise ValueError("--micro-batch, --memory-gb and --world must be >= 0 (0 = chosen automatically)")
    if cfg.dry_run:
        for k, v in DRY_RUN.items():
            setattr(cfg, k, v)
        cfg.out_dir = os.path.join(cfg.out_dir, "dry-run")
        torch.set_default_dtype(torch.bfloat16)
    if not cfg.plan:
        return False
    tcfg = convert.with_hybrid_fields(
        size_config(cfg.size),
        cfg.size,
        [int(i) for i in cfg.mla_layers.split(",")] if cfg.mla_layers else None,
    )
    world = cfg.world or int(os.environ.get("WORLD_SIZE", 1))
    kd = getattr(cfg, "kd_teacher", "")  # --kd-teacher (issue 11): counted when given as a size key
    print_plan(cfg, memory_plan(cfg, tcfg, world, size_config(kd) if kd in PRESETS else None), world)
    if kd and kd not in PRESETS:
        print(f"the KD teacher {kd} is not counted: give its size (e.g. --kd-teacher 8b) to --plan")
    return True


def random_teacher(cfg):
    """--dry-run without --teacher: a random Llama of the size (default dtype), the byte-level tokenizer."""
    torch.manual_seed(cfg.seed)
    model = Model(size_config(cfg.size))
    torch.nn.init.normal_(model.embed_tokens.weight, std=0.1)  # small (tied) embeddings keep logits sane
    return model.eval(), convert.Tokenizer.byte_level()


def plan_micro_batches(cfg, tcfg, world, rank, kd_tcfg=None):
    """main's second hook, once the teacher is loaded: the plan's micro-batch per stage (printed by rank 0);
    a global batch that does not split evenly over the ranks, or a stage whose single sequence does not
    fit, is an error before any work (the latter unless --micro-batch is given)."""
    for stage, flag in (("ild", "--batch-size"), ("kd", "--kd-batch-size"), ("dpo", "--dpo-batch-size")):
        if stage_batch(cfg, stage) % world:
            raise ValueError(
                f"{flag} {stage_batch(cfg, stage)} is not a multiple of the {world} processes: every rank "
                "takes an equal share of the global batch"
            )
    plan = memory_plan(cfg, tcfg, world, kd_tcfg)
    if rank == 0:
        print_plan(cfg, plan, world)
    tight = [s for s, r in plan.items() if not r["fits"]]
    if tight and not cfg.micro_batch:
        r = plan[tight[0]]
        raise ValueError(
            f"stage {tight[0]} needs ~{(r['peak'] / GiB):.1f} GiB per device for one sequence of "
            f"{cfg.seq_len} tokens, more than the {r['budget'] / GiB:.1f} GiB budget: use more GPUs "
            "(torchrun, --fsdp true), a shorter --seq-len, or --micro-batch 1 to try anyway"
        )
    return {s: r["micro"] for s, r in plan.items()}


# ----------------------------------------------------------------------------- DPO pairs and evaluation
def build_dpo_pairs(teacher, student, tok, prompts, cfg):
    """Default preference pairs (paper.md §12 [project]): chosen = the teacher's greedy reply, rejected = the
    student's own reply before DPO, for prompts from the training split."""
    pairs = []
    for i in tqdm(range(0, len(prompts), 8), desc="DPO pairs", leave=False):
        ids = [tok.chat([{"role": "user", "content": p}]) for p in prompts[i : i + 8]]
        chosen = reply(teacher, tok, ids, max_new_tokens=cfg.dpo_max_new)
        rejected = reply(student, tok, ids, max_new_tokens=cfg.dpo_max_new)
        pairs += [
            dict(prompt=p, chosen=c, rejected=r) for p, c, r in zip(prompts[i : i + 8], chosen, rejected)
        ]
    return pairs


def pair_batch(tok, pairs, device):
    """Prompt (chat template) + response + end-of-turn, right-padded -> (idx, response mask) for chosen then rejected."""
    seqs, masks = [], []
    for key in ("chosen", "rejected"):
        for d in pairs:
            p, r = tok.chat([{"role": "user", "content": d["prompt"]}]), tok.encode(d[key]) + [tok.eos_id]
            seqs.append(p + r)
            masks.append([0] * len(p) + [1] * len(r))
    T = max(map(len, seqs))
    idx = torch.tensor([s + [tok.eos_id] * (T - len(s)) for s in seqs], device=device)
    mask = torch.tensor([m + [0] * (T - len(m)) for m in masks], device=device, dtype=torch.float32)
    return idx, mask


@torch.no_grad()
def evaluate(models, teacher, batches):
    """Per model: held-out perplexity, KL(p_T || p_S) per token, top-1 agreement with the teacher, KV cache."""
    acc = {name: np.zeros(3) for name in models}
    for idx in tqdm(batches, desc="evaluate", leave=False):
        t = teacher(idx)
        for name, m in models.items():
            s = t if m is teacher else m(idx)
            ce = F.cross_entropy(s[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten())
            agree = (s.argmax(-1) == t.argmax(-1)).float().mean()
            acc[name] += [ce.item(), kd_loss(s, t).item(), agree.item()]
    t_kv = teacher.cfg.kv_bytes_per_token()
    row = lambda m, ce, kl, agree: dict(
        ppl=math.exp(ce),
        kl=kl,
        top1=agree,
        kv_bytes_per_token_bf16=m.cfg.kv_bytes_per_token(),
        kv_pct=100 * m.cfg.kv_bytes_per_token() / t_kv,
        params=m.num_params(),
    )
    return {name: row(m, *(acc[name] / len(batches))) for name, m in models.items()}


def print_table(rows):
    print(f"{'model':<22}{'ppl':>9}{'KL to T':>10}{'top-1':>8}{'KV B/tok':>10}{'KV %':>8}{'params':>13}")
    for name, r in rows.items():
        print(
            f"{name:<22}{r['ppl']:>9.2f}{r['kl']:>10.4f}{r['top1']:>8.3f}{r['kv_bytes_per_token_bf16']:>10}"
            f"{r['kv_pct']:>7.2f}%{r['params']:>13,}"
        )


# ----------------------------------------------------------------------------- the stage runner
def main(argv=None):
    cfg = parse_args(argv)
    if configure_run(cfg):  # memory plan, micro-batching, precision, dry run (issue 10): --plan exits here
        return
    rank, world = setup_distributed(cfg)
    torch.manual_seed(cfg.seed)
    out = os.path.join(cfg.out_dir, cfg.size)
    os.makedirs(out, exist_ok=True)
    if cfg.batch_size % world:
        raise ValueError(
            f"--batch-size {cfg.batch_size} must be a multiple of the number of processes {world}"
        )
    stages = ["init", "ild_mla", "ild_m2", "smart", "hybrid_init", "kd", "dpo", "eval"]
    if cfg.stage and cfg.stage not in stages:
        raise ValueError(f"unknown --stage {cfg.stage!r}: choose one of {', '.join(stages)}")
    if cfg.dpo_data and not read_jsonl(
        cfg.dpo_data, pair_record, PAIR_FORM
    ):  # checked now, not after hours of KD
        raise ValueError(f"{cfg.dpo_data} holds no DPO pairs: give one {PAIR_FORM} per line")
    if cfg.dry_run and not cfg.teacher:  # issue 10: random weights at the real shapes
        teacher, tok = random_teacher(cfg)
    else:
        teacher, tok = convert.load_teacher(cfg.teacher or cfg.size, cfg.cache_dir or None)
    teacher.cfg = convert.with_hybrid_fields(
        teacher.cfg, cfg.size, [int(i) for i in cfg.mla_layers.split(",")] if cfg.mla_layers else None
    )
    teacher = teacher.to(cfg.device, teacher_dtype(cfg)).eval().requires_grad_(False)
    cfg.micro_plan = plan_micro_batches(cfg, teacher.cfg, world, rank)  # issue 10 (+ the KD teacher's cfg)
    meta = prepare_data(cfg, tok, out) if rank == 0 else None
    if world > 1:
        holder = [meta]
        dist.broadcast_object_list(holder)
        meta = holder[0]
    path = lambda name: os.path.join(out, name)
    sync = dist.barrier if world > 1 else lambda: None  # ranks wait for rank 0's files

    def todo(stage, file):  # run a stage when asked to, or when its file is missing or unfinished
        if cfg.force or cfg.stage == stage:
            if os.path.isfile(path(file)) and rank == 0:
                os.remove(path(file))
            sync()
            return True
        if cfg.stage or not os.path.isfile(path(file)):
            return not cfg.stage
        return not file.endswith(".json") and not torch.load(path(file), weights_only=True, mmap=True).get(
            "done"
        )

    heldout = lambda n: [get_batch(out, meta, "heldout", i, cfg) for i in range(min(n, meta["n"]["heldout"]))]
    load = lambda name: load_checkpoint(path(name), cfg.device)[0].eval()

    # 1. the two students, initialised from the teacher's weights (paper.md §4, §6)
    if todo("init", "init_m2.pt"):
        calib = get_batch(
            out, meta, "ild", 0, cfg
        )  # held-in tokens to choose the MLA rope pairs (paper.md §3.4)
        for kind in ("mla", "m2"):
            student = convert.make_student(teacher, kind, cfg.rope_rule, calib)
            if rank == 0:
                save_checkpoint(path(f"init_{kind}.pt"), student, "init_" + kind, 0, tok, done=True)
    sync()

    # 2. ILD of each student against the teacher, on the ILD split (paper.md §10)
    for kind in ("mla", "m2"):
        if todo(f"ild_{kind}", f"ild_{kind}.pt"):
            student = load(f"init_{kind}.pt").train()
            student.embed_tokens.requires_grad_(False)  # embeddings and head get no gradient in ILD
            student.lm_head.requires_grad_(False)
            model = wrap_model(student, cfg, world)

            def step_loss(m, s, mi, n):
                return ild_loss(m, teacher, get_batch(out, meta, "ild", s, cfg, rank, world, mi, n))

            train(
                f"ild_{kind}",
                model,
                step_loss,
                cfg,
                path(f"ild_{kind}.pt"),
                cfg.ild_steps,
                cfg.ild_lr,
                rank,
                world,
                tok,
            )

    # 3. SMART: which layers stay MLA (paper.md §9); --mla-layers overrides
    if todo("smart", "smart.json"):
        if cfg.mla_layers:
            res = dict(rule="given by --mla-layers", chosen=teacher.cfg.mla_layers)
        else:
            m2, mla = load("ild_m2.pt"), load("ild_mla.pt")
            scores, base_kl = smart_scores(teacher, m2, mla, heldout(cfg.smart_batches))
            n = len(teacher.cfg.mla_layers)
            res = dict(
                rule="layers 0 and L-2 forced, every gap within 1 of uniform, maximal total score",
                kl_all_m2=base_kl,
                scores=scores.tolist(),
                chosen=smart_select(scores, n),
            )
        if rank == 0:
            json.dump(res, open(path("smart.json"), "w"), indent=1)
            print(f"SMART: MLA layers {res['chosen']}")
    sync()

    def chosen():  # the MLA layers picked by SMART
        if not os.path.isfile(path("smart.json")):
            raise ValueError(
                f"{path('smart.json')} is missing: run the smart stage first (python distill.py --stage smart)"
            )
        return json.load(open(path("smart.json")))["chosen"]

    # 4. compose the hybrid from the ILD students and the teacher (paper.md §1 step 4)
    if todo("hybrid_init", "hybrid_init.pt") and rank == 0:
        hybrid = convert.compose_hybrid(teacher, load("ild_mla.pt"), load("ild_m2.pt"), chosen())
        save_checkpoint(path("hybrid_init.pt"), hybrid, "hybrid_init", 0, tok, done=True)
    sync()

    # 5. end-to-end KL distillation on the KD split (paper.md §11)
    if todo("kd", "kd.pt"):
        student = load("hybrid_init.pt")  # train() resumes from an unfinished kd.pt itself

        def kd_step(m, s, mi, n):
            idx = get_batch(out, meta, "kd", s, cfg, rank, world, mi, n)
            with torch.no_grad():
                t = teacher(idx)
            logits = m(idx)
            kl = kd_loss(logits, t)
            ce = (
                F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten())
                if cfg.ce_weight
                else 0.0
            )
            return kl + cfg.ce_weight * ce, dict(kl=kl.item())

        train(
            "kd",
            wrap_model(student.train(), cfg, world),
            kd_step,
            cfg,
            path("kd.pt"),
            cfg.kd_steps,
            cfg.kd_lr,
            rank,
            world,
            tok,
        )

    # 6. DPO against the frozen KD model (paper.md §12)
    if todo("dpo", "dpo.pt"):
        ref = load("kd.pt")
        if cfg.dpo_data:
            pairs = read_jsonl(cfg.dpo_data, pair_record, PAIR_FORM)
        else:
            if not os.path.isfile(path("dpo_pairs.jsonl")):
                pairs = build_dpo_pairs(teacher, ref, tok, meta["prompts"][: cfg.dpo_pairs], cfg)
                if rank == 0:
                    with open(path("dpo_pairs.jsonl.tmp"), "w") as f:
                        f.writelines(json.dumps(p) + "\n" for p in pairs)
                    os.replace(path("dpo_pairs.jsonl.tmp"), path("dpo_pairs.jsonl"))
            sync()
            pairs = read_jsonl(path("dpo_pairs.jsonl"), pair_record, PAIR_FORM)
        idx, mask = pair_batch(tok, pairs, cfg.device)
        with torch.no_grad():
            ref_lp = seq_logprobs(ref, idx, mask)
        n = len(pairs)

        def dpo_step(m, s, mi, n_micro):
            sel = batch_rows(s, stage_batch(cfg, "dpo"), n, rank, world, mi, n_micro)
            rows = torch.tensor(sel + [n + i for i in sel], device=idx.device)
            lp = seq_logprobs(m, idx[rows], mask[rows])
            k = len(sel)
            loss = dpo_loss(lp[:k], lp[k:], ref_lp[rows][:k], ref_lp[rows][k:], cfg.dpo_beta)
            return loss, dict(
                margin=((lp[:k] - ref_lp[rows][:k]) - (lp[k:] - ref_lp[rows][k:])).mean().item()
            )

        train(
            "dpo",
            wrap_model(load("kd.pt").train(), cfg, world),
            dpo_step,
            cfg,
            path("dpo.pt"),
            cfg.dpo_steps,
            cfg.dpo_lr,
            rank,
            world,
            tok,
        )

    # 7. evaluation on the held-out split
    if rank == 0 and todo("eval", "eval.json"):
        fresh = convert.compose_hybrid(teacher, load("init_mla.pt"), load("init_m2.pt"), chosen())
        models = {
            "teacher": teacher,
            "hybrid (no training)": fresh,
            "hybrid after ILD": load("hybrid_init.pt"),
            "after KD": load("kd.pt"),
            "after DPO": load("dpo.pt"),
        }
        rows = evaluate(models, teacher, heldout(cfg.eval_batches))
        json.dump(
            dict(size=cfg.size, mla_layers=chosen(), config=asdict(cfg), results=rows),
            open(path("eval.json"), "w"),
            indent=1,
        )
    if rank == 0 and os.path.isfile(path("eval.json")):
        print_table(json.load(open(path("eval.json")))["results"])
        print(f"checkpoints and eval.json in {out}; chat with: python generate.py --ckpt {path('dpo.pt')}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError, OSError, MemoryError) as e:
        sys.exit(f"error: {e}")
