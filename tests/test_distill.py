"""distill.py: losses, SMART selection, ILD teacher forcing, the tiny pipeline end to end, resume after a
kill, torchrun (gloo) = one process, bad input. Run: python -m pytest tests/test_distill.py"""

import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import convert
import distill
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kd_loss_is_zero_on_identical_logits_and_the_kl_otherwise():
    t, s = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert distill.kd_loss(t, t.clone()).abs() < 1e-6
    want = torch.stack(
        [
            (p * (p.log() - q.log())).sum()
            for p, q in zip(t.softmax(-1).flatten(0, 1), s.softmax(-1).flatten(0, 1))
        ]
    ).mean()
    assert torch.allclose(distill.kd_loss(s, t, chunk=3), want, atol=1e-5)


def test_dpo_loss_is_log2_when_policy_equals_reference():
    lp = torch.randn(6)
    assert abs(distill.dpo_loss(lp, lp - 1, lp, lp - 1, 0.01).item() - math.log(2)) < 1e-6
    assert distill.dpo_loss(lp + 5, lp - 1, lp, lp - 1, 0.1) < math.log(2)  # chosen up: loss down


def test_smart_forces_terminal_layers_spaces_uniformly_and_maximises_the_score():
    scores = [0.0] * 30
    for i in (5, 11, 17, 22):
        scores[i] = 10.0
    scores[2] = scores[26] = 25.0  # tempting, but 2 and 26 break the spacing rule
    assert distill.smart_select(scores, 6) == [0, 5, 11, 17, 22, 28]
    for L, n in ((16, 4), (28, 6), (32, 8), (30, 6)):
        chosen = distill.smart_select([0.0] * L, n)
        gaps = [b - a for a, b in zip(chosen, chosen[1:])]
        assert chosen[0] == 0 and chosen[-1] == L - 2 and len(chosen) == n
        assert max(gaps) - min(gaps) <= 2 and all(abs(g - (L - 2) / (n - 1)) < 2 for g in gaps)


def test_ild_feeds_each_student_layer_the_teachers_input():
    torch.manual_seed(0)
    teacher = M.Model(M.size_config("tiny")).eval()
    student = M.Model(M.size_config("tiny")).eval()
    student.load_state_dict(teacher.state_dict())
    idx = torch.randint(0, 272, (2, 16))
    assert distill.ild_layer_losses(student, teacher, idx).abs().max() < 1e-5
    with torch.no_grad():
        teacher.layers[1].mlp.down_proj.weight.mul_(3)  # break one teacher layer
    losses = distill.ild_layer_losses(student, teacher, idx)
    assert losses[1] > 0.1 and losses[[0, 2, 3]].abs().max() < 1e-5


def run(args, out, **kw):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "distill.py"), "--size", "tiny", "--out-dir", str(out), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        **kw,
    )


def test_tiny_pipeline_end_to_end(tmp_path):
    r = run([], tmp_path)  # the default chitchat corpus, fetched through convert.download_wheel
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / "tiny" / "eval.json"))["results"]
    assert res["after KD"]["kl"] < res["hybrid (no training)"]["kl"]
    assert 0 < res["after DPO"]["kv_pct"] < 100 and "after DPO" in r.stdout
    for f in ("init_mla", "init_m2", "ild_mla", "ild_m2", "hybrid_init", "kd", "dpo"):
        assert torch.load(tmp_path / "tiny" / f"{f}.pt", weights_only=True)["done"]
    r2 = run([], tmp_path)  # everything is done: nothing reruns
    assert r2.returncode == 0 and "resuming" not in r2.stdout and "[kd]" not in r2.stdout


def test_killed_kd_resumes_where_it_stopped(tmp_path):
    args = ["--kd-steps", "400", "--ckpt-every", "5", "--dpo-steps", "2"]
    p = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "distill.py"),
            "--size",
            "tiny",
            "--out-dir",
            str(tmp_path),
            *args,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kd = tmp_path / "tiny" / "kd.pt"
    deadline = time.time() + 300
    while not (kd.exists() and torch.load(kd, weights_only=True)["step"] >= 10) and time.time() < deadline:
        time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = torch.load(kd, weights_only=True)
    assert not before.get("done") and before["step"] < 400
    r = run(args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"[kd] resuming from step {before['step']}/400" in r.stdout
    after = torch.load(kd, weights_only=True)
    assert (
        after["done"]
        and after["history"][: before["step"]] == before["history"]
        and len(after["history"]) == 400
    )


@pytest.mark.parametrize("fsdp", ["false", "true"])
def test_torchrun_two_processes_match_one(tmp_path, fsdp):
    args = ["--ild-steps", "4", "--kd-steps", "4", "--dpo-steps", "1", "--seed", "3"]
    single = run(args, tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            os.path.join(ROOT, "distill.py"),
            "--size",
            "tiny",
            "--out-dir",
            str(tmp_path / "two"),
            *args,
            "--fsdp",
            fsdp,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    for f in ("ild_mla", "kd"):
        a = torch.load(tmp_path / "one" / "tiny" / f"{f}.pt", weights_only=True)["history"]
        b = torch.load(tmp_path / "two" / "tiny" / f"{f}.pt", weights_only=True)["history"]
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3 * max(map(abs, a)), (f, a, b)


@pytest.mark.parametrize(
    "flag,content,expect",
    [
        ("--data", "", "no conversations"),
        ("--dpo-data", "", "no DPO pairs"),
        ("--data", '{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n', "line(s) [2]"),
        ("--dpo-data", '{"prompt": "a", "chosen": "b"}\n', "line(s) [1]"),
    ],
)
def test_bad_corpus_is_one_clear_error_and_no_checkpoint(tmp_path, flag, content, expect):
    data = tmp_path / "c.jsonl"
    data.write_text(content)
    r = run([flag, str(data)], tmp_path / "o")
    assert r.returncode != 0 and expect in r.stderr and "Traceback" not in r.stderr
    assert not any(str(p).endswith(".pt") for p in (tmp_path / "o").rglob("*"))


def test_big_size_without_weights_says_where_to_get_them(tmp_path):
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "distill.py"), "--size", "1b", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode != 0 and "--teacher" in r.stderr and "Traceback" not in r.stderr


def test_data_of_another_vocabulary_is_refused(tmp_path):
    """Data prepared with the tiny byte tokenizer, then a teacher (same dims, Meta format) with a Llama-3 style vocabulary."""
    data = tmp_path / "c.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"hello {i} " * 20},
                        {"role": "assistant", "content": f"hi {i} " * 20},
                    ]
                }
            )
            + "\n"
            for i in range(60)
        )
    )
    assert run(["--data", str(data), "--stage", "init"], tmp_path / "o").returncode == 0
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "tokenizer.model").write_text(
        "".join(f"{__import__('base64').b64encode(bytes([b])).decode()} {b}\n" for b in range(256))
    )
    (meta / "params.json").write_text(
        json.dumps(
            dict(
                dim=64,
                n_layers=4,
                n_heads=4,
                n_kv_heads=2,
                vocab_size=512,
                multiple_of=32,
                norm_eps=1e-5,
                rope_theta=1e4,
            )
        )
    )
    names = {
        "embed_tokens": "tok_embeddings",
        "lm_head": "output",
        "norm": "norm",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.up_proj": "feed_forward.w3",
        "mlp.down_proj": "feed_forward.w2",
    }
    sd = M.Model(M.size_config("tiny", vocab_size=512, d_ff=192, tie_embeddings=False)).state_dict()
    meta_sd = {}
    for k, v in sd.items():
        base = k.removesuffix(".weight")
        layer = base.split(".")[1] if base.startswith("layers.") else None
        rest = base.split(".", 2)[2] if layer else base
        meta_sd[(f"layers.{layer}." if layer else "") + names[rest] + ".weight"] = v
    torch.save(meta_sd, meta / "consolidated.00.pth")
    r = run(["--data", str(data), "--teacher", str(meta)], tmp_path / "o")
    assert r.returncode != 0 and "vocabulary" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "tiny" / "ild_mla.pt").exists()


def test_diverging_training_stops_clearly_and_keeps_the_last_good_checkpoint(tmp_path):
    r = run(["--kd-lr", "1e30", "--kd-steps", "20", "--ckpt-every", "1"], tmp_path)
    assert r.returncode != 0 and "last good checkpoint" in r.stderr and "Traceback" not in r.stderr
    kd = torch.load(tmp_path / "tiny" / "kd.pt", weights_only=True)
    assert not kd.get("done") and all(math.isfinite(x) for x in kd["history"])
    assert all(torch.isfinite(v).all() for v in kd["model"].values() if v.is_floating_point())


# ---- memory plan, micro-batching, dry run (issue 10)
# the official configs as paper.md §10-§12 tabulate them: (ILD batch, lr), (KD batch, lr, tokens), DPO pairs
OFFICIAL = {
    "1b": dict(ild=(96, 2e-4), kd=(192, 8e-5, 5.44e9), dpo=(32, 5e-7)),
    "3b": dict(ild=(96, 2e-4), kd=(96, 4e-5, 37_842 * 96 * 2048), dpo=(32, 5e-7)),
    "8b": dict(ild=(48, 1e-4), kd=(64, 4e-5, 72_021 * 64 * 2048), dpo=(32, 5e-7)),
}


@pytest.mark.parametrize("size", OFFICIAL)
def test_presets_are_the_official_global_batches_rates_warmups_and_token_budgets(size):
    # every stage's global batch, peak rate, warmup and tokens match the official config
    cfg, want = distill.parse_args(["--size", size]), OFFICIAL[size]
    assert cfg.seq_len == 2048 and cfg.warmup == 0.01 and cfg.dpo_warmup == 0.1 and cfg.dpo_beta == 0.01
    assert (cfg.batch_size, cfg.ild_lr) == want["ild"]
    assert abs(cfg.ild_steps * cfg.batch_size * cfg.seq_len / 1.36e9 - 1) < 1e-3  # 20 % of 6.8B tokens
    assert (cfg.kd_batch_size, cfg.kd_lr) == want["kd"][:2]
    assert abs(cfg.kd_steps * cfg.kd_batch_size * cfg.seq_len / want["kd"][2] - 1) < 1e-3
    assert (cfg.dpo_batch_size, cfg.dpo_lr) == want["dpo"]


def test_batch_rows_cover_the_same_global_batch_for_any_world_and_micro_split():
    # the union over ranks and micro-batches is the step's global batch, whatever the split
    want = [(3 * 12 + j) % 40 for j in range(12)]
    for world, n_micro in ((1, 1), (1, 5), (2, 3), (4, 3), (3, 4)):
        got = [
            r
            for rank in range(world)
            for m in range(n_micro)
            for r in distill.batch_rows(3, 12, 40, rank, world, m, n_micro)
        ]
        assert sorted(got) == sorted(want), (world, n_micro)


# one real training step twice (the second with AdamW state resident) in a fresh process: the peak RSS
# above the baseline after loading (VmHWM reset by /proc/self/clear_refs) against the plan's estimate of
# the same (peak minus the weights and teacher already resident)
MEASURE = r"""
import dataclasses, gc, sys, torch, convert, distill, model as M
size, stage, seq, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024
cfg = dataclasses.replace(
    distill.parse_args(["--size", size]), seq_len=seq, batch_size=batch, kd_batch_size=batch,
    precision="fp32", device="cpu",
)
teacher, tok = convert.load_teacher(size)
teacher.cfg = convert.with_hybrid_fields(teacher.cfg, size)
teacher.requires_grad_(False)
plan = distill.memory_plan(cfg, teacher.cfg, 1)[stage]
idx = torch.randint(0, teacher.cfg.vocab_size, (batch, seq))
if stage.startswith("ild"):
    student = convert.make_student(teacher, stage[4:]).train()
    student.embed_tokens.requires_grad_(False)
    student.lm_head.requires_grad_(False)
else:
    kinds = ["mla" if i in teacher.cfg.mla_layers else "m2" for i in range(teacher.cfg.n_layer)]
    student = M.Model(dataclasses.replace(teacher.cfg, kinds=kinds)).train()
def step_loss(m, s, mi, n):
    rows = idx[distill.batch_rows(s, batch, batch, 0, 1, mi, n)]
    if stage.startswith("ild"):
        return distill.ild_loss(m, teacher, rows)
    with torch.no_grad():
        t = teacher(rows)
    return distill.kd_loss(m(rows), t), {}
opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad])
gc.collect()
base = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
for step in range(2):
    off = torch.autocast("cpu", enabled=False)
    distill.accumulate(student, step_loss, step, batch, plan["micro"], off, print)
    opt.step()
    opt.zero_grad(set_to_none=True)
print("RESULT", status("VmHWM:") - base, plan["peak"] - plan["weights"] - plan["teacher"], plan["micro"])
"""


@pytest.mark.parametrize(
    "size,stage,seq,batch", [("tiny", "ild_m2", 256, 16), ("tiny", "kd", 256, 16), ("135m", "kd", 64, 2)]
)
def test_memory_plan_is_within_30_percent_of_the_measured_peak(size, stage, seq, batch):
    # the plan's peak above the resident weights is within 30 % of the measured peak RSS of real steps
    r = subprocess.run(
        [sys.executable, "-c", MEASURE, size, stage, str(seq), str(batch)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    measured, estimated, micro = map(float, r.stdout.split("RESULT")[1].split())
    assert micro == batch  # the whole batch fits this machine: one micro-batch
    assert abs(estimated / measured - 1) < 0.3, (measured / 2**20, estimated / 2**20)


def test_out_of_memory_halves_the_micro_batch_and_redoes_the_step_on_the_same_global_batch():
    # an OutOfMemoryError mid-step halves the micro-batch; the redone step gives the whole batch's loss, grads
    torch.manual_seed(0)
    model = M.Model(M.size_config("tiny"))
    idx = torch.randint(0, 272, (8, 16))
    calls = []

    def ce(m, rows):
        logits = m(idx[rows])
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[rows][:, 1:].flatten())

    def step_loss(m, step, micro, n_micro):
        rows = distill.batch_rows(step, 8, 8, 0, 1, micro, n_micro)
        calls.append(rows)
        if len(calls) == 2:  # the second micro-batch of the first try: gradients are half accumulated
            raise torch.OutOfMemoryError("simulated")
        return ce(m, rows), {}

    log = []
    loss, _, micro = distill.accumulate(model, step_loss, 0, 8, 4, contextlib.nullcontext(), log.append)
    assert micro == 2 and "halved to 2" in log[0] and len(log) == 1
    assert calls[2:] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # the redone step: the same 8 rows, 2 at a time
    oracle = M.Model(M.size_config("tiny"))
    oracle.load_state_dict(model.state_dict())
    want = ce(oracle, list(range(8)))
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-5
    for p, q in zip(model.parameters(), oracle.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), "gradients of the first try were not cleared"


def test_plan_for_1b_on_eight_80gb_gpus_fits_and_covers_every_global_batch(capsys):
    # the plan (from SIZES, no weights) gives every training stage a split of its global batch that fits
    cfg = dataclasses.replace(distill.parse_args(["--size", "1b"]), memory_gb=80.0, world=8, precision="bf16")
    plan = distill.memory_plan(cfg, convert.with_hybrid_fields(M.size_config("1b"), "1b"), 8)
    for stage, r in plan.items():
        batch = distill.stage_batch(cfg, stage)
        assert r["fits"] and r["peak"] <= 0.9 * 80 * 2**30, stage
        assert r["n_micro"] * 8 * r["micro"] >= batch > (r["n_micro"] - 1) * 8 * r["micro"], stage
    distill.print_plan(cfg, plan, 8)
    out = capsys.readouterr().out
    assert all(f"{r['micro']} x {r['n_micro']} x 8 = " in out for r in plan.values())


def test_dry_run_runs_every_stage_in_bf16_under_its_own_folder(tmp_path):
    # --dry-run: random bf16 teacher, every stage once, checkpoints in bf16 under OUT/dry-run/SIZE
    code = (
        "import dataclasses, sys, distill\n"
        "cfg = distill.parse_args(['--size', 'tiny', '--out-dir', sys.argv[1]])\n"
        "cfg = dataclasses.replace(cfg, dry_run=True)\n"
        "distill.parse_args = lambda argv=None: cfg\n"  # the flag's syntax is the parser's business
        "distill.main()\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    dpo = torch.load(tmp_path / "dry-run" / "tiny" / "dpo.pt", weights_only=True)
    assert dpo["done"] and dpo["step"] == 1
    assert {v.dtype for v in dpo["model"].values() if v.is_floating_point()} == {torch.bfloat16}
    assert (tmp_path / "dry-run" / "tiny" / "eval.json").exists()


def test_out_of_memory_at_one_sequence_is_one_clear_error():
    # when even one sequence per forward does not fit, the error names the fixes instead of looping
    def step_loss(m, step, micro, n_micro):
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(MemoryError, match="--fsdp"):
        distill.accumulate(torch.nn.Linear(2, 2), step_loss, 0, 4, 4, contextlib.nullcontext(), print)


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused_before_any_work():
    # every stage's global batch must split evenly over the processes; the flag is named
    cfg = distill.parse_args(["--size", "tiny", "--dpo-batch-size", "3"])
    with pytest.raises(ValueError, match="--dpo-batch-size 3"):
        distill.plan_micro_batches(cfg, convert.with_hybrid_fields(M.size_config("tiny"), "tiny"), 2, 0)
