"""Chat with any zebra checkpoint: the teacher, a converted student, or the distilled hybrid.

Decoding uses each layer kind's own cache, as the official Zebra-Llama inference code does: a KV
cache for attention, the latent [c ; k^R] rows for MLA, the constant conv + SSM state for Mamba2, with
the Triton decode kernels on CUDA and plain torch elsewhere. Prompts of one batch may differ
in length: each is prefilled into its own cache row and the rows then decode together at their own
positions.
A decode step makes no host synchronisation, so `--compile` can compile it with torch.compile
(CUDA graphs on a GPU, as gpt-fast does). Weights are bf16 where the hardware multiplies bf16 natively
(`--precision auto`: CUDA, or a CPU with AVX512-BF16 or AMX), else fp32; Mamba2's per-head scalars and SSM
state stay fp32 in both. A prompt of more than PREFILL_CHUNK tokens prefills in chunks, under a progress bar.

  python generate.py                              # newest distilled model of out/135m (run distill.py first)
  python generate.py --teacher 135m --prompt "What is the capital of France?"
  python generate.py --ckpt out/135m/kd.pt --prompt "Hi" --prompt "Name a color" --temperature 0.7 --top-p 0.9
  python generate.py --teacher 135m --no-chat --prompt "The capital of Spain is" --compile
  python generate.py --ckpt DIR                   # a directory written by `convert.py --export`
  python generate.py --teacher 135m --precision fp32   # fp32 even where bf16 is native (default: auto)
"""

import argparse
import functools
import math
import os
import sys

import torch
from tqdm import tqdm

from convert import Tokenizer, load_teacher, load_zebra
from model import SIZES, cpu_has_bf16

STAGES_NEWEST_FIRST = ("dpo", "kd")


def newest_checkpoint(out_dir, size):
    """The file of the newest distilled stage in out_dir/size."""
    found = [os.path.join(out_dir, size, f"{s}.pt") for s in STAGES_NEWEST_FIRST]
    path = next((p for p in found if os.path.isfile(p)), None)
    if path is None:
        raise FileNotFoundError(
            f"no distilled model in {os.path.join(out_dir, size)}: run `python distill.py "
            f"--size {size}` first, or pass --ckpt PATH or --teacher {size}"
        )
    return path


def load_distilled(path, device="cpu", dtype=torch.float32):
    """-> (model, tokenizer, checkpoint dict) from a checkpoint file or an exported directory, in dtype but
    Mamba2's per-head scalars (Model.cast)."""
    model, ckpt = load_zebra(path)
    if ckpt.get("tokenizer") is None:
        raise ValueError(f"{path} carries no tokenizer; rewrite it with convert.py or distill.py")
    return model.cast(dtype, device).eval(), Tokenizer.from_spec(ckpt["tokenizer"]), ckpt


def load_model(ckpt=None, teacher=None, size="135m", out_dir="out", device="cpu", dtype=torch.float32):
    """-> (model, tokenizer) from a checkpoint file or exported directory, a teacher source, or the newest
    distilled stage of out_dir/size."""
    if teacher is None:
        return load_distilled(ckpt or newest_checkpoint(out_dir, size), device, dtype)[:2]
    model, tok = load_teacher(teacher)
    return model.cast(dtype, device).eval(), tok


PRECISIONS = ("auto", "fp32", "bf16")


def precision_dtype(precision, device):
    """--precision -> the weights' dtype. auto: bf16 where its matmuls are native (CUDA; a CPU with
    AVX512-BF16 or AMX, model.cpu_has_bf16), fp32 elsewhere, where bf16 runs emulated and slower than fp32.
    Mamba2's per-head scalars and SSM state stay fp32 in either (Model.cast, Model.allocate_cache)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        native = torch.device(device).type == "cuda" or cpu_has_bf16()
        return torch.bfloat16 if native else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


NUCLEUS = 1024  # the ids top-p reads first; a row whose best ids hold less than top_p sorts them all


def sample(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """logits (B, V) -> next ids (B,). temperature 0 = greedy; top_k keeps the k best ids; top_p keeps the
    smallest set of best ids whose probability reaches top_p (the best one always survives).
    E.g. probs [0.5, 0.3, 0.2] with top_p 0.7 keep ids {0, 1}, renormalised to [0.625, 0.375]."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)  # (B, V)
    if top_k <= 0 and top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    # the best ids by topk: for 64 rows of 49k ids 6 ms here, where a sort of the vocabulary takes 126 ms
    best, ids = probs.topk(min(top_k or NUCLEUS, probs.shape[-1]), dim=-1)  # (B, k) each, best first
    if top_k:
        best = best / best.sum(-1, keepdim=True)  # top_p is a share of what top_k kept
    nxt = nucleus(best, ids, top_p, generator)
    short = (best.sum(-1) < top_p) & (top_k <= 0)  # (B,) rows whose nucleus reaches past the best ids
    if short.any():  # ~1 row in 5 of SmolLM2-135M at temperature 1
        nxt[short] = nucleus(*probs[short].sort(dim=-1, descending=True), top_p, generator)
    return nxt


def nucleus(probs, ids, top_p, generator):
    """probs (B, k) best first and their ids (B, k) -> one id per row, drawn from the smallest best set
    whose mass reaches top_p."""
    if top_p < 1.0:
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)  # the mass before reaches top_p
    return ids.gather(-1, torch.multinomial(probs, 1, generator=generator))[:, 0]


PREFILL_CHUNK = 1024  # prompt tokens per prefill forward; a longer prompt goes in chunks, with a progress bar


@torch.no_grad()
def prefill(model, prompts, max_len, chunk=PREFILL_CHUNK):
    """Prefill each prompt into its own row of one batch cache -> (cache, last-token logits (B, V)). A prompt
    of more than `chunk` tokens goes in chunks that each continue the row's cache (the logits of one
    prefill, up to rounding), with a progress bar over its tokens; only the last chunk computes logits."""
    device = model.embed_tokens.weight.device
    cache = model.allocate_cache(len(prompts), max_len)
    last = []
    for b, p in enumerate(prompts):
        row, ids = cache.rows(slice(b, b + 1)), torch.tensor([p], device=device)  # ids (1, T)
        bar = tqdm(total=len(p), unit="tok", desc="prefill", leave=False, disable=len(p) <= chunk)
        for start in range(0, len(p), chunk):
            end = min(start + chunk, len(p))
            logits = model(ids[:, start:end], cache=row, logits=end == len(p))  # None before the last chunk
            bar.update(end - start)
        bar.close()
        last.append(logits[0, -1])
    return cache, torch.stack(last)


@torch.no_grad()
def decode_one(model, tokens, cache):
    """tokens (B,) continue every sequence of the cache by one position -> logits (B, V). No host sync."""
    return model(tokens[:, None], cache=cache)[:, -1]


@functools.cache
def compiled_decode_one(device_type):
    """decode_one compiled by torch.compile, once per process: "reduce-overhead" (CUDA graphs, as gpt-fast)
    on a GPU, inductor's default mode on the CPU. A new cache length or batch size compiles once more."""
    return torch.compile(decode_one, mode="reduce-overhead" if device_type == "cuda" else None)


def generate(
    model,
    prompts,
    max_new_tokens=256,
    stop_ids=(),
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    seed=None,
    n_vocab=None,
    step=decode_one,
):
    """Yield the next token of every sequence (a (B,) tensor) until all hit a stop id or max_new_tokens.
    A finished sequence keeps yielding its stop id so positions stay aligned. n_vocab: ids >= n_vocab
    (a model vocabulary padded past its tokenizer's) are never sampled. step: decode_one, or a compiled
    version of it (compiled_decode_one)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    # the one length check of a generation: decode steps attend over the whole cache and check nothing
    max_len = max(len(p) for p in prompts) + max_new_tokens
    if max_len > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt of {max(len(p) for p in prompts)} tokens + {max_new_tokens} new tokens exceeds the "
            f"model's context of {model.cfg.max_seq_len}; shorten the prompt or lower --max-new-tokens"
        )
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    cache, logits = prefill(model, prompts, max_len)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=logits.device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=logits.device)
    for _ in range(max_new_tokens):
        nxt = sample(logits[:, :n_vocab].cpu(), temperature, top_k, top_p, gen).to(logits.device)
        nxt = torch.where(done, stop[0] if len(stop) else nxt, nxt)
        yield nxt
        done |= torch.isin(nxt, stop)
        if done.all():
            return
        logits = step(model, nxt, cache)


def reply_ids(model, tok, prompts, stream=None, progress=False, **kw):
    """Generate for a batch of token prompts -> the reply ids per prompt; the end-of-turn id closes only the
    replies that ended within max_new_tokens. stream(text) gets row 0's text as it grows; progress shows a
    bar over the generated tokens. Ids the tokenizer lacks are never sampled."""
    out = [[] for _ in prompts]
    stop_ids = {tok.eos_id} - {None}
    tokens = generate(model, prompts, stop_ids=stop_ids, n_vocab=tok.n_vocab, **kw)
    if progress:
        tokens = tqdm(tokens, total=kw.get("max_new_tokens", 256), unit="tok", desc="generating", leave=False)
    for nxt in tokens:
        for b, t in enumerate(nxt.tolist()):
            if not out[b] or out[b][-1] not in stop_ids:
                out[b].append(t)
        if stream is not None and len(prompts) == 1 and out[0][-1] not in stop_ids:
            stream(tok.decode(out[0]))
    return out


def reply(model, tok, prompts, **kw):
    """reply_ids decoded to text, without the end-of-turn id."""
    return [tok.decode([t for t in ids if t != tok.eos_id]) for ids in reply_ids(model, tok, prompts, **kw)]


def fit_history(history, encode, budget):
    """The most recent turns of a chat that fit `budget` tokens -> (token ids, turns dropped from the front).
    Whole exchanges (user + assistant) go first; the newest user turn always stays, so ids may still be
    longer than budget when that turn alone is."""
    dropped, ids = 0, encode(history)
    while len(ids) > budget and len(history) - dropped > 1:
        dropped += 2
        ids = encode(history[dropped:])
    return ids, dropped


# ----------------------------------------------------------------------------- command line
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 1, like every other error of this script
        self.exit(1, f"error: {message} (see --help)\n")


def checked(kind, ok, want):
    """An argparse type: parse with kind, then require ok(value), else say what is wanted."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value

    return parse


def device_arg(text):
    """cpu, cuda or cuda:N, refused when this torch build or machine cannot run it."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported: use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise argparse.ArgumentTypeError(f"{text}: {why}; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} GPU(s) visible")
    return device


def parse_args(argv=None):
    p = Parser(description="Chat with a zebra checkpoint or its teacher.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--ckpt", help="checkpoint file or exported directory (default: newest of --size)")
    source.add_argument("--teacher", help="chat with the teacher: a size key (135m, tiny) or a Llama path")
    p.add_argument(
        "--size", default="135m", choices=list(SIZES), help="size whose newest model to load (135m)"
    )
    p.add_argument("--out-dir", default="out", help="where distill.py wrote its checkpoints (default: out)")
    p.add_argument("--prompt", action="append", help="one reply per prompt (repeatable); none = chat")
    bool_flag = argparse.BooleanOptionalAction
    p.add_argument("--chat", action=bool_flag, default=True, help="chat template (default) or raw text")
    positive = checked(int, lambda v: v > 0, "a positive integer")
    p.add_argument("--max-new-tokens", type=positive, default=256, help="tokens per reply (default: 256)")
    temperature = checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
    p.add_argument(
        "--temperature", type=temperature, default=0.0, help="sampling temperature; 0 = greedy (default)"
    )
    top_k = checked(int, lambda v: v >= 0, "an integer >= 0")
    p.add_argument("--top-k", type=top_k, default=0, help="keep the k likeliest ids; 0 = all (default)")
    top_p = checked(float, lambda v: 0 < v <= 1, "a probability in (0, 1]")
    p.add_argument("--top-p", type=top_p, default=1.0, help="nucleus mass in (0, 1]; 1 = off (default)")
    p.add_argument("--seed", type=int, default=None, help="sampler seed (default: random)")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument(
        "--device", type=device_arg, default=default_device, help="cpu or cuda[:N] (default: cuda if any)"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="weights' dtype; auto (default): bf16 on CUDA and on CPUs with native bf16, else fp32",
    )
    p.add_argument(
        "--compile",
        action=bool_flag,
        default=False,
        help="torch.compile the decode step (CUDA graphs on a GPU); the first reply waits (minutes on a CPU)",
    )
    return p.parse_args(argv)


def stream_printer():
    """A stream callback that prints only the new suffix of a growing reply."""
    shown = [0]

    def show(text):  # held back while a multi-byte character is incomplete
        if not text.endswith("\ufffd"):
            print(text[shown[0] :], end="", flush=True)
            shown[0] = len(text)

    return show


def chat_loop(model, tok, encode_prompt, chat, kw):
    """Interactive chat; when the history outgrows the context, the oldest turns are dropped (said once)."""
    budget = model.cfg.max_seq_len - kw["max_new_tokens"]
    history, warned = [], False
    print("interactive chat; empty line or Ctrl-D to quit")
    while True:
        try:
            q = input("> ").strip()
        except EOFError:
            break
        if not q:
            break
        turn = {"role": "user", "content": q}
        ids, dropped = fit_history(history + [turn], tok.chat, budget) if chat else (encode_prompt(q), 0)
        if len(ids) > budget:
            print(f"error: this message takes {len(ids)} tokens, the context leaves {budget}: shorten it")
            continue
        if dropped and not warned:
            print("(the chat outgrew the model's context: the oldest turns are dropped from now on)")
            warned = True
        history = history[dropped:] + [turn]
        text = reply(model, tok, [ids], stream=stream_printer(), **kw)[0]
        print()
        history.append({"role": "assistant", "content": text})


def main(argv=None):
    a = parse_args(argv)
    dtype = precision_dtype(a.precision, a.device)
    if dtype == torch.bfloat16 and a.device.type == "cpu" and not cpu_has_bf16():
        print("note: this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 runs emulated, slower than fp32")
    model, tok = load_model(a.ckpt, a.teacher, a.size, a.out_dir, a.device, dtype)
    if a.max_new_tokens >= model.cfg.max_seq_len:
        raise ValueError(
            f"--max-new-tokens {a.max_new_tokens} leaves no room for a prompt in the model's context of "
            f"{model.cfg.max_seq_len} tokens"
        )
    kw = dict(
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        seed=a.seed,
        step=compiled_decode_one(a.device.type) if a.compile else decode_one,
    )

    def encode_prompt(q):
        if a.chat:
            return tok.chat([{"role": "user", "content": q}])
        return ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(q)

    if not a.prompt:
        chat_loop(model, tok, encode_prompt, a.chat, kw)
    elif len(a.prompt) == 1:
        reply(model, tok, [encode_prompt(a.prompt[0])], stream=stream_printer(), **kw)
        print()
    else:
        prompts = [encode_prompt(q) for q in a.prompt]
        for q, text in zip(a.prompt, reply(model, tok, prompts, progress=True, **kw)):
            print(f"> {q}\n{text}\n")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
