"""bench.py: the KV formula gives the paper's percentages and equals what the caches allocate; the peers
decode; the lm-evaluation-harness adapter scores with the model's own log-probabilities.
Run: python -m pytest tests/test_bench.py

The lm-eval tests run offline on tests/evaltask (zebra_mc: 32 questions in a local JSON-lines file) and skip,
saying why, when lm-eval is not installed; the scoring helpers the adapter calls are tested without it.
"""

import importlib.util
import json
import os
import sys
import types
from functools import partial

import pytest
import torch

import bench
import convert
import generate
import model as M

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed (pip install lm-eval)")
LIMIT = 8  # zebra_mc questions per lm-eval run: enough to separate models, fast on a loaded CPU
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_teacher():
    teacher, tok = convert.load_teacher("tiny")
    teacher.cfg = convert.with_hybrid_fields(teacher.cfg, "tiny")
    return teacher, tok


def tiny_hybrid(teacher):
    mla, m2 = convert.make_student(teacher, "mla"), convert.make_student(teacher, "m2")
    return convert.compose_hybrid(teacher, mla, m2, teacher.cfg.mla_layers)


def oracle_logprob(model, context, continuation):
    """Sum of log p(continuation | context) from one full forward over the concatenation."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = model(ids)[0, :-1].float().log_softmax(-1)  # (T-1, V): row t predicts token t+1
    return sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(continuation))


# ----------------------------------------------------------------------------- KV cache and decode timing
def test_kv_formula_reproduces_the_paper():
    # the zebra configs' KV bytes per token are the paper's 3.906 / 2.009 / 2.734 % of the teacher's
    pct = {}
    for s in ("1b", "3b", "8b"):
        t = M.size_config(s)
        z = M.size_config(s, kinds=convert.hybrid_kinds(t.n_layer, t.mla_layers))
        pct[s] = round(100 * z.kv_bytes_per_token() / t.kv_bytes_per_token(), 3)
    assert pct == {"1b": 3.906, "3b": 2.009, "8b": 2.734}


@pytest.mark.parametrize("kinds", [["attn"] * 4, ["mla", "m2", "attn", "m2"]])
def test_kv_formula_equals_allocated_bytes(kinds):
    # what the caches allocate is the formula: growing bytes for attn/MLA, constant Mamba2 state
    m = M.Model(M.size_config("tiny", kinds=kinds))
    cache = m.allocate_cache(3, 50)
    assert cache.nbytes(("attn", "mla")) == bench.kv_cache_bytes(m.cfg, 50, 3, elt=4)
    assert cache.nbytes(("m2",)) == bench.mamba_state_bytes(m.cfg, 3, elt=4)


def test_time_decode_runs_a_saved_peer_over_a_prefilled_cache(tmp_path):
    # the MambaInLlama-style peer is saved with alternating kinds and decodes over a cache of formula size
    teacher, _ = tiny_teacher()
    paths = bench.make_peers(teacher, str(tmp_path))
    res = bench.run_peer(
        paths["mambainllama"], [64], [2], [16], steps=2, repeats=1, device="cpu", dtype=torch.float32
    )
    peer = M.load_checkpoint(paths["mambainllama"])[0]
    assert peer.cfg.kinds == ["attn", "m2", "attn", "m2"]
    assert res["decode"][0]["kv_bytes"] == bench.kv_cache_bytes(peer.cfg, 64 + 2 * 2, 2, elt=4)


def test_a_bf16_peer_reports_the_bytes_a_step_reads(tmp_path):
    # a zebra peer timed in bf16: its weights are 2 bytes per parameter but Mamba2's fp32 scalars (3 per head
    # of each m2 layer) and each decode row's caches are the KV formula plus the constant Mamba2 state
    teacher, _ = tiny_teacher()
    path = bench.make_peers(teacher, str(tmp_path))["zebra"]
    res = bench.run_peer(path, [32], [1, 3], [8], steps=1, repeats=1, device="cpu", dtype=torch.bfloat16)
    cfg = M.load_checkpoint(path)[0].cfg
    n_params, scalars = M.Model(cfg).num_params(), 3 * cfg.n_head * cfg.kinds.count("m2")
    assert cfg.tie_embeddings and res["weight_bytes"] == 2 * (n_params - scalars) + 4 * scalars
    for row in res["decode"]:
        b, S = row["batch"], 32 + 1 * 2
        assert row["cache_bytes"] == bench.kv_cache_bytes(cfg, S, b, 2) + bench.mamba_state_bytes(cfg, b, 2)


def test_an_untied_embedding_table_is_not_read_by_a_step():
    # untied, a step reads only the batch's rows of the embedding table: its bytes are not counted
    tied, untied = (M.Model(M.size_config("tiny", tie_embeddings=t)) for t in (True, False))
    table = 4 * tied.cfg.vocab_size * tied.cfg.d_model
    assert bench.weight_bytes(tied) == 4 * tied.num_params()
    assert bench.weight_bytes(untied) == 4 * untied.num_params() - table == bench.weight_bytes(tied)


def test_streaming_limit_is_batch_times_bandwidth_over_the_bytes_read():
    # 1 GB of weights and caches read at 20 GB/s: 20 steps/s, 160 tokens/s at batch 8; the measured
    # bandwidth of this machine is a positive rate
    assert bench.streaming_limit(8, 0.9e9, 0.1e9, 20e9) == pytest.approx(160.0)
    assert 0 < bench.read_bandwidth(nbytes=2**20, repeats=2) < float("inf")


# ----------------------------------------------------------------------------- scoring (no lm-eval needed)
def test_encode_pair_moves_trailing_spaces_to_the_continuation():
    # "Answer: " + "Paris" scores " Paris": the context loses its trailing space, the continuation is the tail
    tok = convert.Tokenizer.byte_level()
    ctx, cont = bench.encode_pair(tok, "Answer: ", "Paris")
    assert (ctx, cont) == (tok.encode("Answer:"), tok.encode(" Paris"))


def test_encode_pair_continuation_is_the_merged_tail_of_the_whole_text():
    # with merges, "Answer:" + " Paris" scores the one merged token " Paris" that the whole text encodes to
    ranks = {bytes([b]): b for b in range(256)}
    ranks |= {b" P": 256, b"ar": 257, b"is": 258, b" Par": 259, b" Paris": 260}
    tok = convert.Tokenizer("toy", convert.SMOLLM_PAT, ranks, {"<|endoftext|>": 261}, None)
    assert bench.encode_pair(tok, "Answer:", " Paris") == (tok.encode("Answer:"), [260])


def test_scores_equal_the_models_own_log_probs_batched_or_not():
    # score_continuations sums the continuation's log-probs as a full forward does, in any batching
    teacher, _ = tiny_teacher()
    hybrid = tiny_hybrid(teacher)
    g = torch.Generator().manual_seed(0)
    pairs = [
        (torch.randint(0, 256, (n,), generator=g).tolist(), torch.randint(0, 256, (k,), generator=g).tolist())
        for n, k in [(5, 1), (12, 3), (1, 4), (30, 2), (7, 7)]
    ]
    one = bench.score_continuations(hybrid, pairs, batch_size=1)
    many = bench.score_continuations(hybrid, pairs, batch_size=3)
    want = [oracle_logprob(hybrid, c, x) for c, x in pairs]
    assert all(abs(a[0] - w) < 1e-4 and abs(b[0] - w) < 1e-4 for a, b, w in zip(one, many, want))


def test_greedy_flag_is_true_exactly_when_argmax_gives_the_continuation():
    # a continuation made of the model's own greedy tokens is flagged greedy; one changed token is not
    teacher, _ = tiny_teacher()
    ids = [72, 105, 33]
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(teacher(torch.tensor([ids]))[0, -1].argmax()))
    other = ids[-1] + 1 if ids[-1] < 255 else 0
    flags = [
        g for _, g in bench.score_continuations(teacher, [(ids[:3], ids[3:]), (ids[:3], ids[3:-1] + [other])])
    ]
    assert flags == [True, False]


def test_rolling_pairs_predict_every_token_once_with_a_full_window():
    # the windows' continuations tile the document and each later input holds exactly `window` tokens
    ids = list(range(100, 123))
    pairs = bench.rolling_pairs(ids, 0, 5)
    assert [t for _, cont in pairs for t in cont] == ids and pairs[0][0] == [0]
    for ctx, cont in pairs[1:]:
        start = ids.index(cont[0])
        assert ctx == ids[start - len(ctx) : start] and len(ctx) + len(cont) - 1 == 5


@needs_lm_eval
def test_rolling_pairs_equal_lm_evals_own_windows():
    # the same pairs as lm-eval's get_rolling_token_windows + make_disjoint_window (context length 1)
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    ids = list(range(100, 123))
    want = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, 0, 5, 1)]
    assert bench.rolling_pairs(ids, 0, 5) == [(list(a), list(b)) for a, b in want]


def test_accuracy_table_gives_retention_of_each_task_and_of_the_mean():
    # retention is hybrid / teacher per task and for the mean accuracies (the paper's 52.03 / 51.87)
    rows = bench.accuracy_table({"teacher": {"a": 0.5, "b": 0.25}, "hybrid": {"a": 0.25, "b": 0.25}})
    assert rows == [
        ("a", 0.5, 0.25, 50.0),
        ("b", 0.25, 0.25, 100.0),
        ("mean", 0.375, 0.25, 100 * 0.25 / 0.375),
    ]


# ----------------------------------------------------------------------------- the adapter inside lm-eval
@pytest.fixture(scope="module")
def zebra_mc(tmp_path_factory):
    """Teacher and untrained hybrid through the first LIMIT questions of the local zebra_mc task, run from a
    working directory outside the repository."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")  # the json builder must not reach the hub
        mp.chdir(tmp_path_factory.mktemp("elsewhere"))
        teacher, tok = tiny_teacher()
        hybrid = tiny_hybrid(teacher)
        manager = bench.task_manager(["zebra_mc"], os.path.join(REPO, "tests", "evaltask"))
        acc = bench.accuracy_section((teacher, tok), (hybrid, tok), ["zebra_mc"], LIMIT, manager)
    return teacher, hybrid, tok, acc


def oracle_accuracy(model, tok):
    """Accuracy on the first LIMIT zebra_mc questions from full forwards: the best-scoring choice wins."""

    hits = []
    with open(os.path.join(REPO, "tests", "evaltask", "zebra_mc.jsonl")) as f:
        for doc in map(json.loads, list(f)[:LIMIT]):
            ctx = tok.encode(f"Question: {doc['question']}\nAnswer:")
            scores = [oracle_logprob(model, ctx, tok.encode(" " + c)) for c in doc["choices"]]
            hits.append(scores.index(max(scores)) == doc["answer"])
    return sum(hits) / len(hits)


@needs_lm_eval
def test_lm_eval_accuracy_is_computed_from_the_models_own_log_probs(zebra_mc):
    # the accuracies lm-eval reports for teacher and hybrid equal argmax-of-log-prob accuracy by full forwards
    teacher, hybrid, tok, acc = zebra_mc
    assert acc["teacher"]["zebra_mc"] == oracle_accuracy(teacher, tok)
    assert acc["hybrid"]["zebra_mc"] == oracle_accuracy(hybrid, tok)


@needs_lm_eval
def test_loglikelihood_rolling_is_the_documents_log_prob_after_the_prefix():
    # a document shorter than the window scores as one forward over [prefix] + ids
    teacher, tok = tiny_teacher()
    lm = bench.zebra_lm_class()(model=teacher, tokenizer=tok)
    text = "hello there, rolling windows"
    got = lm.loglikelihood_rolling([types.SimpleNamespace(args=(text,))])[0]
    assert abs(got - oracle_logprob(teacher, [tok.eos_id], tok.encode(text))) < 1e-4


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string():
    # the continuation is the full-forward argmax loop's text up to the first stop string
    teacher, tok = tiny_teacher()
    ids = tok.encode("Question: hi\nAnswer:")
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(teacher(torch.tensor([ids]))[0, -1].argmax()))
    want = tok.decode(ids[-12:])
    stop = want[5:7]
    got = bench.generate_until(teacher, tok, ["Question: hi\nAnswer:"], [stop], 12)
    assert got == [want.split(stop)[0]]


def test_generate_until_in_a_batch_equals_one_at_a_time():
    # contexts of different lengths generated together give what each gives alone
    teacher, tok = tiny_teacher()
    contexts = ["Q: a\nA:", "Question: what is two plus two?\nAnswer:", "Hi"]
    alone = [bench.generate_until(teacher, tok, [c], ["\n\n"], 10)[0] for c in contexts]
    assert bench.generate_until(teacher, tok, contexts, ["\n\n"], 10) == alone


@needs_lm_eval
def test_adapter_answers_generate_requests_in_order_across_stop_strings():
    # requests with different stop strings are grouped for batching but answered in the order given
    teacher, tok = tiny_teacher()
    lm = bench.zebra_lm_class()(model=teacher, tokenizer=tok, batch_size=2)
    reqs = [("Q: a\nA:", "x"), ("Hi", "y"), ("Question: b\nA:", "x")]
    got = lm.generate_until(
        [types.SimpleNamespace(args=(c, {"until": [u], "max_gen_toks": 6})) for c, u in reqs]
    )
    assert got == [bench.generate_until(teacher, tok, [c], [u], 6)[0] for c, u in reqs]


@needs_lm_eval
def test_tasks_score_against_the_teacher_the_checkpoint_records(zebra_mc, tmp_path, monkeypatch, capsys):
    # --tasks on a tiny hybrid without --size (default 135m), run outside the repository: the teacher is the
    # one the checkpoint records (tiny), so both accuracies are those of full forwards of tiny's models
    teacher, hybrid, tok, _ = zebra_mc
    M.save_checkpoint(str(tmp_path / "dpo.pt"), hybrid, "dpo", tokenizer=tok, teacher="tiny")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    bench.main(["--tasks", "zebra_mc", "--ckpt", "dpo.pt", "--limit", str(LIMIT), "--device", "cpu"])
    acc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"]
    assert acc == {
        "teacher": {"zebra_mc": oracle_accuracy(teacher, tok)},
        "hybrid": {"zebra_mc": oracle_accuracy(hybrid, tok)},
    }


# ----------------------------------------------------------------------------- bad input -> one clear error
def without_lm_eval(monkeypatch):
    for name in ("lm_eval", "lm_eval.api", "lm_eval.api.model", "lm_eval.api.registry"):
        monkeypatch.setitem(sys.modules, name, None)
    return bench.zebra_lm_class.__wrapped__


def teacher_of_other_dims(monkeypatch):  # the 135m teacher (default --size) for a tiny hybrid: none may load
    teacher, _ = tiny_teacher()
    monkeypatch.setattr(generate, "load_teacher", lambda *a, **k: pytest.fail("a teacher was loaded"))
    return partial(bench.load_teacher_for, tiny_hybrid(teacher).cfg, "dpo.pt", "135m", "cpu", torch.float32)


def unknown_task(monkeypatch):
    return partial(bench.task_manager, ["zebra_mc", "no_such_task"], os.path.join(REPO, "tests", "evaltask"))


BAD_INPUTS = [  # (case, setup(monkeypatch) -> the call that must fail, error, message)
    ("no lm-eval", without_lm_eval, ValueError, "pip install lm-eval"),
    ("teacher of other dims", teacher_of_other_dims, ValueError, "pass that one with --size tiny"),
    pytest.param(
        ("unknown task", unknown_task, ValueError, "unknown lm-eval tasks.*no_such_task"), marks=needs_lm_eval
    ),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda case: case[0])
def test_bad_input_gives_one_clear_error(case, monkeypatch):
    # each bad input is refused with one error of the expected type whose message matches
    _, setup, error, match = case
    call = setup(monkeypatch)
    with pytest.raises(error, match=match):
        call()
