"""generate.py: cached greedy = recomputed greedy, batch = one by one, compiled = eager, the decode step with
its Triton kernels is one graph, sampling uses its arguments, ids past the tokenizer are never sampled, the
chat keeps the newest turns, arguments are checked.
Run: python -m pytest tests/test_generate.py"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from functools import partial

import pytest
import torch
from test_model import flip_weight_byte

import convert
import generate as G
import model as M
from convert import Tokenizer


def hybrid(**kw):
    torch.manual_seed(0)
    return M.Model(M.size_config("tiny", kinds=["mla", "m2", "attn", "m2"], **kw)).eval()


def greedy_by_recompute(m, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_cached_greedy_equals_recomputing_the_full_sequence():
    # greedy tokens through prefill + cached decode = argmax of a full forward over the growing sequence
    m = hybrid()
    prompt = torch.randint(0, 272, (11,)).tolist()
    got = [int(t) for t in G.generate(m, [prompt], max_new_tokens=24)]
    assert got == greedy_by_recompute(m, prompt, 24)


def test_batch_of_ragged_prompts_equals_one_by_one():
    # prompts of lengths 3, 17 and 9 decoded together give each prompt's own tokens
    m = hybrid()
    prompts = [torch.randint(0, 272, (n,)).tolist() for n in (3, 17, 9)]
    batch = torch.stack(list(G.generate(m, prompts, max_new_tokens=12)), 1)  # (B, 12)
    for b, p in enumerate(prompts):
        assert batch[b].tolist() == [int(t) for t in G.generate(m, [p], max_new_tokens=12)]


def test_compiled_decode_gives_the_eager_greedy_tokens():
    # a torch.compile'd decode step (3-kind hybrid, 2 ragged rows) yields exactly the eager tokens.
    # backend aot_eager: dynamo capture + functionalised in-place cache writes, without inductor's C++
    # codegen, whose cold compile took 60-80 s on the 2-core CI machine (generate.py --compile uses it).
    torch.manual_seed(0)
    m = M.Model(M.size_config("tiny", n_layer=3, kinds=["mla", "m2", "attn"], tie_embeddings=False)).eval()
    prompts = [torch.randint(0, 272, (n,)).tolist() for n in (7, 4)]
    eager = torch.stack(list(G.generate(m, prompts, max_new_tokens=8)))
    step = torch.compile(G.decode_one, backend="aot_eager", fullgraph=True)
    compiled = torch.stack(list(G.generate(m, prompts, max_new_tokens=8, step=step)))
    assert len(set(eager.flatten().tolist())) > 4  # the tokens vary: a real comparison
    assert torch.equal(compiled, eager)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECODE_CACHES = (((7, 4), 16), ((5, 9, 2), 24))  # (prompt lengths, cache length) of the traced decode steps
DECODE_KERNELS = {  # the Triton kernels one decode step of each layer kind launches, in launch order
    "attn": [],
    "mla": ["_mla_decode_split_kernel", "_mla_decode_reduce_kernel"],
    "m2": ["_ssm_step_kernel"],
}


def test_decode_step_with_its_triton_kernels_is_one_graph():
    # Dynamo traces the whole decode step of the 3-kind hybrid, with the dispatchers on their Triton path as
    # on a GPU, into one graph (fullgraph=True: a graph break raises) that holds each layer's kernels in layer
    # order and reads no value back from a tensor: on 2 ragged prefilled rows at fixed sizes, then on 3 rows
    # of a longer cache, which Dynamo retraces with symbolic sizes. A graph break would split generate.py
    # --compile's CUDA graphs; a read-back (.item(), int(t), bool(t): Dynamo keeps those in the graph as
    # unbacked symbols, no break) is a host sync, which a CUDA graph cannot capture.
    # In a child process: conftest's TRITON_INTERPRET=1 makes every kernel an interpreted function, which
    # Dynamo cannot trace, only a @triton.jit one.
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=path)
    res = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    lines = res.stdout.strip().splitlines()
    assert res.returncode == 0 and lines, res.stdout[-4000:] + res.stderr[-4000:]
    want = {"kernels": [k for kind in hybrid().cfg.kinds for k in DECODE_KERNELS[kind]], "reads": []}
    assert json.loads(lines[-1]) == [dict(want, symbolic=False), dict(want, symbolic=True)]


def traced_decode_kernels():
    """Child of the test above: the decode step of `hybrid()` traced on each cache of DECODE_CACHES -> per
    trace {"kernels": the Triton kernels of its one graph, "reads": its nodes that read a value back from a
    tensor, "symbolic": whether its input sizes are symbols}."""
    import torch.utils._triton
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch.fx.experimental.symbolic_shapes import free_symbols, free_unbacked_symbols

    import mla
    import ssm_scan

    m = hybrid()
    prefilled = [
        G.prefill(m, [torch.randint(0, 272, (n,)).tolist() for n in ns], S) for ns, S in DECODE_CACHES
    ]
    # no device here for Triton to compile for, so torch reports none and Dynamo would not take @triton.jit
    # functions for kernels; the trace only records their launches and never runs one
    torch.utils._triton.has_triton = lambda: True
    # the dispatch a GPU makes: decode runs without gradients, so "auto" takes Triton for CUDA tensors
    for mod in (ssm_scan, mla):
        mod.use_triton = lambda backend, tensors, state_dtype=None: backend == "auto"

    class Traced(Exception):  # raised in place of running the graph
        pass

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            raise Traced

        return run

    # the second cache fails the first graph's shape guards: Dynamo retraces with the changed sizes as
    # symbols (automatic dynamic shapes), as generate.py --compile does for a new batch or max_len
    step = torch.compile(G.decode_one, backend=record, fullgraph=True)
    out = []
    for cache, logits in prefilled:
        with pytest.raises(Traced):
            step(m, logits.argmax(-1), cache)
        nodes = list(graphs[-1].graph.nodes)
        kernels = [n for n in nodes if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target)]
        out.append(
            {
                "kernels": [
                    kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in kernels
                ],
                "reads": [
                    n.format_node() for n in nodes if free_unbacked_symbols(n.meta.get("example_value"))
                ],
                "symbolic": any(
                    free_symbols(n.meta["example_value"]) for n in nodes if n.op == "placeholder"
                ),
            }
        )
    assert len(graphs) == len(prefilled)
    return out


def test_chunked_prefill_gives_the_logits_of_one_prefill(capsys):
    # prompts of 37 and 5 tokens prefilled in chunks of 8 give one prefill's last logits and caches (to
    # rounding) and the same greedy continuation; only the prompt longer than a chunk shows a bar
    m = hybrid()
    prompts = [torch.randint(0, 272, (n,)).tolist() for n in (37, 5)]
    cache1, last1 = G.prefill(m, prompts, 60)
    cache8, last8 = G.prefill(m, prompts, 60, chunk=8)
    assert "prefill" in capsys.readouterr().err
    assert (last8 - last1).abs().max() <= 1e-4 and torch.equal(cache8.pos, cache1.pos)
    for a, b in zip(cache1.layers, cache8.layers):
        assert all((x - y).abs().max() <= 1e-4 for x, y in zip(a, b))
    G.prefill(m, prompts[1:], 60, chunk=8)
    assert "prefill" not in capsys.readouterr().err
    steps = [G.decode_one(m, last.argmax(-1), cache) for last, cache in ((last1, cache1), (last8, cache8))]
    assert torch.equal(steps[0].argmax(-1), steps[1].argmax(-1))


def test_bf16_decode_stays_within_kl_of_fp32():
    # the tiny zebra hybrid (MLA and Mamba2 layers converted from the tiny teacher), made confident (final
    # norm x8: ~0.7 nats of entropy per token), reads an English sentence and greedily writes 64 tokens in
    # fp32; in bf16 (Model.cast) its prefill + 64 decode steps over that same text give next-token
    # distributions within KL(fp32 || bf16) 5e-3 per token on average and 0.1 at most of the fp32 full
    # forward's (measured: 2.1e-3 and 2.2e-2)
    teacher, tok = convert.load_teacher("tiny")
    teacher.cfg = convert.with_hybrid_fields(teacher.cfg, "tiny")
    mla, m2 = convert.make_student(teacher, "mla"), convert.make_student(teacher, "m2")
    m = convert.compose_hybrid(teacher, mla, m2, teacher.cfg.mla_layers).eval()
    with torch.no_grad():
        m.norm.weight.mul_(8)
    prompt = tok.encode(
        "The quick brown fox jumps over the lazy dog, and then it runs far away into the woods."
    )
    ids = [int(t) for t in G.generate(m, [prompt], max_new_tokens=64)]
    with torch.no_grad():
        ref = m(torch.tensor([prompt + ids]))[0, len(prompt) - 1 : -1].log_softmax(-1)  # (64, V)
    low = M.Model.from_state_dict(m.cfg, m.state_dict()).cast(torch.bfloat16)
    cache, logits = G.prefill(low, [prompt], len(prompt) + 64)
    steps = [logits] + [G.decode_one(low, torch.tensor([t]), cache) for t in ids[:-1]]
    got = torch.cat(steps).float().log_softmax(-1)  # (64, V)
    kl = (ref.exp() * (ref - got)).sum(-1)  # (64,)
    entropy = -(ref.exp() * ref).sum(-1).mean()
    assert 0.2 < entropy < 1.5 and kl.mean() < 5e-3 and kl.max() < 0.1, (entropy, kl.mean(), kl.max())


def test_precision_auto_is_bf16_where_its_matmuls_are_native(monkeypatch):
    # auto: bf16 on CUDA and on a CPU with native bf16, fp32 on other CPUs; fp32 and bf16 as asked
    monkeypatch.setattr(G, "cpu_has_bf16", lambda: False)
    got = [G.precision_dtype(p, d) for p, d in [("auto", "cpu"), ("auto", "cuda"), ("bf16", "cpu")]]
    assert got == [torch.float32, torch.bfloat16, torch.bfloat16]
    monkeypatch.setattr(G, "cpu_has_bf16", lambda: True)
    assert [G.precision_dtype(p, "cpu") for p in ("auto", "fp32")] == [torch.bfloat16, torch.float32]


def test_a_checkpoint_loaded_in_bf16_keeps_its_mamba2_scalars_fp32(tmp_path):
    # generate.py --precision bf16 loads the weights in bf16 but A_log, dt_bias and D as saved, in fp32
    m, path = saved_hybrid(tmp_path)
    loaded, _ = G.load_model(ckpt=path, dtype=torch.bfloat16)
    for name, p in loaded.named_parameters():
        scalar = name.rsplit(".", 1)[-1] in ("A_log", "dt_bias", "D")
        assert p.dtype == (torch.float32 if scalar else torch.bfloat16), name
        assert not scalar or torch.equal(p, m.get_parameter(name)), name


def test_stops_at_the_stop_token():
    # a stop id ends the generation right after it is yielded
    m = hybrid()
    first = int(next(G.generate(m, [[5, 6, 7]], max_new_tokens=5)))
    assert len(list(G.generate(m, [[5, 6, 7]], max_new_tokens=50, stop_ids={first}))) == 1


def test_ids_past_the_tokenizer_are_never_sampled():
    # tiny's model has 272 ids, its tokenizer 259: with the padded rows made the likeliest, sampling
    # without n_vocab picks them and with n_vocab=259 never does
    m = hybrid(tie_embeddings=False)
    with torch.no_grad():
        m.lm_head.weight[259:] *= 100
    prompts = [torch.randint(0, 259, (5,)).tolist() for _ in range(4)]
    free = torch.stack(list(G.generate(m, prompts, max_new_tokens=6, temperature=1.0, seed=0)))
    masked = torch.stack(list(G.generate(m, prompts, max_new_tokens=6, temperature=1.0, seed=0, n_vocab=259)))
    assert (free >= 259).any() and (masked < 259).all()


PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])  # 4000 draws from these in each sampling test


def sample_freq(**kw):
    """Empirical frequencies of the 4 ids over 4000 draws of G.sample from PROBS at temperature 1."""
    ids = G.sample(PROBS.log().expand(4000, 4), 1.0, generator=torch.Generator().manual_seed(0), **kw)
    return torch.bincount(ids, minlength=4).float() / len(ids)


def test_top_k_keeps_the_k_likeliest_renormalised():
    # top_k=2 samples only ids 0 and 1, in proportion 0.5 : 0.3
    f = sample_freq(top_k=2)
    assert f[2:].sum() == 0 and abs(f[0] - 0.5 / 0.8) < 0.03


@pytest.mark.parametrize("top_p,kept", [(0.7, 2), (0.9, 3)])  # {0, 1} reach 0.8 >= 0.7; {0} alone does not
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    # top_p samples the smallest likeliest set whose mass reaches top_p, renormalised, and no other id
    f, p = sample_freq(top_p=top_p), PROBS[0, :kept]
    assert f[kept:].sum() == 0 and torch.allclose(f[:kept], p / p.sum(), atol=0.03)


def test_top_p_past_the_nucleus_candidates_sorts_the_row():
    # 0.5 on id 0 and 0.5 spread over 3000 ids: top_p 0.9 keeps id 0 and 2400 others, more than the
    # NUCLEUS best ids, so id 0 is drawn at 0.5 / 0.9 (at 0.5 / 0.67 if only the NUCLEUS best were kept)
    probs = torch.cat([torch.tensor([0.5]), torch.full((3000,), 0.5 / 3000)])
    assert G.NUCLEUS < 2401
    ids = G.sample(probs.log().expand(8000, -1), 1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert abs((ids == 0).float().mean() - 0.5 / 0.9) < 0.02 and len(set(ids.tolist())) > G.NUCLEUS


def test_plain_sampling_follows_the_softmax():
    # without top_k/top_p even the 5 % id is drawn at its rate
    assert abs(sample_freq()[3] - 0.05) < 0.02


def test_temperature_zero_is_argmax():
    # temperature 0 takes the likeliest id, no randomness
    assert G.sample(PROBS.log().expand(2, 4), 0.0).tolist() == [0, 0]


def test_fit_history_drops_the_oldest_exchanges_first():
    # with one token per character, only the newest exchange + question fit in 12 tokens
    history = [
        {"role": r, "content": c}
        for r, c in zip(["user", "assistant"] * 2 + ["user"], "aaaa bbbb cccc dd eee".split())
    ]

    def encode(turns):
        return list("".join(t["content"] for t in turns))

    ids, dropped = G.fit_history(history, encode, 12)
    assert dropped == 2 and "".join(ids) == "ccccddeee"


def test_interactive_chat_outgrowing_the_context_keeps_going(monkeypatch, capsys):
    # three questions in a 150-token context: the chat drops old turns, says so once, answers all three
    m = hybrid()
    m.cfg.max_seq_len = 150
    tok = Tokenizer.byte_level()
    questions = iter(["hello there", "and how are you today", "what is the weather like", ""])
    monkeypatch.setattr("builtins.input", lambda prompt: next(questions))
    G.chat_loop(m, tok, None, True, dict(max_new_tokens=4))
    out = capsys.readouterr().out
    assert out.count("oldest turns are dropped") == 1 and "error" not in out and list(questions) == []


def saved_hybrid(tmp_path):
    m = hybrid()
    path = str(tmp_path / "kd.pt")
    M.save_checkpoint(path, m, "kd", 3, Tokenizer.byte_level())
    return m, path


def test_checkpoint_file_and_its_export_load_as_the_same_model(tmp_path):
    # --ckpt takes a checkpoint file or its convert.py --export folder: both give the saved model's logits
    m, path = saved_hybrid(tmp_path)
    convert.export(path, str(tmp_path / "exp"))
    idx = torch.randint(0, 259, (1, 12))
    with torch.no_grad():
        for ckpt in (path, str(tmp_path / "exp")):
            loaded, tok = G.load_model(ckpt=ckpt)
            assert torch.equal(loaded(idx), m(idx)) and tok.spec() == Tokenizer.byte_level().spec()


def test_several_prompts_print_every_reply(capsys):
    # the tiny teacher (272 ids, 259 in its tokenizer) answers two prompts in one batch, with a progress bar
    G.main("--teacher tiny --prompt hi --prompt hello --max-new-tokens 5 --device cpu".split())
    out, err = capsys.readouterr()
    assert "> hi\n" in out and "> hello\n" in out and "generating" in err


def test_precision_flag_sets_the_weights_dtype(monkeypatch, capsys):
    # --precision bf16 / fp32 load the weights in that dtype (auto is precision_dtype's, tested above)
    loads = []

    def load_model(*args):
        loads.append(args[-1])
        return hybrid(), Tokenizer.byte_level()

    monkeypatch.setattr(G, "load_model", load_model)
    for precision in ("bf16", "fp32"):
        G.main(["--teacher", "tiny", "--prompt", "hi", "--max-new-tokens", "2", "--precision", precision])
    assert loads == [torch.bfloat16, torch.float32]


def test_boolean_options_are_flags():
    # --no-chat and --compile take no value
    a = G.parse_args(["--no-chat", "--compile"])
    assert a.chat is False and a.compile is True


# ----------------------------------------------------------------------------- bad input -> one clear error
def args(*argv):
    """Setup: generate.py's argument check on argv; a bad argument stops it at parse time with exit status 1
    and one stderr line "error: ...", which is raised again as SystemExit(that line)."""

    def call():
        with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()) as err:
            G.parse_args(list(argv))
        assert e.value.code == 1 and re.fullmatch("error: .*\n", err.getvalue()), err.getvalue()
        raise SystemExit(err.getvalue())

    return lambda tmp: call


def too_long(tmp):
    return partial(next, G.generate(hybrid(), [[1] * 500], max_new_tokens=20))


def damaged(tmp):
    _, path = saved_hybrid(tmp)
    flip_weight_byte(path)
    return partial(G.load_model, ckpt=path)


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="--device cuda is valid here")
BAD_INPUTS = [  # (case, setup(tmp_path) -> the call that must fail, error, message)
    ("prompt past the context", too_long, ValueError, "context of 512"),
    ("damaged checkpoint", damaged, ValueError, "kd.pt is damaged"),
    ("--top-p 0", args("--top-p", "0"), SystemExit, "--top-p: must be a probability"),
    ("--top-p 1.5", args("--top-p", "1.5"), SystemExit, "--top-p: must be a probability"),
    ("--temperature nan", args("--temperature", "nan"), SystemExit, "--temperature: must be a finite number"),
    ("--temperature -1", args("--temperature", "-1"), SystemExit, "--temperature: must be a finite number"),
    ("--top-k -3", args("--top-k", "-3"), SystemExit, "--top-k: must be an integer >= 0"),
    ("--max-new-tokens 0", args("--max-new-tokens", "0"), SystemExit, "--max-new-tokens: must be a positive"),
    ("--device tpu", args("--device", "tpu"), SystemExit, "--device: unknown device 'tpu'"),
    ("--chat false", args("--chat", "false"), SystemExit, "unrecognized arguments: false"),
    ("--precision fp16", args("--precision", "fp16"), SystemExit, "--precision: invalid choice: 'fp16'"),
    ("--ckpt and --teacher", args("--ckpt", "a.pt", "--teacher", "tiny"), SystemExit, "not allowed with"),
    pytest.param(("--device cuda", args("--device", "cuda"), SystemExit, "has no CUDA"), marks=no_cuda),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda case: case[0])
def test_bad_input_gives_one_clear_error(case, tmp_path):
    # each bad input is refused with one error of the expected type whose message matches
    _, setup, error, match = case
    call = setup(tmp_path)
    with pytest.raises(error, match=match):
        call()


if __name__ == "__main__":
    print(json.dumps(traced_decode_kernels()))
