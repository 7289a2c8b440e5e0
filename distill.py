"""Zebra-Llama post-training (arXiv 2505.17272 §3): a pre-trained Llama becomes a hybrid of Mamba2 layers and
a few MLA layers, seeded from its own weights and distilled from it. The stages, in the paper's order (files
under out/<size>/):
  init         init_mla.pt, init_m2.pt  the all-MLA (SVD) and all-Mamba2 (Q/K/V/O) students (convert.py)
  ild_mla/m2   ild_mla.pt, ild_m2.pt    intermediate layer distillation, each layer teacher-forced (§3)
  smart        smart.json               which layers stay MLA: sensitivity scores, near-uniform gaps (§3)
  hybrid_init  hybrid_init.pt           the hybrid composed from the two students
  kd, dpo      kd.pt, dpo.pt            end-to-end KL distillation, then DPO (§3)
  eval         eval.json                perplexity, KL and top-1 agreement with the teacher, KV cache
Read top-down: the settings, the three losses, SMART, the training loop, the stages, main; then the
machinery (data, files and ranks, which stages rerun, the memory plan).

  python distill.py                      # 135m: SmolLM2-135M-Instruct + the chitchat corpus, on a CPU
  python distill.py --size tiny          # a random tiny teacher, every stage in seconds
  python distill.py --size 1b --teacher /path/to/Llama-3.2-1B-Instruct
  python distill.py --size 1b --plan --memory-gb 80 --precision bf16   # memory per stage on an 80 GB GPU
  torchrun --nproc_per_node 8 distill.py --size 8b --teacher PATH       # FSDP2
"""

import argparse
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import inspect
import io
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
import weakref
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Literal, get_args, get_origin

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

import convert
from generate import reply, reply_ids
from model import (
    SIZES,
    Model,
    atomic_write,
    cpu_has_bf16,
    load_checkpoint,
    read_checkpoint,
    read_json,
    save_checkpoint,
    size_config,
    weights_digest,
    write_json,
)


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class DistillConfig:
    """Every knob, one line each: the comment is its --help. A size's PRESETS row gives its defaults."""

    size: Literal[tuple(SIZES)] = "135m"  # tiny (random teacher), 135m (SmolLM2), 1b/3b/8b (--teacher)
    teacher: str = ""  # the Llama to convert: a size, an HF or Meta folder or a .gguf ('' = --size)
    kd_teacher: str = ""  # teacher of KD, DPO pairs, teacher replies and eval, as --teacher ('' = it)
    data: str = ""  # chat JSONL, one {"messages": [{"role", "content"}, ...]} a line ('' = chitchat)
    dpo_data: str = ""  # DPO JSONL, one {"prompt", "chosen", "rejected"} a line ('' = teacher vs KD replies)
    max_chats: int = 0  # use the first N conversations only (0 = all)
    teacher_replies: int = 0  # chats of the teacher's own replies, read by 1 in 3 ILD/KD steps (MIX)
    teacher_text: int = 0  # texts the teacher writes after prose openings, read by 3 in 5 steps (MIX)
    seq_len: int = 2048  # tokens per training sequence, at most the teacher's context
    batch_size: int = 8  # ILD (and SMART, eval) sequences per optimizer step, summed over ranks
    kd_batch_size: int = 8  # KD sequences per optimizer step, summed over ranks
    dpo_batch_size: int = 32  # DPO preference pairs per optimizer step
    ild_steps: int = 1000  # optimizer steps of each ILD run
    ild_mla_steps: int = 0  # steps of the all-MLA student's ILD, if fewer suffice (0 = ild_steps)
    kd_steps: int = 4000  # optimizer steps of KD
    dpo_steps: int = 100  # optimizer steps of DPO
    ild_lr: float = 2e-4  # peak learning rate of ILD
    kd_lr: float = 8e-5  # peak learning rate of KD
    dpo_lr: float = 5e-7  # peak learning rate of DPO
    warmup: float = 0.01  # fraction of ILD's and KD's steps warming up the learning rate
    dpo_warmup: float = 0.1  # fraction of DPO's steps warming up
    weight_decay: float = 0.0  # AdamW weight decay
    scalar_lr: float = 1.0  # lr multiplier of Mamba2's A_log, dt_bias, D, norm (1 = the official code)
    grad_clip: float = 1.0  # clip the gradient norm to this
    ce_weight: float = 0.0  # KD loss = KL + CE_WEIGHT * cross-entropy (the paper: pure KL)
    dpo_beta: float = 0.01  # DPO's beta (the official configs/dpo.yaml)
    dpo_pairs: int = 64  # default DPO pairs built from corpus prompts (0 = no DPO)
    dpo_max_new: int = 64  # reply tokens at most in a built DPO pair
    smart_batches: int = 4  # batches of the ILD split SMART scores the layers on
    eval_batches: int = 8  # held-out batches of the evaluation
    mla_layers: str = ""  # comma-separated MLA layers, e.g. 0,6,12,18,24,28 ('' = chosen by SMART)
    rope_rule: Literal["2norm", "high"] = "2norm"  # MLA rope pairs: calibrated on tokens, or the fastest
    ild_target: Literal["block", "mixer"] = "block"  # ILD matches block+mixer outputs, or mixers alone
    kd_train: Literal["all", "mixers"] = "all"  # what KD trains: all (the official code) or the mixers
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA and bf16 CPUs
    seed: int = 42  # seed of the data order and initialisation
    dry_run: bool = False  # every stage once at the size's real shapes: short sequences, 1-2 steps
    # settings that change no result (NEUTRAL): where files go, what to print, how to split the work
    out_dir: str = "out"  # data and checkpoints go to OUT_DIR/SIZE
    cache_dir: str = ""  # downloads: teacher, corpus ('' = $ZEBRA_CACHE or ~/.cache/zebra)
    stage: str = ""  # rerun this stage (and what is missing or stale before it), then stop
    force: bool = False  # rerun every stage
    ckpt_every: int = 100  # steps between resumable checkpoints
    log_every: int = 10  # steps between log lines
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # cpu, cuda or cuda:N
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP (8b)
    micro_batch: int = 0  # rows (DPO: pairs) per forward and rank (0 = the memory plan's)
    plan: bool = False  # print every stage's simulated memory at the real shapes and exit
    memory_gb: float = 0.0  # GiB per device the plan may use; runs the plan on a CPU (0 = the device's)
    world: int = 0  # processes the plan assumes, e.g. 8 to plan 8 GPUs from one machine (0 = this run's)

    def __post_init__(self):  # every value checked before any download or data preparation
        for f in fields(self):
            v, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if get_origin(f.type) is Literal and v not in get_args(f.type):
                raise ValueError(f"{flag} must be one of {', '.join(get_args(f.type))}, got {v!r}")
            rule = "in [0, 1]" if "warmup" in f.name else "at least 0" if f.name in AT_LEAST_0 else "positive"
            if f.type in (int, float) and not (math.isfinite(v) and RULES[rule](v)):
                raise ValueError(f"{flag} must be {rule}, got {v}")
        if self.stage and self.stage not in [s.name for s in STAGES]:
            raise ValueError(
                f"unknown --stage {self.stage!r}: choose one of {', '.join(s.name for s in STAGES)}"
            )
        if not re.fullmatch(r"(\d+(,\d+)*)?", self.mla_layers):
            raise ValueError(f"--mla-layers must be layer indices like 0,6,12, got {self.mla_layers!r}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device {self.device!r} is not a device: use cpu, cuda or cuda:N")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"--device {self.device}: this torch ({torch.__version__}) sees no GPU; use --device cpu"
            )


RULES = {"positive": lambda v: v > 0, "at least 0": lambda v: v >= 0, "in [0, 1]": lambda v: 0 <= v <= 1}
AT_LEAST_0 = {"max_chats", "teacher_replies", "teacher_text", "ild_mla_steps", "weight_decay", "ce_weight"}
AT_LEAST_0 |= {"dpo_pairs", "seed", "micro_batch", "memory_gb", "world"}
NEUTRAL = {"out_dir", "cache_dir", "stage", "force", "ckpt_every", "log_every", "device", "fsdp"}
NEUTRAL |= {"micro_batch", "plan", "memory_gb", "world"}


# Per-size defaults. 1b/3b/8b are the official configs (configs/*/zebra_*.yaml and configs/dpo.yaml of
# https://github.com/AMD-AGI/AMD-Hybrid-Models): global batches of 2048-token sequences (DPO: pairs), peak
# learning rates and token budgets: ILD 20 % of 6.8B tokens = 1.36B per student, KD one epoch of the other
# 80 % (1b: 5.44B tokens) or the official max_steps (3b 37,842, 8b 72,021). tiny and 135m are CPU presets:
# tiny runs every stage in about a minute, 135m in about 30 minutes on 2 idle cores.
OFFICIAL = ("batch_size", "ild_steps", "ild_lr", "kd_batch_size", "kd_steps", "kd_lr")
PRESETS = {
    "tiny": (
        dict(seq_len=64, max_chats=400, teacher_replies=16, teacher_text=8)
        | dict(batch_size=4, kd_batch_size=4, dpo_batch_size=2)
        | dict(ild_steps=30, kd_steps=5, dpo_steps=6, ild_lr=2e-3, kd_lr=1e-3, dpo_lr=1e-5)
        | dict(dpo_pairs=8, dpo_max_new=12, smart_batches=2, eval_batches=2, ckpt_every=10)
        | dict(rope_rule="high", ild_target="mixer", scalar_lr=10.0)
    ),
    "135m": (
        dict(seq_len=256, teacher_replies=320, teacher_text=384)
        | dict(batch_size=4, kd_batch_size=4, dpo_batch_size=2)
        | dict(ild_steps=250, ild_mla_steps=90, kd_steps=110, dpo_steps=8)
        | dict(ild_lr=2e-3, kd_lr=5e-4, dpo_lr=2e-6)
        | dict(dpo_pairs=16, dpo_max_new=32, smart_batches=1, eval_batches=3, ckpt_every=10)
        | dict(rope_rule="2norm", ild_target="mixer", kd_train="mixers", scalar_lr=10.0)
    ),
    "1b": dict(zip(OFFICIAL, (96, 6_917, 2e-4, 192, 13_835, 8e-5))),
    "3b": dict(zip(OFFICIAL, (96, 6_917, 2e-4, 96, 37_842, 4e-5))),
    "8b": dict(zip(OFFICIAL, (48, 13_835, 1e-4, 64, 72_021, 4e-5)), fsdp=True),
}
# --dry-run: the size's real shapes, everything else as small as a CPU allows, under OUT_DIR/dry-run
DRY_RUN = (
    dict(seq_len=64, batch_size=2, kd_batch_size=2, dpo_batch_size=1, max_chats=300)
    | dict(ild_steps=2, ild_mla_steps=0, kd_steps=2, dpo_steps=1, dpo_pairs=2, dpo_max_new=4)
    | dict(smart_batches=1, eval_batches=1, log_every=1)
)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one `error: ...` line and exit 1 through main's handler, not a usage dump
        raise ValueError(f"{message} (see --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass  # --help shows each default and keeps the stage table's lines


def parse_args(argv=None):
    """DistillConfig from the command line, one flag per field: the chosen size's PRESETS are the defaults
    (--help shows them), the field's comment is its help. --dry-run applies DRY_RUN on top."""
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--size", default=DistillConfig.size, choices=list(SIZES))
    size = pre.parse_known_args(argv)[0].size
    defaults = asdict(DistillConfig()) | PRESETS[size] | dict(size=size)
    helps = dict(re.findall(r"^    (\w+): .+?  # (.+)$", inspect.getsource(DistillConfig), re.M))
    stages = "\n".join(f"  {s.name:<12} {', '.join(s.files):<24} {s.doc}" for s in STAGES)
    p = ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
        epilog=f"stages, in order (files under OUT_DIR/SIZE):\n{stages}",
    )
    for f in fields(DistillConfig):
        choices = get_args(f.type) if get_origin(f.type) is Literal else None
        kw = dict(type=str, choices=choices) if choices else dict(type=f.type)
        kw = dict(action=argparse.BooleanOptionalAction) if f.type is bool else kw
        p.add_argument("--" + f.name.replace("_", "-"), default=defaults[f.name], help=helps[f.name], **kw)
    args = vars(p.parse_args(argv))
    if args["dry_run"]:
        args |= DRY_RUN | dict(out_dir=os.path.join(args["out_dir"], "dry-run"))
    return DistillConfig(**args)


# ----------------------------------------------------------------------------- the losses
def ild_layer_losses(student, teacher, idx, target="block"):
    """Intermediate layer distillation (ILD, §3), one loss per layer: student block i is fed the teacher's
    input to block i (teacher forcing), so every layer learns at once and none waits for the ones below.
    target "block", the official code (trainer/kd_trainer.py): L_i = d(block outputs) + d(mixer outputs),
    d the per-token L2 distance (not squared) averaged over tokens (the last block's output after the final
    norm); the code, not the paper's MSE, produced the published models. target "mixer" (MOHAWK's stage 2,
    arXiv 2408.10189, [project]) scores the mixer alone on the teacher's normed input: the MLPs are the
    teacher's own and stay frozen, so a step runs no MLP at all."""
    with torch.no_grad():
        _, t_in, t_out, t_mix = teacher(idx, return_layers=True, logits=False)
    if target == "mixer":
        s_mix = student(idx, layer_inputs=t_in, mixers_only=True)
        return torch.stack([l2(sm, tm) for sm, tm in zip(s_mix, t_mix)])
    _, _, s_out, s_mix = student(idx, return_layers=True, layer_inputs=t_in, logits=False)
    return torch.stack([l2(so, to) + l2(sm, tm) for so, to, sm, tm in zip(s_out, t_out, s_mix, t_mix)])


def l2(a, b):
    """Per-token L2 distance (not squared) over the hidden dimension, averaged over tokens, in fp32."""
    return (a.float() - b.float()).norm(dim=-1).mean()


def kd_loss(s_logits, t_logits, chunk=1024):
    """End-to-end distillation (§3): KL(p_T || p_S) per token at temperature 1, averaged over all positions
    (the official code sums per sequence: the same up to scale). In fp32, over chunks of positions, so that
    only a chunk's (chunk, V) probabilities are alive at once."""
    s, t = s_logits.flatten(0, -2), t_logits.flatten(0, -2)  # (B*T, V)
    total = 0.0
    for i in range(0, s.shape[0], chunk):
        ls, lt = F.log_softmax(s[i : i + chunk].float(), -1), F.log_softmax(t[i : i + chunk].float(), -1)
        total = total + (lt.exp() * (lt - ls)).sum()
    return total / s.shape[0]


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    """Sigmoid DPO (Rafailov et al. 2023, as the official train_hybrid/train_dpo.py), on sequence log-probs:
    -log sigma(beta * ((pi_c - ref_c) - (pi_r - ref_r))); log 2 while the policy is the reference."""
    return -F.logsigmoid(beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected))).mean()


def seq_logprobs(model, idx, mask):
    """Sum of log p(token) over the positions where mask is 1 (the response), per sequence."""
    return (token_logprobs(model(idx[:, :-1]), idx[:, 1:]) * mask[:, 1:]).sum(-1)


def token_logprobs(logits, targets):
    """log p(target) per position in fp32: logits (B, T, V), targets (B, T) -> (B, T)."""
    return F.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]


# ----------------------------------------------------------------------------- SMART
@torch.no_grad()
def smart_scores(teacher, m2, mla, batches, micro):
    """SMART's sensitivity (§3): s_i = KL(all-Mamba2) - KL(all-Mamba2 with layer i from the all-MLA
    student), how much one MLA layer at i helps, with KL to the teacher per token. Each batch runs in
    micro-batches of `micro` rows; the KLs are per-token means over all rows. -> (scores, KL(all-Mamba2))."""
    kls, rows = np.zeros(teacher.cfg.n_layer + 1), 0
    for idx in tqdm(batches, desc="SMART batches", leave=False):
        for part in idx.split(micro):
            t, w = teacher(part), len(part)
            kls[-1] += kd_loss(m2(part), t).item() * w
            for i in range(teacher.cfg.n_layer):
                keep, m2.layers[i] = m2.layers[i], mla.layers[i]
                kls[i] += kd_loss(m2(part), t).item() * w
                m2.layers[i] = keep
            rows += w
    return (kls[-1] - kls[:-1]) / rows, kls[-1] / rows


def smart_select(scores, n_mla):
    """Choose n_mla layers (SMART; its code is not published): layers 0 and L-2 forced (the published
    lists' terminal MLA layers), every gap within one of the uniform gap (L-2)/(n_mla-1) (all published lists
    obey this), and the largest total score among such sets, by dynamic programming over (k-th chosen layer,
    its index). E.g. L 16, n 4: gaps 4..5, as [0, 5, 10, 14]."""
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


# ----------------------------------------------------------------------------- the training loop
def amp_dtype(cfg):
    """The autocast dtype of training, None for plain fp32: --precision bf16, or auto on CUDA (as the official
    runs) and on CPUs with native bf16. Under --dry-run the weights themselves are bf16: no autocast."""
    if cfg.dry_run or cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16" or cfg.device.startswith("cuda") or cpu_has_bf16():
        return torch.bfloat16
    return None


def autocast(cfg):
    """The autocast of every student forward that trains or serves as DPO's reference (the two must agree)."""
    return torch.autocast(cfg.device.split(":")[0], dtype=torch.bfloat16, enabled=amp_dtype(cfg) is not None)


def weights_dtype(cfg):
    """The dtype of the weights a stage trains: fp32, or bf16 under --dry-run (a 1b student's fp32 weights
    and AdamW state alone take ~17 GB)."""
    return torch.bfloat16 if cfg.dry_run else torch.float32


def teacher_dtype(cfg):
    """The dtype of models that take no gradient (the teachers; the students SMART and eval score): bf16
    where training autocasts to bf16 (as the official runs), else the trained weights' dtype."""
    return amp_dtype(cfg) or weights_dtype(cfg)


def trainable(student, target):
    """What a stage trains: everything ("all", KD), the blocks and the final norm ("block", ILD), or the
    mixers alone ("mixer", "mixers"); ILD never trains the embeddings and head."""
    student.requires_grad_(target in ("all", "block"))
    if target == "all":
        return student
    student.embed_tokens.requires_grad_(False)
    student.lm_head.requires_grad_(False)
    for block in student.layers:
        block.mixer.requires_grad_(True)
    return student


SCALARS = (".A_log", ".dt_bias", ".D", ".mamba.norm.weight")  # Mamba2's per-head scalars, --scalar-lr


def optimizer(cfg, model, steps, lr, warmup):
    """AdamW over the weights that train, the learning rate warming up linearly over a `warmup` fraction of
    the steps, then falling to 0 on a cosine. -> (optimizer, scheduler)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # AdamW moves a weight by about lr per step: --scalar-lr speeds up the per-head scalars
    scalar = {id(p) for n, p in model.named_parameters() if n.endswith(SCALARS)}
    groups = [[p for p in params if (id(p) in scalar) == s] for s in (False, True)]
    opt = torch.optim.AdamW(
        [dict(params=g, lr=lr * (cfg.scalar_lr if s else 1.0)) for s, g in enumerate(groups) if g],
        lr=lr,
        weight_decay=cfg.weight_decay,
    )
    warm = max(1, int(warmup * steps))

    def schedule(s):
        return min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def train(r, name, model, step_loss, steps, lr, warmup, batch):
    """Train `model` as stage `name` of the Run r into <name>.pt: AdamW, linear warmup then cosine to 0,
    gradient clipping, `batch` rows (DPO: pairs) per optimizer step split over the ranks and into
    micro-batches of r.micro[name] rows, bf16 autocast (--precision), tqdm and a log line, a resumable
    checkpoint every ckpt_every steps; rerun after a kill, it resumes there. DDP or FSDP2 under torchrun.
    step_loss(model, step, micro, n_micro) -> (loss, terms) of micro-batch `micro` of `n_micro` of this
    rank's share of step `step` (its rows from batch_rows)."""
    cfg, rank, world, path = r.cfg, r.rank, r.world, r.path(f"{name}.pt")
    model = r.wrap(model.train())
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = optimizer(cfg, model, steps, lr, warmup)
    start, history = r.resume(name, model, opt, sched)
    amp, per_rank = autocast(cfg), batch // world
    micro = min(per_rank, r.micro[name])

    def say(msg):
        if rank == 0:
            tqdm.write(f"[{name}] {msg}")

    if start:
        say(f"resuming from step {start}/{steps}")
    bar = tqdm(range(start, steps), desc=name, initial=start, total=steps, disable=rank != 0)
    t0, tokens = time.time(), 0
    stop = f"stopped; the last good checkpoint {path} is kept (lower --{name.split('_')[0]}-lr and rerun)"
    for step in bar:
        r.progress["step"] = step
        try:
            loss, terms, micro = accumulate(model, step_loss, step, per_rank, micro, amp, say, world == 1)
        except ValueError as e:  # diverged weights fail the kernels' input checks (e.g. A_log overflowing)
            raise FloatingPointError(f"[{name}] step {step}: {e}; training diverged, {stop}") from None
        if dist.is_initialized():  # log the loss of the global batch: the mean over ranks
            dist.all_reduce(loss := loss.detach().clone())
            loss /= world
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"[{name}] loss is {loss.item()} at step {step}: {stop}")
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        history.append(round(loss.item(), 6))
        tokens += batch * cfg.seq_len
        rate, lr_now = tokens / (time.time() - t0), sched.get_last_lr()[0]
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_now:.2e}", tok_s=f"{rate:.0f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            eta = (time.time() - t0) / (step + 1 - start) * (steps - step - 1)
            terms = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
            tail = f"lr {lr_now:.2e} tok/s {rate:.0f} eta {eta:.0f}s"
            say(f"step {step + 1}/{steps} loss {loss.item():.4f} {terms} {tail}")
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < steps:
            r.save_progress(name, model, opt, sched, step + 1, history)
    r.save(f"{name}.pt", model.eval(), steps, done=True, history=history)
    if r.rank == 0:
        remove(r.path(f"{name}.dcp"))  # FSDP2's progress, now finished
    r.sync()
    return unwrap(model)


def accumulate(model, step_loss, step, per_rank, micro, amp, say, retry=True):
    """Forward and backward of one step: this rank's per_rank rows in micro-batches of at most `micro` rows,
    each micro loss weighted by its share of the rows, so the gradient is the whole share's whatever the
    split. On torch.OutOfMemoryError the gradients are cleared, the micro-batch halved (the global batch
    stays) and the step redone; not under torchrun (retry=False), where the other ranks would wait for this
    one at the gradient sync: there it is one clear error. -> (loss, terms, micro)."""
    while True:
        try:
            return *one_try(model, step_loss, step, per_rank, micro, amp), micro
        except torch.OutOfMemoryError:
            pass  # leave the handler first: its traceback holds the failed try's frames, graph and all
        model.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the failed try's blocks back before the smaller one
        fix = "(python distill.py --plan shows the need)"
        if not retry:
            raise MemoryError(
                f"out of memory at step {step} with {micro} sequences per forward on one of several "
                f"processes, which cannot halve their micro-batch in step: rerun with --micro-batch "
                f"{max(1, micro // 2)} {fix}"
            )
        if micro == 1:
            raise MemoryError(
                f"out of memory at step {step} with one sequence per forward: use more GPUs (torchrun, "
                f"--fsdp) or a shorter --seq-len {fix}"
            )
        micro //= 2
        say(f"out of memory at step {step}: micro-batch halved to {micro}, the step is redone")


def one_try(model, step_loss, step, per_rank, micro, amp):
    """accumulate's body -> (loss, terms). Its locals hold the graph: when it raises, they go with it."""
    n_micro = math.ceil(per_rank / micro)
    total, terms = 0.0, {}
    for m in range(n_micro):
        w = len(batch_rows(step, per_rank, per_rank, 0, 1, m, n_micro)) / per_rank  # as step_loss slices
        with sync_gradients(model, m == n_micro - 1):
            with amp:
                loss, t = step_loss(model, step, m, n_micro)
            (loss * w).backward()
        total = total + loss.detach() * w
        terms = {k: terms.get(k, 0.0) + v * w for k, v in t.items()}
    return total, terms


def sync_gradients(model, last):
    """Gradient accumulation without a collective per micro-batch: DDP and FSDP2 reduce only on the last."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    if hasattr(model, "no_sync") and not last:  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- the stages
def run_init(r):
    """All-MLA (SVD) and all-Mamba2 (attention-seeded) students from the teacher's weights."""
    # training tokens choose the MLA rope pairs and set the Mamba2 output norms; 4 rows are enough
    calib = r.first_batches("ild", 1)[0][:4]  # the global batch's, whatever the ranks
    with r.host_memory():  # the students are built in host memory: the device holds the teachers only
        calib, teacher = r.on_host(calib), r.on_host(r.teacher)
        for kind in ("mla", "m2"):
            r.save(
                f"init_{kind}.pt", convert.make_student(teacher, kind, r.cfg.rope_rule, calib), 0, done=True
            )


def run_ild(r, kind):
    """ILD of one student, every layer teacher-forced, on the ILD split (ild_layer_losses)."""
    cfg = r.cfg
    student = trainable(r.load(f"init_{kind}.pt").train(), cfg.ild_target)

    def step_loss(m, step, micro, n_micro):
        per_layer = ild_layer_losses(m, r.teacher, r.batch("ild", step, micro, n_micro), cfg.ild_target)
        return per_layer.sum(), dict(first=per_layer[0].item(), last=per_layer[-1].item())

    steps = cfg.ild_mla_steps if kind == "mla" and cfg.ild_mla_steps else cfg.ild_steps
    train(r, f"ild_{kind}", student, step_loss, steps, cfg.ild_lr, cfg.warmup, cfg.batch_size)


def run_smart(r):
    """Which layers stay MLA (SMART), scored on the first ILD (training) batches: the held-out split stays
    unseen until the evaluation. --mla-layers overrides the choice."""
    if r.cfg.mla_layers:
        res = dict(rule="given by --mla-layers", chosen=r.teacher.cfg.mla_layers)
    else:
        dtype = teacher_dtype(r.cfg)  # no gradients: the students score in the teacher's dtype
        m2, mla = r.load("ild_m2.pt", dtype), r.load("ild_mla.pt", dtype)
        batches = r.first_batches("ild", r.cfg.smart_batches)
        scores, base_kl = smart_scores(r.teacher, m2, mla, batches, r.micro["smart"])
        res = dict(
            rule="layers 0 and L-2 forced, every gap within 1 of uniform, maximal total score",
            kl_all_m2=base_kl,
            scores=scores.tolist(),
            chosen=smart_select(scores, len(r.teacher.cfg.mla_layers)),
        )
    r.write_json("smart.json", res)
    print(f"SMART: MLA layers {res['chosen']}")


def run_hybrid(r):
    """The hybrid: SMART's layers from the MLA student, the others from the Mamba2 student, embeddings, final
    norm and head from the teacher (convert.compose_hybrid)."""
    with r.host_memory():
        mla, m2 = r.load("ild_mla.pt", device=r.HOST), r.load("ild_m2.pt", device=r.HOST)
        hybrid = convert.compose_hybrid(r.on_host(r.teacher), mla, m2, r.mla_layers())
        r.save("hybrid_init.pt", hybrid, 0, done=True)


def run_kd(r):
    """End-to-end KL distillation from the KD teacher on the KD split (kd_loss)."""
    cfg = r.cfg

    def step_loss(m, step, micro, n_micro):
        idx = r.batch("kd", step, micro, n_micro)
        with torch.no_grad():
            t = r.kd_teacher(idx)
        logits = m(idx)
        kl = kd_loss(logits, t)
        if not cfg.ce_weight:
            return kl, dict(kl=kl.item())
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten())
        return kl + cfg.ce_weight * ce, dict(kl=kl.item(), ce=ce.item())

    hybrid = trainable(r.load("hybrid_init.pt"), cfg.kd_train)
    train(r, "kd", hybrid, step_loss, cfg.kd_steps, cfg.kd_lr, cfg.warmup, cfg.kd_batch_size)


def run_dpo(r):
    """DPO against the frozen KD model (dpo_loss). -> why it was skipped (no pairs), if it was."""
    cfg = r.cfg
    pairs, why = r.dpo_pairs()
    if not pairs:
        print(f"DPO skipped: {why}")
        return why
    idx, mask = pair_batch(r.tok, pairs, cfg.device, cfg.seq_len)  # (2 * pairs, T): chosen, then rejected
    n, rows = len(pairs), 2 * r.micro["dpo"]

    def step_loss(m, step, micro, n_micro):
        sel = batch_rows(step, cfg.dpo_batch_size, n, r.rank, r.world, micro, n_micro)
        rows = torch.tensor(sel + [n + i for i in sel], device=idx.device)
        lp, ref, k = seq_logprobs(m, idx[rows], mask[rows]), ref_lp[rows], len(sel)
        margin = (lp[:k] - ref[:k]) - (lp[k:] - ref[k:])
        return dpo_loss(lp[:k], lp[k:], ref[:k], ref[k:], cfg.dpo_beta), dict(margin=margin.mean().item())

    with r.teachers_in_host_memory():  # DPO needs no teacher: their room on the device is the policy's
        policy = r.load("kd.pt")
        # the reference is the KD model: the policy itself before its first step, under its own autocast
        with torch.no_grad(), autocast(cfg):
            ref_lp = torch.cat(
                [seq_logprobs(policy, i, m) for i, m in zip(idx.split(rows), mask.split(rows))]
            )
        train(r, "dpo", policy, step_loss, cfg.dpo_steps, cfg.dpo_lr, cfg.dpo_warmup, cfg.dpo_batch_size)
    return ""


def build_dpo_pairs(teacher, student, tok, prompts, max_new, batch=8):
    """Default preference pairs [project]: chosen = the teacher's greedy reply, rejected = the student's own
    before DPO, to prompts (message lists) of the KD split. Kept as token ids, so that replies that differ as
    tokens stay different; the text beside them is for people. -> (pairs, dropped): a pair whose two replies
    are the same ids teaches nothing, and a prompt too long for a reply has none."""

    def text(ids):  # ids beyond the tokenizer (a padded vocabulary) have no text
        return tok.decode([t for t in ids if t < tok.n_vocab])

    pairs = []
    fits = [p for p in prompts if len(tok.chat(p)) + max_new <= teacher.cfg.max_seq_len]
    for i in tqdm(range(0, len(fits), batch), desc="DPO pairs", leave=False):
        ids = [tok.chat(p) for p in fits[i : i + batch]]
        chosen = reply_ids(teacher, tok, ids, max_new_tokens=max_new)
        rejected = reply_ids(student, tok, ids, max_new_tokens=max_new)
        for msgs, p, c, rj in zip(fits[i : i + batch], ids, chosen, rejected):
            if c != rj:
                prompt = "\n".join(f"{m['role']}: {m['content']}" for m in msgs)
                pairs.append(dict(prompt=prompt, chosen=text(c), rejected=text(rj)))
                pairs[-1] |= dict(prompt_ids=p, chosen_ids=c, rejected_ids=rj)
    return pairs, len(prompts) - len(pairs)


def pair_batch(tok, pairs, device, max_len):
    """Prompt + response, right-padded -> (idx, response mask), chosen rows then rejected rows, each at most
    max_len tokens (--seq-len): a longer one loses the start of its prompt, so the response the loss reads
    stays whole. Pairs with ids are used as they are; text-only pairs (--dpo-data) get the chat template and
    an end-of-turn token."""
    seqs, masks = [], []
    for key in ("chosen", "rejected"):
        for d in pairs:
            if "prompt_ids" in d:
                p, r = d["prompt_ids"], d[key + "_ids"]
            else:
                p, r = tok.chat([{"role": "user", "content": d["prompt"]}]), tok.encode(d[key]) + [tok.eos_id]
            r = r[:max_len]
            p = p[max(0, len(p) + len(r) - max_len) :]
            seqs.append(p + r)
            masks.append([0] * len(p) + [1] * len(r))
    T = max(map(len, seqs))
    idx = torch.tensor([s + [tok.eos_id] * (T - len(s)) for s in seqs], device=device)
    mask = torch.tensor([m + [0] * (T - len(m)) for m in masks], device=device, dtype=torch.float32)
    return idx, mask


def run_eval(r):
    """Every stage's model, one at a time, on the held-out split and the unseen text against the KD teacher
    (evaluate); the final model's and the KD teacher's answers to QUESTIONS."""
    dtype = teacher_dtype(r.cfg)  # no gradients: the students are scored in the teacher's dtype
    models = {"teacher": lambda: r.teacher}
    if r.kd_teacher is not r.teacher:
        models["KD teacher"] = lambda: r.kd_teacher

    def untrained():  # composed in host memory, then moved: the device holds one student at a time
        with r.host_memory():
            mla, m2 = r.load("init_mla.pt", dtype, r.HOST), r.load("init_m2.pt", dtype, r.HOST)
            hybrid = convert.compose_hybrid(r.on_host(r.teacher), mla, m2, r.mla_layers())
        return r.on_device(hybrid)

    models["hybrid (no training)"] = untrained
    models["hybrid after ILD"] = lambda: r.load("hybrid_init.pt", dtype)
    models["after KD"] = lambda: r.load("kd.pt", dtype)
    skipped = {}
    if r.has("dpo.pt"):
        models["after DPO"] = lambda: r.load("dpo.pt", dtype)
    else:
        skipped["after DPO"] = r.records()["dpo"]["skipped"]
    splits = {split: r.first_batches(split, r.cfg.eval_batches) for split in ("heldout", "unseen")}
    rows, qa, final = {}, {"teacher": answers(r.kd_teacher, r.tok)}, list(models)[-1]
    for name, load in models.items():
        m = load()
        kv = m.cfg.kv_bytes_per_token()
        rows[name] = dict(
            kv_bytes_per_token_bf16=kv,
            kv_pct=100 * kv / r.teacher.cfg.kv_bytes_per_token(),
            params=m.num_params(),
            **evaluate(m, r.kd_teacher, splits, r.micro["eval"]),
        )
        if name == final:
            qa["distilled"] = answers(m, r.tok)
        del m
    config = {
        f.name: getattr(r.cfg, f.name) for f in fields(DistillConfig)
    }  # all of them: eval.json keeps them
    r.write_json(
        "eval.json",
        dict(
            size=r.cfg.size,
            mla_layers=r.mla_layers(),
            config=config,
            results=rows,
            skipped=skipped,
            answers=qa,
        ),
    )


@torch.no_grad()
def evaluate(model, teacher, splits, micro):
    """Perplexity, KL(p_T || p_S) per token and top-1 agreement with `teacher` on each split ({name:
    batches}), in micro-batches of `micro` rows: per-token means over all rows."""
    res = {}
    for split, batches in splits.items():
        acc, rows = np.zeros(3), 0
        for idx in tqdm(batches, desc=f"evaluate {split}", leave=False):
            for part in idx.split(micro):
                t = teacher(part)
                s = t if model is teacher else model(part)
                ce = F.cross_entropy(s[:, :-1].flatten(0, 1).float(), part[:, 1:].flatten())
                agree = (s.argmax(-1) == t.argmax(-1)).float().mean()
                acc += np.array([ce.item(), kd_loss(s, t).item(), agree.item()]) * len(part)
                rows += len(part)
        ce, kl, top1 = acc / rows
        res[split] = dict(ppl=math.exp(ce), kl=kl, top1=top1)
    return res


# simple factual questions: the teacher answers them; a distilled model should still
QUESTIONS = (
    "What is the capital of France?",
    "How many days are there in a week?",
    "What color is the sky on a clear day?",
    "Who wrote Romeo and Juliet?",
    "What is 2 + 3?",
)


def answers(model, tok, max_new=32):
    """Greedy replies of model to QUESTIONS, as text."""
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    return [text.strip() for text in reply(model, tok, prompts, max_new_tokens=max_new)]


@dataclass(frozen=True)
class Stage:
    name: str
    run: object  # run(Run) writes the stage's files; returns why it was skipped, if it was
    files: tuple  # what it writes under out/<size>/
    all_ranks: bool = False  # training runs on every rank; the other stages on rank 0 while the rest wait
    scratch: tuple = ()  # files it may also write (DPO pairs, FSDP2 progress), removed when it reruns

    @property
    def doc(self):
        return getattr(self.run, "func", self.run).__doc__.split("\n")[0]


STAGES = (
    Stage("init", run_init, ("init_mla.pt", "init_m2.pt")),
    Stage("ild_mla", partial(run_ild, kind="mla"), ("ild_mla.pt",), True, ("ild_mla.dcp",)),
    Stage("ild_m2", partial(run_ild, kind="m2"), ("ild_m2.pt",), True, ("ild_m2.dcp",)),
    Stage("smart", run_smart, ("smart.json",)),
    Stage("hybrid_init", run_hybrid, ("hybrid_init.pt",)),
    Stage("kd", run_kd, ("kd.pt",), True, ("kd.dcp",)),
    Stage("dpo", run_dpo, ("dpo.pt",), True, ("dpo_pairs.jsonl", "dpo.dcp")),
    Stage("eval", run_eval, ("eval.json",)),
)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    cfg = parse_args(argv)
    if cfg.plan:  # from SIZES, nothing loaded
        tcfg = convert.with_hybrid_fields(size_config(cfg.size), cfg.size, mla_layer_list(cfg))
        world, kd = cfg.world or int(os.environ.get("WORLD_SIZE", 1)), cfg.kd_teacher
        print_plan(cfg, memory_plan(cfg, tcfg, world, size_config(kd) if kd in SIZES else None), world)
        if kd and kd not in SIZES:
            print(f"the KD teacher {kd} is not counted: give its size (e.g. --kd-teacher 8b) to --plan")
        return
    cfg, rank, world = setup_distributed(cfg)
    torch.manual_seed(cfg.seed)
    out, progress = os.path.join(cfg.out_dir, cfg.size), {}
    os.makedirs(out, exist_ok=True)
    held = lock(out) if rank == 0 else None  # noqa: F841 (held open for the run: closing it unlocks)
    try:
        run_all(cfg, rank, world, out, progress)
    except KeyboardInterrupt:
        step = f" step {progress['step']}" if progress.get("step") is not None else ""
        print(
            f"\ninterrupted at {progress.get('stage', 'the start')}{step}; rerun the same command to resume"
        )
        sys.exit(130)
    if world > 1:
        dist.destroy_process_group()


def run_all(cfg, rank, world, out, progress):
    """Teachers, memory plan, data, then every stage in order (up to --stage), then the evaluation's table."""
    if cfg.dpo_data and not read_jsonl(cfg.dpo_data, pair_record, PAIR_FORM):  # now, not after hours of KD
        raise ValueError(f"{cfg.dpo_data} holds no DPO pairs: give one {PAIR_FORM} per line")
    teacher, kd_teacher, tok = load_teachers(cfg)
    micro = plan_micro_batches(
        cfg, teacher.cfg, world, rank, kd_teacher.cfg if kd_teacher is not teacher else None
    )
    meta = [prepare_data(cfg, tok, out, kd_teacher) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(meta)
    digests = dict(teacher=weights_digest(teacher.state_dict()), data=data_digest(meta[0]))
    digests["kd_teacher"] = (
        digests["teacher"] if kd_teacher is teacher else weights_digest(kd_teacher.state_dict())
    )
    r = Run(cfg, rank, world, out, tok, (teacher, kd_teacher), meta[0], micro, digests, progress=progress)
    last = [s.name for s in STAGES].index(cfg.stage) if cfg.stage else len(STAGES) - 1
    for stage in STAGES[: last + 1]:
        run_stage(stage, r)
    if rank == 0 and cfg.stage and last + 1 < len(STAGES):
        print(f"stopped after --stage {cfg.stage}; the next run reruns what came after it if that read it")
    if rank == 0 and os.path.isfile(r.path("eval.json")):
        res = r.read_json("eval.json", dict)
        if not {"results", "skipped", "answers"} <= res.keys():
            raise ValueError(f"{r.path('eval.json')} is damaged (no results): rerun with --stage eval")
        print_table(res["results"], res["skipped"])
        print_answers(res["answers"])
        newest = r.path("dpo.pt") if os.path.isfile(r.path("dpo.pt")) else r.path("kd.pt")
        print(f"checkpoints and eval.json in {out}; chat with: python generate.py --ckpt {newest}")


def mla_layer_list(cfg):
    return [int(i) for i in cfg.mla_layers.split(",")] if cfg.mla_layers else None


def load_teachers(cfg):
    """(teacher, KD teacher, tokenizer): the model to convert, and the teacher of KD, DPO pairs and
    evaluation (the same model unless --kd-teacher). Both must share one vocabulary and hold --seq-len."""
    cache = cfg.cache_dir or None
    if cfg.dry_run and not cfg.teacher:  # random weights at the real shapes
        teacher, tok = random_teacher(cfg)
    else:
        teacher, tok = convert.load_teacher(cfg.teacher or cfg.size, cache)
    # the same weights under a config that also holds the hybrid's fields (MLA ranks, the size's MLA layers)
    teacher = Model.from_state_dict(
        convert.with_hybrid_fields(teacher.cfg, cfg.size, mla_layer_list(cfg)), teacher.state_dict()
    )
    kd_teacher, kd_tok = (teacher, tok) if not cfg.kd_teacher else convert.load_teacher(cfg.kd_teacher, cache)
    same_ids = (kd_tok.ranks, kd_tok.special) == (tok.ranks, tok.special)
    if not same_ids or kd_teacher.cfg.vocab_size != teacher.cfg.vocab_size:
        raise ValueError(
            f"--kd-teacher {cfg.kd_teacher} has another vocabulary ({kd_tok.name}, "
            f"{kd_teacher.cfg.vocab_size} ids) than the teacher ({tok.name}, {teacher.cfg.vocab_size} ids): "
            "KD compares their next-token distributions id by id; pick a KD teacher of the same family"
        )
    for name, m in (("teacher", teacher), ("KD teacher", kd_teacher)):
        if cfg.seq_len > m.cfg.max_seq_len:
            raise ValueError(
                f"--seq-len {cfg.seq_len} exceeds the {name}'s context of {m.cfg.max_seq_len} tokens: pass "
                f"--seq-len {m.cfg.max_seq_len} or less"
            )
    teacher = teacher.to(cfg.device, teacher_dtype(cfg)).eval().requires_grad_(False)
    kd_teacher = kd_teacher.to(cfg.device, teacher_dtype(cfg)).eval().requires_grad_(False)
    return teacher, kd_teacher, tok


def random_teacher(cfg):
    """--dry-run without --teacher: a random Llama of the size, the byte-level tokenizer."""
    torch.manual_seed(cfg.seed)
    model = Model(size_config(cfg.size))
    torch.nn.init.normal_(model.embed_tokens.weight, std=0.1)  # small (tied) embeddings keep logits sane
    return model.eval(), convert.Tokenizer.byte_level()


def print_table(rows, skipped):
    """One row per model: held-out chats (in-domain) and the unseen-domain text, then the KV cache."""
    print(f"{'':<22}{'held-out chats':^27}  {'unseen domain (The Tempest)':^27}")
    cols = f"{'ppl':>9}{'KL to T':>10}{'top-1':>8}"
    print(f"{'model':<22}{cols}  {cols}{'KV B/tok':>10}{'KV %':>8}{'params':>13}")
    for name, r in rows.items():
        quality = "  ".join(
            f"{r[k]['ppl']:>9.2f}{r[k]['kl']:>10.4f}{r[k]['top1']:>8.3f}" for k in ("heldout", "unseen")
        )
        print(f"{name:<22}{quality}{r['kv_bytes_per_token_bf16']:>10}{r['kv_pct']:>7.2f}%{r['params']:>13,}")
    for name, why in skipped.items():
        print(f"{name:<22}skipped: {why}")


def print_answers(qa):
    """The fixed questions with each model's greedy answer beneath, side by side in reading order."""
    for i, q in enumerate(QUESTIONS):
        print(f"\nQ: {q}")
        for name, replies in qa.items():
            print(f"  {name + ':':<10} {replies[i]!r}")


# ----------------------------------------------------------------------------- data
CHAT_FORM = '{"messages": [{"role": ..., "content": ...}, ...]}'
PAIR_FORM = '{"prompt": ..., "chosen": ..., "rejected": ...}'


def as_stored(obj):
    """obj as it reads back from a JSON file (tuples become lists): what a stored record is compared with."""
    return json.loads(json.dumps(obj))


def read_jsonl(path, record, form):
    """The records of a JSONL file; malformed lines (not UTF-8, not JSON, not the form: record() asserts it)
    are reported with their line numbers."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no data file at {path}: pass a JSONL file with one {form} per line")
    rows, bad = [], []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                rows += [record(json.loads(line.decode("utf-8")))] if line.strip() else []
            except Exception:
                bad.append(n)
    if bad:
        raise ValueError(
            f"{path}: {len(bad)} malformed line(s), first at line(s) {bad[:5]}; each line must be {form} "
            "in UTF-8"
        )
    return rows


def chat_record(d):
    assert isinstance(d["messages"], list) and d["messages"]
    assert all(
        isinstance(m["content"], str) and m["role"] in ("system", "user", "assistant") for m in d["messages"]
    )
    return d["messages"]


def pair_record(d):
    """A DPO pair: texts, plus token ids in the pairs distill.py builds itself (text alone is re-encoded)."""
    assert all(isinstance(d[k], str) for k in ("prompt", "chosen", "rejected"))
    ids = [d[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids") if k in d]
    assert len(ids) in (0, 3) and all(isinstance(t, int) for row in ids for t in row)
    return d


def chat_prompt(messages):
    """The prompt of a default DPO pair: the first user turn, with the system turn just before it if any;
    None for a chat without a user turn."""
    for i, m in enumerate(messages):
        if m["role"] == "user":
            start = i - 1 if i and messages[i - 1]["role"] == "system" else i
            return messages[start : i + 1]
    return None


# Subjects of the teacher-reply prompts: everyday knowledge, none of the evaluation's QUESTIONS (capitals,
# the week, the sky, Shakespeare, sums) nor its unseen domain, so the answers there are the model's own.
TOPICS = (
    "volcanoes, the moon, photosynthesis, oceans, chess, bicycles, bread, coffee, gravity, the heart, sleep, "
    "elephants, the Olympics, the internet, electricity, dinosaurs, recycling, bees, mountains, deserts, "
    "trains, the piano, soccer, tea, penguins, the brain, vitamins, rain forests, airplanes, batteries, "
    "honey, earthquakes, whales, gardening, glass, magnets, the skin, bridges, rice, libraries"
).split(", ")
FORMS = ("Tell me a fact about {}.", "What is {}?", "Explain {} in two sentences.", "Why do people study {}?")


def teacher_chats(teacher, tok, first_turns, n, max_new=96, batch=32):
    """Token ids of n chats whose assistant turn is the teacher's own greedy reply: half to questions on
    TOPICS in the FORMS, half to first user turns of the corpus. -> one list of ids (prompt + reply each)."""
    questions = [[{"role": "user", "content": f.format(t)}] for t in TOPICS for f in FORMS]
    turns = [ids for ids in map(tok.chat, first_turns) if len(ids) + max_new <= teacher.cfg.max_seq_len]
    prompts = [tok.chat(p) for p in questions[: n - n // 2]] + turns[: n // 2]
    # batches of prompts of like length: every row of a batch decodes over the longest prompt's cache
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies = {}
    for i in tqdm(range(0, len(order), batch), desc="teacher replies", leave=False):
        part = order[i : i + batch]
        replies |= zip(part, reply_ids(teacher, tok, [prompts[j] for j in part], max_new_tokens=max_new))
    return [t for i, p in enumerate(prompts) for t in p + replies[i]]


# Openings of the teacher's own text (--teacher-text): common starts of English prose, stories, letters and
# articles; the teacher writes the rest, so these tokens are its language beyond the chat corpus.
OPENINGS = (
    "The|In|Once upon a time|A|It|When|Chapter 1|Dear|The history of|He|She|Why|How to|There|My|We|This|"
    "After|According to|On the|Many|If you|Today|Long ago"
).split("|")


def teacher_text(teacher, tok, n, max_new=192, batch=64):
    """Token ids of n texts the teacher writes after the OPENINGS in turn, sampled at temperature 1 with
    top-p 0.95 (seeded per batch, so a rerun writes the same), without a chat template. -> one list of ids."""
    ids = []
    for i in tqdm(range(0, n, batch), desc="teacher text", leave=False):
        part = [tok.encode(OPENINGS[j % len(OPENINGS)]) for j in range(i, min(n, i + batch))]
        texts = reply_ids(teacher, tok, part, max_new_tokens=max_new, temperature=1.0, top_p=0.95, seed=i)
        ids += [t for p, r in zip(part, texts) for t in p + r]
    return ids


def data_path(out, split):
    return os.path.join(out, f"data_{split}.bin")


def prepare_data(cfg, tok, out, teacher, max_prompts=4096):
    """Tokenize chats with the teacher's chat template and pack them into (N, seq_len) uint32 files.
    Split by conversation: the last 5 % are held out (read by the final evaluation only); of the rest the
    first 20 % feed ILD (and SMART) and the other 80 % KD (the official data split); DPO prompts come from
    the KD split. Beside them: "gen" and "text", the (KD) teacher's own replies and texts
    (--teacher-replies, teacher_chats; --teacher-text, teacher_text), and "unseen", text of a domain no
    split holds, for the evaluation. Reused while its key (the source and its content, length, tokenizer)
    matches and every file its digest; otherwise prepared anew (and the stages that read it rerun)."""
    meta_path = os.path.join(out, "data.json")
    source = cfg.data or "chitchat-dataset==0.9.0"
    writer = cfg.kd_teacher or cfg.teacher or cfg.size  # of the teacher's replies and texts
    key = dict(
        source=source,
        source_sha256=sha256(cfg.data) if cfg.data else None,
        max_chats=cfg.max_chats,
        seq_len=cfg.seq_len,
        tokenizer=tok.name,
        n_vocab=tok.n_vocab,
        unseen=convert.TEMPEST[:2],
        teacher_replies=cfg.teacher_replies,
        teacher_text=cfg.teacher_text,
        replies_by=writer if cfg.teacher_replies or cfg.teacher_text else None,
    )
    if os.path.isfile(meta_path):
        meta = read_json(meta_path)
        if not isinstance(meta, dict) or not {"key", "n", "sha256", "prompts"} <= meta.keys():
            print(f"data: {meta_path} is not this version's; preparing the data anew")
        elif meta["key"] != as_stored(key):
            print(f"data: {out} holds data prepared from {meta['key']}; preparing {key} (stages rerun)")
        elif all(sha256(data_path(out, s)) == digest for s, digest in meta["sha256"].items()):
            return meta
        else:
            print(f"data: a file of {out}/data_*.bin is missing or changed; preparing it anew")
        os.remove(meta_path)  # first, so that a kill below never leaves new files under the old key
    chats = (
        read_jsonl(cfg.data, chat_record, CHAT_FORM)
        if cfg.data
        else convert.chitchat_chats(cfg.cache_dir or None)
    )
    chats = chats[: cfg.max_chats] if cfg.max_chats else chats
    if not chats:
        raise ValueError(f"{source} holds no conversations: give a chat JSONL with one {CHAT_FORM} per line")
    n_held = max(1, len(chats) // 20)
    n_ild = (len(chats) - n_held) // 5
    splits = {"ild": chats[:n_ild], "kd": chats[n_ild:-n_held], "heldout": chats[-n_held:]}
    prompts = [p for p in map(chat_prompt, splits["kd"]) if p]
    meta = dict(key=key, prompts=prompts[:max_prompts], n={}, sha256={})
    tokens = {name: [] for name in splits}
    for name, part in splits.items():
        for msgs in tqdm(part, desc=f"tokenize {name}", leave=False):
            tokens[name].extend(tok.chat(msgs, add_generation_prompt=False))
    tokens["unseen"] = tok.encode(convert.unseen_text(cfg.cache_dir or None))  # plain text, no chat template
    for name, ids in tokens.items():  # before minutes of teacher replies and texts
        if len(ids) < cfg.seq_len:
            raise ValueError(
                f"the {name} split has {len(ids)} tokens, fewer than one sequence of {cfg.seq_len}: "
                "give more data (--data, --max-chats) or a shorter --seq-len"
            )
    if cfg.teacher_replies:
        first_turns = [p for p in map(chat_prompt, splits["ild"]) if p]
        tokens["gen"] = teacher_chats(teacher, tok, first_turns, cfg.teacher_replies)
    if cfg.teacher_text:
        tokens["text"] = teacher_text(teacher, tok, cfg.teacher_text)
    for name, ids in tokens.items():
        n = len(ids) // cfg.seq_len
        if n == 0:
            raise ValueError(f"the teacher's {name} has fewer than {cfg.seq_len} tokens: ask for more of it")
        rows = np.asarray(ids[: n * cfg.seq_len], dtype=np.uint32)  # (n * seq_len,), read as (n, seq_len)
        atomic_write(data_path(out, name), rows.tofile)
        meta["n"][name], meta["sha256"][name] = n, sha256(data_path(out, name))
    write_json(meta_path, meta)
    return meta


def data_digest(meta):
    """What a stage that reads the data notes: the data's key and its files' digests."""
    return hashlib.sha256(json.dumps([meta["key"], meta["sha256"]], sort_keys=True).encode()).hexdigest()


def batch_rows(step, batch_size, n_rows, rank=0, world=1, micro=0, n_micro=1):
    """Positions (into a split of n_rows rows, or a list of DPO pairs) of micro-batch `micro` of `n_micro` of
    this rank's share of global step `step`. The global batch is rows step*batch_size ... +batch_size-1
    (wrapping around): rank r takes the r-th contiguous slice of batch_size // world, which is split into
    n_micro near-equal parts. The union over ranks and micro-batches is the same for every world and
    n_micro, so resuming, torchrun and an out-of-memory retry see the same global batch."""
    per_rank = batch_size // world
    part = np.array_split(np.arange(rank * per_rank, (rank + 1) * per_rank), n_micro)[micro]
    return [int((step * batch_size + j) % n_rows) for j in part]


# The splits ILD and KD steps read in turn ("own": the stage's split of the corpus): with the teacher's texts,
# of every five steps three read texts, one its replies, one the corpus; without, one in three reads replies.
# The mixes measured are in the README.
MIX_TEXT, MIX = ("own", "text", "gen", "text", "text"), ("own", "own", "gen")


def stage_batch(cfg, stage):
    """Global batch of a stage (or split) per optimizer step: sequences (ILD, KD; SMART's and the evaluation's
    batches are ILD-sized) or preference pairs (DPO)."""
    return cfg.kd_batch_size if stage == "kd" else cfg.dpo_batch_size if stage == "dpo" else cfg.batch_size


def get_batch(out, meta, split, step, cfg, rank=0, world=1, micro=0, n_micro=1):
    """The rows batch_rows picks from a split, through a fixed shuffle of the split (seeded, so resuming
    at a step gives the same data), as a (rows, seq_len) int64 tensor on cfg.device. ILD and KD steps read
    the teacher's texts and replies instead in the turns of MIX_TEXT or MIX, where prepared."""
    size = stage_batch(cfg, split)
    cycle = MIX_TEXT if meta["n"].get("text") else MIX
    n, i = divmod(step, len(cycle))
    if split in ("ild", "kd") and meta["n"].get(cycle[i]):
        # the k-th step that turns to a split reads its k-th block of rows
        split, step = cycle[i], n * cycle.count(cycle[i]) + cycle[:i].count(cycle[i])
    arr = np.memmap(os.path.join(out, f"data_{split}.bin"), dtype=np.uint32, mode="r").reshape(
        -1, cfg.seq_len
    )
    order = np.random.default_rng(cfg.seed).permutation(len(arr))
    rows = batch_rows(step, size, len(arr), rank, world, micro, n_micro)
    return torch.from_numpy(arr[np.sort(order[rows])].astype(np.int64)).to(cfg.device)


# ----------------------------------------------------------------------------- distributed
def setup_distributed(cfg):
    """cfg with this process's device, rank, world. Under torchrun: one process per device, gloo on CPU,
    nccl on GPU."""
    if "RANK" not in os.environ:
        return cfg, 0, 1
    dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    if cfg.device.startswith("cuda"):
        cfg = dataclasses.replace(cfg, device=f"cuda:{int(os.environ['LOCAL_RANK'])}")
        torch.cuda.set_device(cfg.device)
    return cfg, dist.get_rank(), dist.get_world_size()


def wrap_model(model, cfg, world):
    """DDP for sizes that fit one device; FSDP2 (fully_shard per block, then the root) with --fsdp (8b),
    gathering the parameters in bf16 under bf16 training (half the traffic of fp32) and reducing the
    gradients in fp32."""
    if world == 1:
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=amp_dtype(cfg), reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
        return fully_shard(model, mp_policy=mp)
    return torch.nn.parallel.DistributedDataParallel(model)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def full_state_dict(model):
    """The unwrapped model's full state dict; under FSDP2 every rank joins the gather, rank 0 receives it."""
    if not hasattr(model, "reshard"):  # plain or DDP
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ----------------------------------------------------------------------------- a run: files, ranks, progress
@dataclass
class Run:
    """What every stage reads and writes: the settings, this process's place under torchrun, the teachers,
    the data, each stage's rows per forward (the memory plan), and the files under out/<size>/. SimRun
    stands in for it when the memory plan simulates a stage."""

    cfg: DistillConfig
    rank: int
    world: int
    out: str
    tok: convert.Tokenizer
    # the model converted into the hybrid (teacher of ILD and SMART), and the teacher of KD, DPO pairs and
    # evaluation (--kd-teacher; else the same)
    teachers: tuple
    meta: dict  # data.json
    micro: dict  # {stage: rows (DPO: pairs) per forward}
    digests: dict = field(default_factory=dict)  # of teacher, kd_teacher and data: what a stage notes
    reads: dict = None  # where a stage notes what it reads (run_stage); None: not noted
    progress: dict = field(default_factory=dict)  # the stage and step running, for an interrupt's message

    def note(self, key, value):
        if self.reads is not None:
            self.reads[key] = value

    @property
    def teacher(self):
        self.note("teacher", self.digests.get("teacher"))
        return self.teachers[0]

    @property
    def kd_teacher(self):
        self.note("kd_teacher", self.digests.get("kd_teacher"))
        return self.teachers[1]

    def path(self, name):
        return os.path.join(self.out, name)

    def written(self, name):
        """The digest its stage recorded for file `name`, None if none did."""
        return next(
            (rec["files"][name] for rec in self.records().values() if name in rec.get("files", {})), None
        )

    HOST = "cpu"  # host memory: where the stages that build or compose models do it

    def load(self, name, dtype=None, device=None):
        self.note(f"file {name}", self.written(name))
        dtype = dtype or weights_dtype(self.cfg)
        return load_checkpoint(self.path(name), device or self.cfg.device, dtype)[0].eval()

    def on_host(self, x):
        """A model or tensor in host memory (the same tensors where they are there already)."""
        if isinstance(x, torch.Tensor):
            return x.to(self.HOST)
        sd = {k: v.to(self.HOST) for k, v in x.state_dict().items()}
        return Model.from_state_dict(x.cfg, sd).requires_grad_(False)

    def on_device(self, model):
        return model.to(self.cfg.device)

    def host_memory(self):  # where a stage works in host memory (SimRun counts it apart)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def teachers_in_host_memory(self):
        """The teachers wait in host memory meanwhile, and come back to the device after."""
        teachers = list({id(t): t for t in self.teachers}.values())
        for t in teachers:
            self.move(t, to_host=True)
        try:
            yield
        finally:
            for t in teachers:
                self.move(t, to_host=False)

    def move(self, model, to_host):
        model.to(self.HOST if to_host else self.cfg.device)

    def save(self, name, model, step, **extra):
        """<name> from a model wrapped or not: every rank joins an FSDP2 gather, rank 0 writes. The teacher
        it comes from is recorded (bench.py --tasks compares with it) unless it is --dry-run's random one."""
        sd = full_state_dict(model)
        if not (self.cfg.dry_run and not self.cfg.teacher):
            extra["teacher"] = convert.teacher_record(self.cfg.teacher or self.cfg.size)
        if self.rank == 0:
            save_checkpoint(self.path(name), unwrap(model), name[:-3], step, self.tok, state_dict=sd, **extra)

    def save_progress(self, stage, model, opt, sched, step, history):
        """A resumable checkpoint of an unfinished training stage: <stage>.pt with the optimizer's state;
        under FSDP2 each rank writes its own shards through torch.distributed.checkpoint into <stage>.dcp/
        (no rank gathers the whole), published by one rename."""
        extra = dict(scheduler=sched.state_dict(), history=history, rng=torch.get_rng_state())
        if not (self.cfg.fsdp and self.world > 1):
            self.save(f"{stage}.pt", model, step, optimizer=opt.state_dict(), **extra)
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        tmp, final = self.path(f"{stage}.dcp.tmp"), self.path(f"{stage}.dcp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        self.sync()
        dcp.save(dict(zip(("model", "optimizer"), get_state_dict(model, opt))), checkpoint_id=tmp)
        if self.rank == 0:
            torch.save(dict(step=step, **extra), os.path.join(tmp, "progress.pt"))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self.sync()

    def resume(self, stage, model, opt, sched):
        """(step, history) of the unfinished checkpoint save_progress wrote, loaded into model, opt and
        sched; (0, []) when there is none."""
        if self.cfg.fsdp and self.world > 1:
            if not os.path.isdir(self.path(f"{stage}.dcp")):
                return 0, []
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            state = dict(zip(("model", "optimizer"), get_state_dict(model, opt)))
            dcp.load(state, checkpoint_id=self.path(f"{stage}.dcp"))
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
            ck = torch.load(self.path(f"{stage}.dcp/progress.pt"), weights_only=True)
        elif os.path.isfile(self.path(f"{stage}.pt")):
            ck = read_checkpoint(self.path(f"{stage}.pt"), self.cfg.device)
            unwrap(model).load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
        else:
            return 0, []
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"])
        return ck["step"], ck["history"]

    def write_json(self, name, obj):
        write_json(self.path(name), obj)

    def read_json(self, name, shape=None):
        """A side file, checked against its shape (here or by the caller): a wrong one is one clear error."""
        obj = read_json(self.path(name))
        if shape is not None and not isinstance(obj, shape):
            raise ValueError(
                f"{self.path(name)} is damaged (not a JSON {shape.__name__}): rerun with --force"
            )
        return obj

    def has(self, name):
        self.note(f"file {name}", self.written(name))
        return os.path.isfile(self.path(name))

    def batch(self, split, step, micro=0, n_micro=1):
        self.note("data", self.digests.get("data"))
        return get_batch(self.out, self.meta, split, step, self.cfg, self.rank, self.world, micro, n_micro)

    def first_batches(self, split, n):
        """The first n whole batches of a split (fewer when the split has fewer rows)."""
        self.note("data", self.digests.get("data"))
        return [
            get_batch(self.out, self.meta, split, i, self.cfg) for i in range(min(n, self.meta["n"][split]))
        ]

    def dpo_pairs(self):
        """The DPO pairs: --dpo-data, or built once (rank 0) into dpo_pairs.jsonl. -> (pairs, why none)."""
        cfg, path = self.cfg, self.path("dpo_pairs.jsonl")
        if cfg.dpo_data:
            self.note("dpo_data content", sha256(cfg.dpo_data))
            return read_jsonl(cfg.dpo_data, pair_record, PAIR_FORM), ""
        if not cfg.dpo_pairs:
            return [], "--dpo-pairs 0"
        if not self.meta["prompts"]:
            return [], "the KD split has no chat with a user turn to take DPO prompts from"
        if self.rank == 0 and not os.path.isfile(path):
            prompts = self.meta["prompts"][: cfg.dpo_pairs]
            student = self.load("kd.pt", teacher_dtype(cfg))  # no gradients: in the teacher's dtype
            pairs, dropped = build_dpo_pairs(self.kd_teacher, student, self.tok, prompts, cfg.dpo_max_new)
            print(
                f"DPO: {len(pairs)} pairs from {len(prompts)} prompts; {dropped} dropped "
                "(both replies the same tokens, or the prompt too long)"
            )
            if pairs:
                atomic_write(
                    path, lambda tmp: Path(tmp).write_text("".join(json.dumps(p) + "\n" for p in pairs))
                )
        self.sync()
        if os.path.isfile(path):
            return read_jsonl(path, pair_record, PAIR_FORM), ""
        return [], "every reply pair was the same tokens (nothing to prefer)"

    def wrap(self, model):
        return wrap_model(model, self.cfg, self.world)

    def records(self):
        """stages.json: what each stage read and wrote (bookkeeping below); a record of another version
        counts as none (its stage reruns)."""
        records = self.read_json("stages.json", dict) if os.path.isfile(self.path("stages.json")) else {}
        return {k: v for k, v in records.items() if isinstance(v, dict) and {"start", "done"} <= v.keys()}

    def fingerprint(self, stage):
        """A digest of all a stage could read: every setting that can change a result, the teachers, the
        data and the files of the stages before it. An unfinished stage resumes only from the same."""
        records, names = self.records(), [s.name for s in STAGES]
        files = {s: records.get(s, {}).get("files") for s in names[: names.index(stage.name)]}
        settings = {f.name: getattr(self.cfg, f.name) for f in fields(DistillConfig) if f.name not in NEUTRAL}
        text = json.dumps(as_stored([settings, self.digests, files]), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def mla_layers(self):
        chosen = self.read_json("smart.json", dict).get("chosen")
        if not (isinstance(chosen, list) and all(isinstance(i, int) for i in chosen)):
            raise ValueError(
                f"{self.path('smart.json')} is damaged (no list of chosen layers): rerun with --force"
            )
        self.note("mla_layers", chosen)
        return chosen

    def sync(self):  # ranks wait for rank 0's files
        if self.world > 1:
            dist.barrier()


# ----------------------------------------------------------------------------- bookkeeping: which stages run
# One rule, by content. A stage's record in stages.json holds what it read (each setting that can change a
# result, with its value; the digests of the teachers, of the data and of each file it loaded) and the
# digest of each file it wrote. It is current while all it read reads the same today and its files still
# match their digests; otherwise it reruns (or resumes, when unfinished from the same start). So a stage
# after a rerun one reruns only if what it reads of it changed.
RESUME = "unfinished: resume"


class Reading:
    """The settings as a stage sees them: each one read that can change a result is noted in `reads`, as
    its flag with its value."""

    def __init__(self, cfg, reads):
        self.__dict__.update(_cfg=cfg, _reads=reads)

    def __getattr__(self, name):
        value = getattr(self._cfg, name)
        if name not in NEUTRAL:
            self._reads["--" + name.replace("_", "-")] = as_stored(value)
        return value


def sha256(path):
    """The sha256 (hex) of a file's bytes, None for no file."""
    if not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def today(r, key):
    """What the read noted as `key` (Run.note) reads today."""
    if key.startswith("--"):
        return as_stored(getattr(r.cfg, key[2:].replace("-", "_")))
    if key.startswith("file "):
        return r.written(key[5:])
    if key == "mla_layers":
        return r.mla_layers() if r.has("smart.json") else None
    if key == "dpo_data content":
        return sha256(r.cfg.dpo_data)
    return r.digests[key]  # teacher, kd_teacher, data


def why_run(stage, r, records):
    """None when the stage is current; else why it runs. Only RESUME keeps its files."""
    rec, cfg = records.get(stage.name), r.cfg
    if cfg.force or cfg.stage == stage.name:
        return "--force" if cfg.force else f"--stage {stage.name}"
    if rec is None:
        found = any(r.has(f) for f in stage.files)
        return "its files carry no record of what they were made from" if found else "not run yet"
    if not rec["done"]:
        if rec["start"] != r.fingerprint(stage):
            return "unfinished, and what it reads has changed since it started"
        try:  # the last periodic checkpoint, which it resumes from
            [read_checkpoint(r.path(f)) for f in stage.files if f.endswith(".pt") and r.has(f)]
        except ValueError:
            return "unfinished, and its last checkpoint is damaged"
        return RESUME
    changed = [k for k, v in rec["reads"].items() if today(r, k) != v]
    if changed:
        return f"made from another {', '.join(changed)}"
    damaged = [f for f, digest in rec["files"].items() if sha256(r.path(f)) != digest]
    return f"{damaged[0]} is missing or was changed since it was written" if damaged else None


def remove(path):
    """Remove a file or a folder, if there is one."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.isfile(path):
        os.remove(path)


def run_stage(stage, r):
    """Run a stage unless it is current, noting what it reads; record that and the digests of its files.
    A stage that reruns from scratch first loses its files and record, so nothing reads them meanwhile."""
    t0, records = time.time(), r.records()
    why = why_run(stage, r, records)
    if r.rank == 0 and time.time() - t0 > 1:
        print(f"[{stage.name}] checked against its record in {time.time() - t0:.1f} s")
    r.sync()  # every rank has asked before rank 0 changes any file
    if why is None:
        return
    if r.rank == 0:
        if why not in ("not run yet", RESUME):
            print(f"[{stage.name}] {'restarts' if why.startswith('unfinished') else 'reruns'}: {why}")
        if why != RESUME:
            for f in stage.files + stage.scratch:
                shutil.rmtree(r.path(f)) if os.path.isdir(r.path(f)) else os.path.isfile(
                    r.path(f)
                ) and os.remove(r.path(f))
            records[stage.name] = dict(start=r.fingerprint(stage), done=False)
            write_json(r.path("stages.json"), records)
    r.sync()
    r.progress.update(stage=stage.name, step=None)
    reads = {}
    seen = dataclasses.replace(r, cfg=Reading(r.cfg, reads), reads=reads)
    skipped = stage.run(seen) if stage.all_ranks or r.rank == 0 else None
    r.sync()
    if r.rank == 0:
        t0, files = time.time(), {f: sha256(r.path(f)) for f in stage.files if r.has(f)}
        if time.time() - t0 > 1:
            print(f"[{stage.name}] digests of its files: {time.time() - t0:.1f} s")
        records = r.records()
        records[stage.name].update(reads=reads, files=files, done=True, skipped=skipped or "")
        write_json(r.path("stages.json"), records)
    r.sync()


def lock(out):
    """One run per folder: hold an exclusive lock on out/.lock while this process lives (the OS drops it when
    the process ends, however it ends), and remove the temporary files a killed run left."""
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise ValueError(
            f"{out} is in use by another distill.py (pid {f.read().strip() or '?'}): wait for it to finish "
            "or give another --out-dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    for tmp in glob.glob(os.path.join(out, "*.tmp*")):  # atomic_write's and save_progress's, of a killed run
        remove(tmp)
    return f


# ----------------------------------------------------------------------------- memory: each stage simulated
GiB = 2**30


class LiveBytes(TorchDispatchMode):
    """The bytes tensor storages hold, now and at the peak. Every storage an op creates counts from its
    creation until Python frees it, so autograd's saved tensors, gradients, optimizer state and autocast's
    casts all count. Under FakeTensorMode tensors have shapes and dtypes but no memory: a stage's own code
    at its real shapes then gives the bytes a GPU would hold, short of the caching allocator's slack and
    the CUDA context. No value is computed: one read back (.item(), a bool) reads as 1 (True)."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = self.host_now = self.host_peak = 0  # the device's bytes; the host's
        self.live, self.share = {}, {}  # id(storage) -> (in host memory, bytes counted), share of its bytes
        self.on_host = False  # tensors made now are in host memory (SimRun.on_host)

    def count(self, t, share=1.0, host=False):
        """Count t's storage at `share` of its bytes (an FSDP2 shard), from now until it is freed, as host
        memory or the device's."""
        st = t.untyped_storage()
        if id(st) not in self.live:
            self.live[id(st)] = (host, 0)
            weakref.finalize(st, self.free, id(st))
        n = int(st.nbytes() * share)
        self.add(host, n - self.live[id(st)][1])
        self.live[id(st)], self.share[id(st)] = (host, n), share

    def add(self, host, n):
        if host:
            self.host_now += n
            self.host_peak = max(self.host_peak, self.host_now)
        else:
            self.now += n
            self.peak = max(self.peak, self.now)

    def rehome(self, t, host):
        """t's storage, counted, moves to host memory or the device."""
        was, n = self.live[id(t.untyped_storage())]
        self.add(was, -n)
        self.add(host, n)
        self.live[id(t.untyped_storage())] = (host, n)

    def free(self, key):
        host, n = self.live.pop(key)
        self.add(host, -n)
        del self.share[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return True if args[0].dtype == torch.bool else 1
        out = func(*args, **(kwargs or {}))
        # a tensor made like a shard (AdamW's state of a sharded parameter) is a shard too
        like = func in (torch.ops.aten.zeros_like.default, torch.ops.aten.empty_like.default)
        share = self.share.get(id(args[0].untyped_storage()), 1.0) if like else 1.0
        # what is computed from host tensors is in host memory (a real run keeps each op on one device)
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        host = self.on_host or any(self.live.get(id(t.untyped_storage()), (False,))[0] for t in inputs)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in self.live:
                self.count(t, share, host)
        return out

    @contextlib.contextmanager
    def host(self):
        self.on_host = True
        try:
            yield
        finally:
            self.on_host = False


def build(cfg, dtype, device="cpu"):
    """A randomly initialised Model in dtype (the simulation's stand-in for a loaded one)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Model(cfg).eval()
    finally:
        torch.set_default_dtype(default)


@dataclass
class SimRun(Run):
    """A Run made inside FakeTensorMode: the stages run their own code at the real shapes, but read random
    token ids, build a model where a real run loads one, write nothing, run one micro-batch per step or
    loop and train two steps (the second with AdamW's state resident); further micro-batches and steps
    repeat the same allocations. Under --fsdp, what one rank holds is counted (fsdp_shares)."""

    lb: LiveBytes = None
    written_json: dict = field(default_factory=dict)

    @classmethod
    def make(cls, cfg, tcfg, kd_tcfg, world, micro, lb):
        rows = micro * world
        cfg = dataclasses.replace(
            cfg,
            device="cpu",  # fake CPU tensors; the precision stays the one the real device would use
            precision="bf16" if amp_dtype(cfg) else "fp32",
            rope_rule="high",  # 2norm's pairs depend on values; the shapes are the same
            **dict(batch_size=rows, kd_batch_size=rows, dpo_batch_size=rows, smart_batches=1, eval_batches=1),
            **dict(ild_steps=2, ild_mla_steps=0, kd_steps=2, dpo_steps=2, dpo_pairs=8, log_every=10**9),
        )
        dtype = teacher_dtype(cfg)
        teacher = build(tcfg, dtype).requires_grad_(False)
        kd_teacher = teacher if kd_tcfg is None else build(kd_tcfg, dtype).requires_grad_(False)
        prompt = [{"role": "user", "content": "x" * 64}]  # a short first turn, as the corpus's
        meta = dict(prompts=[prompt] * cfg.dpo_pairs)
        tok = convert.Tokenizer.byte_level()
        rows_per_forward = defaultdict(lambda: micro)
        return cls(cfg, 0, world, "(simulated)", tok, (teacher, kd_teacher), meta, rows_per_forward, lb=lb)

    def load(self, name, dtype=None, device=None):  # init_mla.pt, ild_m2.pt: one kind; hybrid_init.pt: both
        kind, L = name[:-3].split("_")[-1], self.teacher.cfg.n_layer
        kinds = [kind] * L if kind in ("mla", "m2") else convert.hybrid_kinds(L, self.teacher.cfg.mla_layers)
        cfg = dataclasses.replace(self.teacher.cfg, kinds=kinds)
        return build(cfg, dtype or weights_dtype(self.cfg))

    def on_host(self, x):  # a copy (under host_memory)
        return x.clone() if isinstance(x, torch.Tensor) else build(x.cfg, x.embed_tokens.weight.dtype)

    def host_memory(self):
        return self.lb.host()

    def move(self, model, to_host):
        for t in [*model.parameters(), *model.buffers()]:
            self.lb.rehome(t, to_host)

    def on_device(self, model):  # a copy on the device; the host's copy is dropped
        return build(model.cfg, model.embed_tokens.weight.dtype)

    def save(self, name, model, step, **extra):
        pass

    def save_progress(self, stage, model, opt, sched, step, history):
        pass

    def resume(self, stage, model, opt, sched):
        return 0, []

    def write_json(self, name, obj):
        self.written_json[name] = obj

    def read_json(self, name, shape=None):  # smart.json before SMART has run here: the size's layers
        return self.written_json.get(name, dict(chosen=self.teachers[0].cfg.mla_layers))

    def has(self, name):
        return True

    def batch(self, split, step, micro=0, n_micro=1):
        size = stage_batch(self.cfg, split) // self.world
        rows = len(batch_rows(step, size, size, 0, 1, micro, n_micro))
        return torch.randint(0, self.teacher.cfg.vocab_size, (rows, self.cfg.seq_len))

    def first_batches(self, split, n):  # one micro-batch of SMART's or the evaluation's loop
        return [torch.randint(0, self.teacher.cfg.vocab_size, (self.micro[split], self.cfg.seq_len))]

    def dpo_pairs(self):
        """The default pairs' generation at its batch, then pairs of seq_len tokens (the longest kept)."""
        student = self.load("kd.pt", teacher_dtype(self.cfg))
        build_dpo_pairs(self.kd_teacher, student, self.tok, self.meta["prompts"], self.cfg.dpo_max_new)
        del student
        half = [1] * (self.cfg.seq_len // 2)
        pair = dict(prompt="", chosen="", rejected="", prompt_ids=half, chosen_ids=half, rejected_ids=half)
        return [pair] * self.cfg.dpo_batch_size, ""

    def wrap(self, model):
        if self.cfg.fsdp and self.world > 1:
            fsdp_shares(model, self.lb, self.world, amp_dtype(self.cfg) or weights_dtype(self.cfg))
        return model

    def sync(self):
        pass


def fsdp_shares(model, lb, world, dtype):
    """Count what one of `world` FSDP2 ranks holds of a model it trains (wrap_model): 1/world of the fp32
    parameters, gradients and AdamW state, and one block's parameters at a time, gathered in the compute
    dtype for its forward and again for its backward. The simulation computes with the whole parameters
    cast to the compute dtype, each counted as the fp32 shard it stands for."""
    share = 4 / dtype.itemsize / world
    for p in model.parameters():
        p.data = p.data.to(dtype)
        lb.count(p, share)
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: lb.count(p.grad, share))
    for block in model.layers:
        n = sum(p.numel() for p in block.parameters())

        def gather(module, *_, n=n):
            module.gathered = torch.empty(n, dtype=dtype)

        def release(module, *_):
            module.gathered = None

        block.register_forward_pre_hook(gather)
        block.register_forward_hook(release)
        block.register_full_backward_pre_hook(gather)
        block.register_full_backward_hook(release)


def simulate(stage, cfg, tcfg, kd_tcfg, world, micro):
    """(peak, start, host): device bytes alive at the peak of one process running `stage` (a Stage) with
    `micro` rows (DPO: pairs) per forward, and at its start (the teachers); host memory's peak."""
    with FakeTensorMode(allow_non_fake_inputs=True), LiveBytes() as lb, quiet():
        r = SimRun.make(cfg, tcfg, kd_tcfg, world, micro, lb)
        start = lb.peak = lb.now  # not the transients of building the teachers
        stage.run(r)
    return lb.peak, start, lb.host_peak


@contextlib.contextmanager
def quiet():
    """No bars, prints or warnings from the stages while they are simulated."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield


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


def micro_rows(cfg, stage, world):
    """Rows (DPO: pairs) a process runs per step of `stage`: its share of a training step's global batch;
    SMART's and the evaluation's batches (rank 0 alone); None for a stage that runs no batches."""
    if stage in ("smart", "eval"):
        return cfg.batch_size
    return stage_batch(cfg, stage) // world if stage in ("ild_mla", "ild_m2", "kd", "dpo") else None


def memory_plan(cfg, tcfg, world, kd_tcfg=None, stages=STAGES):
    """Each stage's peak per process, simulated (simulate), and the micro-batch of each batched stage: the
    most rows whose peak stays within 90 % of the budget (the rest: allocator slack, CUDA context). Past
    what does not grow with the rows, the peak grows linearly in them, so the line through the peaks at 1
    row and at the whole batch never underestimates between them: the rows it allows fit. --micro-batch
    fixes the split instead. -> {stage: dict(peak, start, host, micro, n_micro)}, host: host memory's peak."""
    room, plan = 0.9 * memory_budget(cfg)[0], {}
    one_memory = not (cfg.memory_gb or cfg.device.startswith("cuda"))  # a CPU run: host is the device

    def sim(stage, micro):
        peak, start, host = simulate(stage, cfg, tcfg, kd_tcfg, world, micro)
        return (peak + host, start, 0) if one_memory else (peak, start, host)

    for stage in tqdm(stages, desc="memory plan (simulated)", leave=False):
        rows = micro_rows(cfg, stage.name, world)
        if rows is None:  # no batches: the calibration rows of init
            plan[stage.name] = dict(zip(("peak", "start", "host"), sim(stage, 4)))
            continue
        micro = min(rows, cfg.micro_batch or rows)
        peak, start, host = sim(stage, micro)
        if peak > room and micro > 1 and not cfg.micro_batch:
            one = sim(stage, 1)[0]
            micro = max(1, min(micro - 1, 1 + int((room - one) * (micro - 1) // (peak - one))))
        n_micro = math.ceil(rows / micro)
        if math.ceil(rows / n_micro) != rows:  # as even as the micro-batches go
            micro = math.ceil(rows / n_micro)
            peak, start, host = sim(stage, micro)
        plan[stage.name] = dict(peak=peak, start=start, host=host, micro=micro, n_micro=n_micro)
    return plan


def dtype_name(dtype):
    return {None: "off", torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def print_plan(cfg, plan, world):
    """The plan as a table: per stage the simulated peak per process, its share of the budget, the bytes
    alive when it starts (teachers), and its split of rows."""
    budget, where = memory_budget(cfg)
    print(
        f"memory plan: --size {cfg.size}, {world} process(es){' (FSDP2)' if cfg.fsdp else ''}, "
        f"budget {where}, seq_len {cfg.seq_len}, autocast {dtype_name(amp_dtype(cfg))}, "
        f"teacher {dtype_name(teacher_dtype(cfg))}"
    )
    head = f"{'stage':<13}{'peak GiB':>9}{'of budget':>10}{'at start':>9}{'host':>7}"
    print(f"{head}  rows per forward x micro-batches")
    for name, p in plan.items():
        split = f"{p['micro']} x {p['n_micro']}" if "micro" in p else "-"
        ranks = " (rank 0)" if name in ("smart", "eval") else f" x {world} rank(s)" if "micro" in p else ""
        over = "  EXCEEDS 90 % OF THE BUDGET" if p["peak"] > 0.9 * budget else ""
        print(
            f"{name:<13}{p['peak'] / GiB:>9.2f}{100 * p['peak'] / budget:>9.1f}%{p['start'] / GiB:>9.2f}"
            f"{p['host'] / GiB:>7.1f}  {split}{ranks}{over}"
        )
    print("GiB per process: the tensors alive, simulated at the real shapes on tensors that hold no memory;")
    print("host: the peak of what a stage builds in host memory (init, the compositions), not in the budget")


def plan_micro_batches(cfg, tcfg, world, rank, kd_tcfg=None):
    """Once the teacher is loaded: each stage's rows per forward. On CUDA (or with
    --memory-gb) from the memory plan, printed by rank 0, and a stage that does not fit with one row stops
    the run before any work (unless --micro-batch); on the CPU the whole batch (the CPU presets fit a
    laptop's RAM; --plan simulates them too). A global batch that does not split evenly over the ranks is
    an error."""
    for stage, flag in (("ild", "--batch-size"), ("kd", "--kd-batch-size"), ("dpo", "--dpo-batch-size")):
        if stage_batch(cfg, stage) % world:
            raise ValueError(
                f"{flag} {stage_batch(cfg, stage)} is not a multiple of the {world} processes: every rank "
                "takes an equal share of the global batch"
            )
    if not (cfg.device.startswith("cuda") or cfg.memory_gb):
        return {s.name: cfg.micro_batch or micro_rows(cfg, s.name, world) or 1 for s in STAGES}
    budget, plan = memory_budget(cfg)[0], {}
    for stage in STAGES:  # stage by stage: one that does not fit stops the plan there
        plan |= memory_plan(cfg, tcfg, world, kd_tcfg, [stage])
        p = plan[stage.name]
        if p["peak"] > 0.9 * budget and not cfg.micro_batch:
            raise ValueError(
                f"stage {stage.name} needs ~{p['peak'] / GiB:.1f} GiB per device with {p.get('micro', 1)} "
                f"row(s) per forward, more than 90 % of the {budget / GiB:.1f} GiB budget: use more GPUs "
                "(torchrun, --fsdp), a shorter --seq-len, or --micro-batch 1 to try anyway"
            )
    if rank == 0:
        print_plan(cfg, plan, world)
    return {s: p.get("micro", 1) for s, p in plan.items()}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError, OSError, MemoryError) as e:
        sys.exit(f"error: {e}")
