"""Chat with any zebra checkpoint: the teacher, a converted student, or the distilled hybrid.

Decoding uses each layer kind's own cache (paper.md §16): a KV cache for attention, the latent
[c ; k^R] rows for MLA, the constant conv + SSM state for Mamba2, with the Triton decode kernels on
CUDA and the torch references elsewhere. Prompts of one batch may differ in length: each is
prefilled into its own cache row and the rows then decode together at their own positions.

  python generate.py                              # newest distilled model of out/135m (run distill.py first)
  python generate.py --teacher 135m --prompt "What is the capital of France?"
  python generate.py --ckpt out/135m/kd.pt --prompt "Hi" --prompt "Name a color" --temperature 0.7 --top-p 0.9
  python generate.py --teacher 135m --chat false --prompt "The capital of Spain is"
"""

import argparse
import os
import sys

import torch

from convert import Tokenizer, load_teacher
from model import load_checkpoint

STAGES_NEWEST_FIRST = ("dpo", "kd")


def load_model(ckpt=None, teacher=None, size="135m", out_dir="out", device="cpu", dtype=torch.float32):
    """-> (model, tokenizer) from a checkpoint path, a teacher source, or the newest distilled stage."""
    if teacher is not None:
        model, tok = load_teacher(teacher)
    else:
        if ckpt is None:
            found = [os.path.join(out_dir, size, f"{s}.pt") for s in STAGES_NEWEST_FIRST]
            ckpt = next((p for p in found if os.path.isfile(p)), None)
            if ckpt is None:
                raise FileNotFoundError(
                    f"no distilled model in {os.path.join(out_dir, size)}: run `python distill.py "
                    f"--size {size}` first, or pass --ckpt PATH or --teacher {size}"
                )
        model, meta = load_checkpoint(ckpt)
        if meta.get("tokenizer") is None:
            raise ValueError(f"{ckpt} carries no tokenizer; rewrite it with convert.py or distill.py")
        tok = Tokenizer.from_spec(meta["tokenizer"])
    return model.to(device=device, dtype=dtype).eval(), tok


def sample(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """logits (B, V) -> next ids (B,). temperature 0 = greedy; top_k keeps the k best ids; top_p keeps the
    smallest set of best ids whose probability reaches top_p (the best one always survives).
    E.g. probs [0.5, 0.3, 0.2] with top_p 0.7 keep ids {0, 1}, renormalised to [0.625, 0.375]."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this id already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def prefill(model, prompts, max_len):
    """Prefill each prompt into its own row of one batch cache -> (cache, last-token logits (B, V))."""
    device = model.embed_tokens.weight.device
    cache = model.allocate_cache(len(prompts), max_len)
    last = [
        model(torch.tensor([p], device=device), cache=cache.rows(slice(b, b + 1)))[0, -1]
        for b, p in enumerate(prompts)
    ]
    return cache, torch.stack(last)


@torch.no_grad()
def decode_one(model, tokens, cache):
    """tokens (B,) continue every sequence of the cache by one position -> logits (B, V)."""
    return model(tokens[:, None], cache=cache)[:, -1]


def generate(model, prompts, max_new_tokens=256, stop_ids=(), temperature=0.0, top_k=0, top_p=1.0, seed=None):
    """Yield the next token of every sequence (a (B,) tensor) until all hit a stop id or max_new_tokens.
    A finished sequence keeps yielding its stop id so positions stay aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
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
        nxt = sample(logits.cpu(), temperature, top_k, top_p, gen).to(logits.device)
        nxt = torch.where(done, stop[0] if len(stop) else nxt, nxt)
        yield nxt
        done |= torch.isin(nxt, stop)
        if done.all():
            return
        logits = decode_one(model, nxt, cache)


def reply(model, tok, prompts, stream=None, **kw):
    """Generate for a batch of token prompts -> list of decoded replies; stream(text) gets row 0's text as it grows."""
    out = [[] for _ in prompts]
    for nxt in generate(model, prompts, stop_ids={tok.eos_id}, **kw):
        for b, t in enumerate(nxt.tolist()):
            if not out[b] or out[b][-1] != tok.eos_id:
                out[b].append(t)
        if stream is not None and len(prompts) == 1 and out[0][-1] != tok.eos_id:
            stream(tok.decode(out[0]))
    return [tok.decode([t for t in o if t != tok.eos_id]) for o in out]


def main(argv=None):
    p = argparse.ArgumentParser(description="Chat with a zebra checkpoint or its teacher.")
    p.add_argument("--ckpt", help="a checkpoint of any stage (default: newest distilled model of --size)")
    p.add_argument("--teacher", help="chat with the teacher itself: a size key (135m, tiny) or a Llama path")
    p.add_argument("--size", default="135m", help="size whose newest distilled model to load (default 135m)")
    p.add_argument("--out-dir", default="out", help="where distill.py wrote its checkpoints")
    p.add_argument(
        "--prompt", action="append", help="one reply per prompt (repeat for a batch); none = interactive chat"
    )
    p.add_argument("--chat", default="true", choices=["true", "false"], help="false = raw text completion")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    model, tok = load_model(a.ckpt, a.teacher, a.size, a.out_dir, a.device, dtype)
    kw = dict(
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed
    )
    chat = a.chat == "true"

    def encode(history_or_text):
        if chat:
            return tok.chat(history_or_text)
        return ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(history_or_text)

    def stream_printer():
        shown = [0]

        def show(text):  # print only the new suffix; held back while a multi-byte character is incomplete
            if not text.endswith("\ufffd"):
                print(text[shown[0] :], end="", flush=True)
                shown[0] = len(text)

        return show

    if a.prompt:
        msgs = [[{"role": "user", "content": q}] if chat else q for q in a.prompt]
        if len(msgs) == 1:
            text = reply(model, tok, [encode(msgs[0])], stream=stream_printer(), **kw)[0]
            print()
        else:
            for q, text in zip(a.prompt, reply(model, tok, [encode(m) for m in msgs], **kw)):
                print(f"> {q}\n{text}\n")
        return
    history = []
    print("interactive chat; empty line or Ctrl-D to quit")
    while True:
        try:
            q = input("> ").strip()
        except EOFError:
            break
        if not q:
            break
        history.append({"role": "user", "content": q})
        text = reply(model, tok, [encode(history if chat else q)], stream=stream_printer(), **kw)[0]
        print()
        history.append({"role": "assistant", "content": text})


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
