"""distill.py: losses, SMART selection, ILD teacher forcing, the tiny pipeline end to end, resume after a
kill, torchrun (gloo) = one process, bad input. Run: python -m pytest tests/test_distill.py"""

import base64
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import convert
import distill
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kd_loss_is_zero_on_identical_logits_and_the_kl_otherwise():
    # kd_loss is KL(p_T || p_S) per position, averaged: 0 for equal logits, a direct sum otherwise
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
    # sigmoid DPO is log 2 at zero margin and falls when the chosen reply gains probability
    lp = torch.randn(6)
    assert abs(distill.dpo_loss(lp, lp - 1, lp, lp - 1, 0.01).item() - math.log(2)) < 1e-6
    assert distill.dpo_loss(lp + 5, lp - 1, lp, lp - 1, 0.1) < math.log(2)  # chosen up: loss down


def test_smart_forces_terminal_layers_spaces_uniformly_and_maximises_the_score():
    # SMART keeps layers 0 and L-2, gaps within one of uniform, and the best total score among such sets
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


@pytest.fixture
def twins():
    """A tiny teacher, a student that is a copy of it, and a batch of ids."""
    torch.manual_seed(0)
    teacher = M.Model(M.size_config("tiny")).eval()
    student = M.Model(M.size_config("tiny")).eval()
    student.load_state_dict(teacher.state_dict())
    return teacher, student, torch.randint(0, 272, (2, 16))


def test_ild_feeds_each_student_layer_the_teachers_input(twins):
    # a copy of the teacher scores 0; a changed teacher layer shows in that layer's loss alone
    teacher, student, idx = twins
    assert distill.ild_layer_losses(student, teacher, idx).abs().max() < 1e-5
    with torch.no_grad():
        teacher.layers[1].mlp.down_proj.weight.mul_(3)  # break one teacher layer
    losses = distill.ild_layer_losses(student, teacher, idx)
    assert losses[1] > 0.1 and losses[[0, 2, 3]].abs().max() < 1e-5


def test_ild_mixer_target_scores_each_mixer_alone_on_the_teachers_input(twins):
    # a copy of the teacher scores 0; a changed teacher MLP changes no mixer's target, a changed attention one
    teacher, student, idx = twins
    with torch.no_grad():
        teacher.layers[1].mlp.down_proj.weight.mul_(3)
    assert distill.ild_layer_losses(student, teacher, idx, "mixer").abs().max() < 1e-5
    with torch.no_grad():
        teacher.layers[2].self_attn.o_proj.weight.mul_(3)
    losses = distill.ild_layer_losses(student, teacher, idx, "mixer")
    assert losses[2] > 0.1 and losses[[0, 1, 3]].abs().max() < 1e-5


def test_ild_mixer_target_trains_the_mixers_only():
    # with the mixer target exactly the mixers' parameters get gradients
    student = distill.trainable(M.Model(M.size_config("tiny")), "mixer")
    mixers = {id(p) for b in student.layers for p in b.mixer.parameters()}
    assert {id(p) for p in student.parameters() if p.requires_grad} == mixers


@pytest.mark.parametrize("scalar_lr", [1.0, 10.0])
def test_scalar_lr_scales_the_step_of_the_mamba2_scalars_only(tmp_path, scalar_lr):
    # AdamW's first step moves each weight by its group's lr (gradients >> eps; no warmup at 10 steps):
    # Mamba2's A_log, dt_bias, D and gated-norm weights by scalar_lr times the lr, the other weights by the lr
    cfg = distill.parse_args(["--size", "tiny", "--scalar-lr", str(scalar_lr)])
    student = distill.trainable(convert.make_student(distill.random_teacher(cfg)[0], "m2").train(), "mixer")
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in named}
    opt = distill.optimizer(cfg, student, 10, 1e-3, cfg.warmup)[0]
    student(torch.randint(0, 256, (2, 16))).float().pow(2).mean().backward()
    opt.step()
    step = {n: (p.detach() - before[n]).abs().max().item() for n, p in named}
    scalars = {n for n in step if n.endswith((".A_log", ".dt_bias", ".D", ".norm.weight"))}
    assert len(scalars) == 4 * M.size_config("tiny").n_layer and len(step) > len(scalars)
    assert all(step[n] == pytest.approx(1e-3 * (scalar_lr if n in scalars else 1), rel=1e-2) for n in step)


def run(args, out, **kw):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "distill.py"), "--size", "tiny", "--out-dir", str(out), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        **kw,
    )


def test_tiny_pipeline_end_to_end(tmp_path):
    # `distill.py --size tiny` runs every stage, writes every file, and KD lowers the KL to the teacher
    r = run([], tmp_path)  # the default chitchat corpus, fetched through convert.download
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / "tiny" / "eval.json"))["results"]
    assert res["after KD"]["heldout"]["kl"] < res["hybrid (no training)"]["heldout"]["kl"]
    assert 0 < res["after DPO"]["kv_pct"] < 100 and "after DPO" in r.stdout
    for f in ("init_mla", "init_m2", "ild_mla", "ild_m2", "hybrid_init", "kd", "dpo"):
        assert torch.load(tmp_path / "tiny" / f"{f}.pt", weights_only=True)["done"]
    r2 = run([], tmp_path)  # everything is done: nothing reruns, the data is not prepared again
    assert r2.returncode == 0 and "resuming" not in r2.stdout and "[kd]" not in r2.stdout
    assert "data:" not in r2.stdout and "teacher replies" not in r2.stderr


def test_killed_kd_resumes_where_it_stopped(tmp_path):
    # a KD process killed mid-stage resumes from its last checkpoint, not from step 0
    args = (
        "--kd-steps 150 --ckpt-every 5 --ild-steps 2 --dpo-steps 1 --dpo-pairs 2 --batch-size 2 --seq-len 32"
    )
    args = args.split()
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
    assert not before.get("done") and before["step"] < 150
    r = run(args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"[kd] resuming from step {before['step']}/150" in r.stdout
    after = torch.load(kd, weights_only=True)
    assert (
        after["done"]
        and after["history"][: before["step"]] == before["history"]
        and len(after["history"]) == 150
    )


@pytest.mark.parametrize("fsdp", ["--no-fsdp", "--fsdp"])
def test_torchrun_two_processes_match_one(tmp_path, fsdp):
    # two processes under torchrun (DDP or FSDP2) train to the same weights as one process
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


def torchrun(args, out):
    """distill.py --size tiny under torchrun with two processes (gloo on the CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [os.path.join(ROOT, "distill.py"), "--size", "tiny", "--out-dir", str(out), *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_fsdp_run_killed_mid_kd_resumes_to_the_uninterrupted_result(tmp_path):
    # FSDP2 under torchrun: each rank's shards are saved as KD goes; killed mid-KD, the rerun resumes from
    # them and ends with the uninterrupted run's losses and weights
    args = ["--fsdp", "--kd-steps", "200", "--ckpt-every", "5", "--ild-steps", "2", "--dpo-pairs", "0"]
    whole = torchrun(args, tmp_path / "whole")
    p = torchrun(args, tmp_path / "cut")
    progress, deadline = tmp_path / "cut" / "tiny" / "kd.dcp" / "progress.pt", time.time() + 300
    while not (progress.exists() and torch.load(progress, weights_only=True)["step"] >= 10):
        assert time.time() < deadline and p.poll() is None, "KD never wrote its progress"
        time.sleep(0.2)
    # torchrun's workers run in sessions of their own: kill every process of this run, as a crash would
    subprocess.run(["pkill", "-KILL", "-f", str(tmp_path / "cut")])
    p.wait()
    while subprocess.run(["pgrep", "-f", str(tmp_path / "cut")], capture_output=True).returncode == 0:
        time.sleep(0.1)
    step = torch.load(progress, weights_only=True)["step"]
    rerun = torchrun(args, tmp_path / "cut")
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    assert f"[kd] resuming from step {step}/200" in out
    assert whole.communicate(timeout=600) and whole.returncode == 0
    a, b = (torch.load(tmp_path / d / "tiny" / "kd.pt", weights_only=True) for d in ("whole", "cut"))
    assert max(abs(x - y) for x, y in zip(a["history"], b["history"])) < 1e-5
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-5) for k in a["model"])
    assert not (tmp_path / "cut" / "tiny" / "kd.dcp").exists()  # removed once KD finished


@pytest.mark.parametrize(
    "flag,content,expect",
    [
        ("--data", "", "no conversations"),
        ("--dpo-data", "", "no DPO pairs"),
        ("--data", '{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n', "line(s) [2]"),
        ("--dpo-data", '{"prompt": "a", "chosen": "b"}\n', "line(s) [1]"),
        (
            "--data",
            '{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": "\xff"}\n',
            "line(s) [2]",
        ),
    ],
)
def test_bad_corpus_is_one_clear_error_and_no_checkpoint(tmp_path, flag, content, expect):
    # a malformed corpus or DPO file (a line not JSON, not the form, not UTF-8) is one error naming the file
    # and line, before any checkpoint is written
    data = tmp_path / "c.jsonl"
    data.write_bytes(content.encode("latin-1"))
    r = run([flag, str(data)], tmp_path / "o")
    assert r.returncode != 0 and expect in r.stderr and "Traceback" not in r.stderr
    assert not any(str(p).endswith(".pt") for p in (tmp_path / "o").rglob("*"))


def test_big_size_without_weights_says_where_to_get_them(tmp_path):
    # --size 1b without --teacher says where to get the weights instead of failing deep inside
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "distill.py"), "--size", "1b", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode != 0 and "--teacher" in r.stderr and "Traceback" not in r.stderr


def test_diverging_training_stops_clearly_and_keeps_the_last_good_checkpoint(tmp_path):
    # a diverging KD stops with one error and leaves its last finite checkpoint in place
    r = run(["--kd-lr", "1e30", "--kd-steps", "20", "--ckpt-every", "1"], tmp_path)
    assert r.returncode != 0 and "last good checkpoint" in r.stderr and "Traceback" not in r.stderr
    kd = torch.load(tmp_path / "tiny" / "kd.pt", weights_only=True)
    assert not kd.get("done") and all(math.isfinite(x) for x in kd["history"])
    assert all(torch.isfinite(v).all() for v in kd["model"].values() if v.is_floating_point())


# ---- stages, data, arguments
TINY = "--size tiny --batch-size 2 --ild-steps 2 --kd-steps 2 --dpo-steps 2 --dpo-pairs 4".split()
TINY += "--dpo-max-new 6 --smart-batches 1 --eval-batches 1".split()


def distill_main(out, *args):
    """One in-process tiny run into out; -> its stages.json."""
    distill.main([*TINY, "--out-dir", str(out), *args])
    return M.read_json(out / "tiny" / "stages.json")


def made(out):
    """When each stage's first file was written (ns): a stage that reruns writes it anew."""
    files = {s.name: out / "tiny" / s.files[0] for s in distill.STAGES}
    return {name: f.stat().st_mtime_ns for name, f in files.items() if f.exists()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run, and the token rows that SMART and the evaluation read (recorded on the way)."""
    out, seen = tmp_path_factory.mktemp("finished"), {}
    smart_scores, evaluate = distill.smart_scores, distill.evaluate

    def smart_spy(teacher, m2, mla, batches, micro):
        seen["smart"] = batches
        return smart_scores(teacher, m2, mla, batches, micro)

    def eval_spy(model, teacher, splits, micro):
        seen["eval"] = splits["heldout"]
        return evaluate(model, teacher, splits, micro)

    distill.smart_scores, distill.evaluate = smart_spy, eval_spy
    try:
        distill_main(out)
    finally:
        distill.smart_scores, distill.evaluate = smart_scores, evaluate
    return out, seen


@pytest.fixture
def rerun(finished, tmp_path):
    """A copy of the finished run to rerun with other settings."""
    shutil.copytree(finished[0], tmp_path / "o")
    return tmp_path / "o"


def write_chats(path, n, system_first=True):
    """n numbered chats, each with a system turn first (the common format) and two user turns."""
    with open(path, "w") as f:
        for i in range(n):
            msgs = [
                {"role": "user", "content": f"question {i}: what is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
                {"role": "user", "content": f"and {i} times two? ({i})"},
            ]
            system = [{"role": "system", "content": f"You answer sums, chat {i}."}] if system_first else []
            f.write(json.dumps({"messages": system + msgs}) + "\n")
    return path


def test_other_kd_settings_rerun_kd_and_everything_after_it(rerun):
    # a stage made from other settings reruns, and so does every stage downstream of it; the rest is kept
    before = made(rerun)
    distill_main(rerun, "--kd-lr", "3e-3")
    after = made(rerun)
    assert [s for s in before if before[s] != after[s]] == ["kd", "dpo", "eval"]


@pytest.mark.parametrize(
    "flag,value,reruns", [("--ild-mla-steps", "3", "ild_mla"), ("--scalar-lr", "3", "ild_m2")]
)
def test_a_stage_reruns_only_for_a_setting_it_reads(rerun, flag, value, reruns):
    # the record holds the settings a stage read: --ild-mla-steps is read by the all-MLA student's ILD
    # alone, --scalar-lr by the Mamba2 student's alone (the all-MLA one has no Mamba2 scalars)
    before = made(rerun)
    distill_main(rerun, flag, value)
    after = made(rerun)
    assert [s for s in ("ild_mla", "ild_m2") if before[s] != after[s]] == [reruns]
    if flag == "--ild-mla-steps":
        assert torch.load(rerun / "tiny" / "ild_mla.pt", weights_only=True)["step"] == 3


def test_kd_train_mixers_leaves_every_other_weight_as_composed(rerun):
    # --kd-train mixers: KD changes the mixers' weights and no other (MLPs, norms, embeddings, head)
    distill_main(rerun, "--stage", "kd", "--kd-train", "mixers")
    init = torch.load(rerun / "tiny" / "hybrid_init.pt", weights_only=True)["model"]
    kd = torch.load(rerun / "tiny" / "kd.pt", weights_only=True)["model"]
    moved = {k for k in init if not torch.equal(init[k], kd[k])}
    assert moved and all(".mamba." in k or ".self_attn." in k for k in moved)
    assert any(".mlp." in k for k in init) and all(k in moved for k in init if k.endswith("mamba.A_log"))


def test_unfinished_stage_restarts_rather_than_resumes_on_other_settings(rerun, capsys):
    # kd left unfinished (as after a kill), then rerun with another --kd-lr: it starts afresh, saying why
    records = M.read_json(rerun / "tiny" / "stages.json")
    records["kd"]["done"] = False
    M.write_json(rerun / "tiny" / "stages.json", records)
    distill_main(rerun, "--kd-lr", "3e-3")
    assert "[kd] restarts: unfinished, and what it reads has changed" in capsys.readouterr().out


def test_other_data_reruns_every_stage_and_dpo_takes_system_first_prompts(rerun, tmp_path):
    # another --data (system-first multi-turn chats) is prepared anew; no stage made from the old data stays
    before = made(rerun)
    after = distill_main(rerun, "--data", str(write_chats(tmp_path / "chats.jsonl", 80)))
    assert all(before[s] != t for s, t in made(rerun).items()) and not after["dpo"]["skipped"]


def test_data_file_edited_in_place_is_prepared_anew(rerun, tmp_path):
    # the same --data path with other content: the data is prepared again and the stages rerun
    chats = write_chats(tmp_path / "chats.jsonl", 80)
    distill_main(rerun, "--data", str(chats))
    before, n = made(rerun), M.read_json(rerun / "tiny" / "data.json")["n"]["ild"]
    write_chats(chats, 120)
    distill_main(rerun, "--data", str(chats))
    assert M.read_json(rerun / "tiny" / "data.json")["n"]["ild"] > n
    assert all(before[s] != t for s, t in made(rerun).items())


def test_stage_smart_picking_the_same_layers_keeps_what_came_after(rerun, capsys):
    # --stage smart reruns SMART alone; the hybrid reads nothing of it but the chosen layers, the same at
    # tiny (0 and L-2 forced), so the hybrid, KD and DPO stay on the next plain run
    before = made(rerun)
    distill_main(rerun, "--stage", "smart", "--smart-batches", "2")
    assert "stopped after --stage smart" in capsys.readouterr().out
    distill_main(rerun, "--smart-batches", "2")
    after = made(rerun)
    assert [s for s in before if before[s] != after[s]] == ["smart", "eval"]


def test_stage_kd_reruns_kd_and_the_next_run_reruns_what_read_it(rerun):
    # --stage kd with another rate reruns kd alone; the next run reruns dpo and eval, which read kd.pt
    before = made(rerun)
    distill_main(rerun, "--stage", "kd", "--kd-lr", "3e-3")
    mid = made(rerun)
    assert [s for s in before if before[s] != mid[s]] == ["kd"]
    distill_main(rerun, "--kd-lr", "3e-3")
    assert [s for s in mid if mid[s] != made(rerun)[s]] == ["dpo", "eval"]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_stage_file_reruns_its_stage(rerun, damage):
    # one byte flipped mid-file, or half of it cut: the digest differs, so kd reruns; it remakes the same
    # weights (same seed and data), so dpo and eval, which read kd.pt by its digest, stay
    kd = rerun / "tiny" / "kd.pt"
    data = bytearray(kd.read_bytes())
    data[len(data) // 2] ^= 0xFF
    kd.write_bytes(data if damage == "flip" else data[: len(data) // 2])
    before = made(rerun)
    distill_main(rerun)
    assert [s for s in before if before[s] != made(rerun)[s]] == ["kd"]
    M.load_checkpoint(kd)


def test_a_second_run_on_the_same_folder_stops_at_once(rerun):
    # one run per out-dir: while one holds the folder, a second stops with one line naming it and the pid
    held = distill.lock(str(rerun / "tiny"))
    with pytest.raises(ValueError, match=rf"in use by another distill.py \(pid {os.getpid()}\)"):
        distill_main(rerun)
    held.close()


def test_stale_temporary_files_of_a_killed_write_are_removed(rerun):
    # a temp file left by a killed atomic write is gone after the next run starts
    stale = rerun / "tiny" / "kd.pt.tmp12345"
    stale.write_bytes(b"half a checkpoint")
    distill_main(rerun)
    assert not stale.exists()


def test_stages_json_of_the_wrong_shape_is_one_clear_error(rerun):
    # valid JSON of the wrong shape in the records: one error naming the file, not an AttributeError
    (rerun / "tiny" / "stages.json").write_text("[]")
    with pytest.raises(ValueError, match="stages.json is damaged"):
        distill_main(rerun)


@pytest.mark.parametrize("name,content", [("smart.json", '{"chosen": "0,2"}'), ("data.json", '{"key": 1}')])
def test_a_changed_side_file_is_made_again(rerun, name, content):
    # a stage's side file (smart.json) or the data's (data.json) changed by hand: it is made again, whole
    (rerun / "tiny" / name).write_text(content)
    distill_main(rerun)
    assert M.read_json(rerun / "tiny" / name) != json.loads(content)


def test_too_little_data_stops_before_the_teacher_writes_anything(tmp_path, monkeypatch):
    # three chats cannot fill the splits: the error comes before minutes of teacher replies and texts
    monkeypatch.setattr(distill, "teacher_chats", lambda *a, **k: pytest.fail("teacher replies started"))
    chats = str(write_chats(tmp_path / "c.jsonl", 3))
    with pytest.raises(ValueError, match="fewer than one sequence"):
        distill_main(tmp_path, "--data", chats, "--teacher-replies", "4")


def test_ctrl_c_is_one_line_saying_where_and_exit_130(tmp_path):
    # SIGINT mid-KD: one line naming the stage and step and how to resume, exit code 130, no traceback
    args = [*TINY, "--kd-steps", "400", "--ckpt-every", "5", "--out-dir", str(tmp_path)]
    p = subprocess.Popen(
        [sys.executable, "distill.py", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    kd = tmp_path / "tiny" / "kd.pt"
    deadline = time.time() + 300
    while not kd.exists() and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    assert re.search(r"interrupted at kd step \d+; rerun the same command to resume", out)
    assert "Traceback" not in err


def test_no_dpo_pairs_skips_dpo_and_the_eval_table_says_so(rerun):
    # --dpo-pairs 0 skips DPO (no dpo.pt, no pair file) and eval.json records why instead of a row
    distill_main(rerun, "--dpo-pairs", "0")
    res = M.read_json(rerun / "tiny" / "eval.json")
    assert res["skipped"] == {"after DPO": "--dpo-pairs 0"} and "after DPO" not in res["results"]
    assert not (rerun / "tiny" / "dpo.pt").exists() and not (rerun / "tiny" / "dpo_pairs.jsonl").exists()


def run_of(out, *args):
    """The Run that main builds for the tiny run in out (teacher loaded, data read, whole batches)."""
    cfg = distill.parse_args([*TINY, "--out-dir", str(out), *args])
    teacher, kd_teacher, tok = distill.load_teachers(cfg)
    meta = M.read_json(out / "tiny" / "data.json")
    micro = distill.plan_micro_batches(cfg, teacher.cfg, 1, 0)
    return distill.Run(cfg, 0, 1, str(out / "tiny"), tok, (teacher, kd_teacher), meta, micro)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_first_dpo_loss_is_log2_when_the_policy_is_the_reference(rerun, precision):
    # at step 0 the policy is kd.pt, the reference: under the same autocast both give the same log-probs
    r = run_of(rerun, "--precision", precision, "--dpo-steps", "1")
    os.remove(r.path("dpo.pt"))
    distill.run_dpo(r)
    assert abs(torch.load(r.path("dpo.pt"), weights_only=True)["history"][0] - math.log(2)) < 1e-6


def test_dpo_pairs_past_seq_len_lose_the_start_of_the_prompt_not_the_response():
    # a pair longer than --seq-len keeps its last tokens: the response, which the loss reads, stays whole
    ids = dict(prompt_ids=list(range(50)), chosen_ids=[7] * 20, rejected_ids=[8] * 5)
    pair = dict(prompt="", chosen="", rejected="", **ids)
    idx, mask = distill.pair_batch(convert.Tokenizer.byte_level(), [pair], "cpu", 32)
    assert idx.shape == (2, 32) and mask.sum(1).tolist() == [20, 5]
    assert idx[0].tolist() == list(range(38, 50)) + [7] * 20
    assert idx[1].tolist() == list(range(23, 50)) + [8] * 5


def test_dpo_moves_the_mean_margin_above_zero(finished):
    # the DPO model prefers the chosen replies more than the KD reference does (margin 0 before DPO)
    out = finished[0] / "tiny"
    tok = M.read_checkpoint(out / "kd.pt")["tokenizer"]
    pairs = distill.read_jsonl(out / "dpo_pairs.jsonl", distill.pair_record, distill.PAIR_FORM)
    idx, mask = distill.pair_batch(convert.Tokenizer.from_spec(tok), pairs, "cpu", 64)
    with torch.no_grad():
        ref = distill.seq_logprobs(M.load_checkpoint(out / "kd.pt")[0], idx, mask)
        pol = distill.seq_logprobs(M.load_checkpoint(out / "dpo.pt")[0], idx, mask)
    n = len(pairs)
    assert ((pol[:n] - ref[:n]) - (pol[n:] - ref[n:])).mean() > 0


def test_dpo_pairs_end_of_turn_only_on_replies_that_ended(finished):
    # a reply ends with end-of-turn unless it was cut at --dpo-max-new (6 here), which adds none
    pairs = distill.read_jsonl(
        finished[0] / "tiny" / "dpo_pairs.jsonl", distill.pair_record, distill.PAIR_FORM
    )
    eos = convert.Tokenizer.byte_level().eos_id
    for ids in [p[k] for p in pairs for k in ("chosen_ids", "rejected_ids")]:
        assert len(ids) <= 6 and eos not in ids[:-1] and (ids[-1] == eos or len(ids) == 6)


def test_dpo_pairs_with_equal_replies_are_dropped():
    # teacher == student gives the same replies: every pair is dropped and counted
    teacher, tok = convert.load_teacher("tiny")
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "name a colour"}]]
    assert distill.build_dpo_pairs(teacher, teacher, tok, prompts, 4) == ([], 2)


def test_dpo_prompt_is_the_first_user_turn_with_its_system_turn():
    # system-first chats keep the system turn; a chat without a user turn gives no prompt
    sys_, user, bot = ({"role": r, "content": r} for r in ("system", "user", "assistant"))
    assert distill.chat_prompt([sys_, user, bot, user]) == [sys_, user]
    assert distill.chat_prompt([bot, user, bot]) == [user]
    assert distill.chat_prompt([sys_, bot]) is None


def test_smart_scores_training_rows_disjoint_from_the_heldout_rows(finished):
    # SMART reads a slice of the ILD (training) split; no row of it is one the final evaluation reads
    out, seen = finished
    ild = distill.np.fromfile(out / "tiny" / "data_ild.bin", dtype=distill.np.uint32).reshape(-1, 64)
    rows = {name: {tuple(r.tolist()) for idx in seen[name] for r in idx} for name in ("smart", "eval")}
    assert rows["smart"] <= {tuple(r) for r in ild.tolist()} and not rows["smart"] & rows["eval"]


def write_meta_teacher(d, n_layers, seed=0):
    """A random Llama in Meta's original format (tiny dims, a 256-byte Llama-3 style vocabulary)."""
    d.mkdir()
    (d / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))
    )
    params = dict(dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32)
    (d / "params.json").write_text(json.dumps(dict(params, norm_eps=1e-5, rope_theta=1e4)))
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
    torch.manual_seed(seed)
    cfg = M.size_config("tiny", n_layer=n_layers, vocab_size=512, d_ff=192, tie_embeddings=False)
    meta_sd = {}
    for k, v in M.Model(cfg).state_dict().items():
        base = k.removesuffix(".weight")
        layer = base.split(".")[1] if base.startswith("layers.") else None
        rest = base.split(".", 2)[2] if layer else base
        meta_sd[(f"layers.{layer}." if layer else "") + names[rest] + ".weight"] = v
    torch.save(meta_sd, d / "consolidated.00.pth")
    return d


@pytest.fixture(scope="module")
def kd_teacher_run(tmp_path_factory):
    """A tiny run converting a 4-layer teacher and distilling from a 2-layer one (--kd-teacher)."""
    root = tmp_path_factory.mktemp("kdt")
    a, b = write_meta_teacher(root / "a", 4, seed=1), write_meta_teacher(root / "b", 2, seed=2)
    data = write_chats(root / "chats.jsonl", 80)
    args = ["--teacher", str(a), "--kd-teacher", str(b), "--data", str(data), "--out-dir", str(root / "o")]
    distill.main([*TINY, *args])
    return root / "o" / "tiny", convert.load_teacher(str(b))[0], distill.parse_args([*TINY, *args])


def test_kd_trains_against_the_kd_teacher(kd_teacher_run):
    # KD's first loss is KL(kd teacher || hybrid after ILD) on the first KD batch
    out, b, cfg = kd_teacher_run
    idx = distill.get_batch(out, M.read_json(out / "data.json"), "kd", 0, cfg)
    with torch.no_grad():
        want = distill.kd_loss(M.load_checkpoint(out / "hybrid_init.pt")[0](idx), b(idx)).item()
    assert abs(M.read_checkpoint(out / "kd.pt")["history"][0] - want) < 1e-4 * max(1.0, want)


def test_evaluation_measures_against_the_kd_teacher(kd_teacher_run):
    # eval.json lists the KD teacher at KL 0 and the converted teacher apart from it
    res = M.read_json(kd_teacher_run[0] / "eval.json")["results"]
    assert res["KD teacher"]["heldout"]["kl"] < 1e-6 < res["teacher"]["heldout"]["kl"]


def test_dpo_chosen_replies_are_the_kd_teachers_greedy_replies(kd_teacher_run):
    # the first pair's chosen ids are the KD teacher's greedy continuation (a full forward per token)
    out, b, _ = kd_teacher_run
    pair = distill.read_jsonl(out / "dpo_pairs.jsonl", distill.pair_record, distill.PAIR_FORM)[0]
    ids = list(pair["prompt_ids"])
    with torch.no_grad():
        for _ in pair["chosen_ids"]:
            ids.append(b(torch.tensor([ids]))[0, -1].argmax().item())
    assert ids[len(pair["prompt_ids"]) :] == pair["chosen_ids"]


def test_kd_teacher_of_another_vocabulary_is_refused(tmp_path):
    # the byte-level tiny teacher and a Llama-3 style KD teacher cannot be compared id by id
    b = write_meta_teacher(tmp_path / "b", 2)
    with pytest.raises(ValueError, match="another vocabulary"):
        distill.main([*TINY, "--kd-teacher", str(b), "--out-dir", str(tmp_path / "o")])
    assert not (tmp_path / "o" / "tiny" / "data.json").exists()


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--seq-len", "0"),
        ("--batch-size", "-64"),
        ("--log-every", "0"),
        ("--warmup", "1.5"),
        ("--kd-lr", "nan"),
        ("--dpo-pairs", "-1"),
        ("--rope-rule", "foo"),
        ("--size", "2b"),
        ("--stage", "sft"),
        ("--mla-layers", "0;6"),
        ("--device", "tpu"),
    ],
)
def test_bad_argument_is_refused_at_parse_time_naming_it(flag, value):
    # each bad value is one ValueError that names its option (main prints it as one `error:` line)
    with pytest.raises(ValueError, match=flag):
        distill.parse_args(["--size", "tiny", flag, value])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu_is_refused():
    # --device cuda on a CPU build names the problem and the fix
    with pytest.raises(ValueError, match="--device cpu"):
        distill.parse_args(["--device", "cuda"])


def test_booleans_are_flags():
    # --force and --no-fsdp take no value (8b's preset turns fsdp on)
    cfg = distill.parse_args(["--size", "8b", "--force", "--no-fsdp"])
    assert cfg.force is True and cfg.fsdp is False


def test_help_shows_the_sizes_defaults_and_the_stages(capsys):
    # --help at --size tiny shows tiny's preset values and lists every stage
    with pytest.raises(SystemExit):
        distill.parse_args(["--size", "tiny", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 64)" in text and "(default: 30)" in text
    assert all(f" {s.name} " in text for s in distill.STAGES)


def test_seq_len_beyond_the_teachers_context_is_refused_before_data_prep(tmp_path):
    # the tiny teacher holds 512 tokens: --seq-len 1024 stops before any data file is written
    with pytest.raises(ValueError, match="context of 512"):
        distill.main(["--size", "tiny", "--seq-len", "1024", "--out-dir", str(tmp_path)])
    assert not list(tmp_path.rglob("data*"))


# ---- memory plan, micro-batching, dry run
# the official configs/*/zebra_*.yaml and configs/dpo.yaml: (ILD batch, lr), (KD batch, lr, tokens), DPO pairs
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


# a stage's own code on real tensors (random weights and token ids, SimRun without FakeTensorMode) in a fresh
# process: its peak RSS above the baseline once the teacher is resident (VmHWM reset by
# /proc/self/clear_refs), against the simulated peak above the simulated start
MEASURE = r"""
import dataclasses, gc, sys, torch, convert, distill, model as M
size, stage, seq, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024
cfg = dataclasses.replace(distill.parse_args(["--size", size]), seq_len=seq, precision="fp32", device="cpu")
tcfg = convert.with_hybrid_fields(M.size_config(size), size)
st = next(s for s in distill.STAGES if s.name == stage)
peak, start, _ = distill.simulate(st, cfg, tcfg, None, 1, rows)
r = distill.SimRun.make(cfg, tcfg, None, 1, rows, distill.LiveBytes())
gc.collect()
base = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
with distill.quiet():
    st.run(r)
print("RESULT", status("VmHWM:") - base, peak - start)
"""


@pytest.mark.parametrize(
    "size,stage,seq,rows",
    [("tiny", "ild_m2", 256, 16), ("tiny", "kd", 256, 16), ("tiny", "smart", 512, 32), ("135m", "kd", 64, 2)],
)
def test_simulated_peak_is_within_30_percent_of_the_measured_peak(size, stage, seq, rows):
    # the simulation (fake tensors) of a stage's own code is within 30 % of a real run's peak RSS
    r = subprocess.run(
        [sys.executable, "-c", MEASURE, size, stage, str(seq), str(rows)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        # glibc hands every block of 64 KiB or more back to the OS when freed: RSS then follows live memory
        env={**os.environ, "PYTHONPATH": ROOT, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    measured, simulated = map(float, r.stdout.split("RESULT")[1].split())
    assert abs(simulated / measured - 1) < 0.3, (measured / 2**20, simulated / 2**20)


def out_of_memory(grad):
    raise torch.OutOfMemoryError("simulated")


def test_out_of_memory_in_backward_leaves_nothing_of_the_failed_try_alive():
    # an OOM raised inside backward halves the micro-batch; no tensor of the failed try is alive when the
    # retry runs, so its peak is that of a fresh step at the smaller micro-batch, and loss and gradients are
    # an uninterrupted step's
    torch.manual_seed(0)
    base = M.Model(M.size_config("tiny")).state_dict()
    idx = torch.randint(0, 272, (8, 64))

    def step(micro, fail):
        lb, seen = distill.LiveBytes(), {}
        with lb:  # the weights too are counted from the start: a view of them counts their storage
            model = M.Model(M.size_config("tiny"))
            model.load_state_dict(base)

        def step_loss(m, s, mi, n):
            rows = distill.batch_rows(s, 8, 8, 0, 1, mi, n)
            if n == 2 and mi == 0:  # the first micro-batch at the smaller size: measure from here on
                seen["start"], lb.peak = lb.now, lb.now
            logits = m(idx[rows])
            if fail and n == 1:  # the whole batch at once: out of memory inside backward
                logits.register_hook(out_of_memory)
            return torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), idx[rows][:, 1:].flatten()
            ), {}

        log = []
        with lb:
            before = lb.now
            loss, _, got = distill.accumulate(
                model, step_loss, 0, 8, micro, contextlib.nullcontext(), log.append
            )
        assert got == 4 and (not fail or "halved to 4" in log[0])
        return loss, [p.grad for p in model.parameters()], seen["start"] - before, lb.peak - before

    loss, grads, start, peak = step(8, fail=True)
    want_loss, want_grads, fresh_start, fresh_peak = step(4, fail=False)
    assert start == fresh_start == 0  # nothing of the failed try is alive when the retry starts
    assert peak <= fresh_peak
    assert abs(loss.item() - want_loss.item()) < 1e-6
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(grads, want_grads))


def test_smart_and_evaluation_in_micro_batches_equal_one_batch():
    # SMART's scores and the evaluation's numbers do not depend on how a batch is split into micro-batches
    torch.manual_seed(0)
    teacher = M.Model(convert.with_hybrid_fields(M.size_config("tiny"), "tiny")).eval()
    m2, mla = convert.make_student(teacher, "m2"), convert.make_student(teacher, "mla")
    batches = [torch.randint(0, 272, (6, 32)) for _ in range(2)]
    whole, split = (distill.smart_scores(teacher, m2, mla, batches, n) for n in (6, 4))  # 4 + 2 rows
    assert np.allclose(whole[0], split[0], atol=1e-6) and abs(whole[1] - split[1]) < 1e-6
    whole, split = (distill.evaluate(m2, teacher, {"x": batches}, n) for n in (6, 4))
    assert all(abs(whole["x"][k] - split["x"][k]) < 1e-5 * abs(whole["x"][k]) for k in ("ppl", "kl", "top1"))


def test_plan_splits_each_global_batch_into_the_most_rows_that_fit():
    # with room for 2.5 rows of KD (from the simulated peaks at 1 and 2 rows), each rank's 8 rows run as 4
    # micro-batches of 2, and the chosen split's own simulated peak is within 90 % of the budget
    cfg = distill.parse_args(["--size", "tiny", "--kd-batch-size", "16", "--precision", "bf16"])
    tcfg = convert.with_hybrid_fields(M.size_config("tiny"), "tiny")
    kd = [s for s in distill.STAGES if s.name == "kd"]
    (p1, *_), (p2, *_) = (distill.simulate(kd[0], cfg, tcfg, None, 2, m) for m in (1, 2))
    assert p2 > p1  # a row more holds more
    budget = (p1 + 1.5 * (p2 - p1)) / 0.9
    plan = distill.memory_plan(dataclasses.replace(cfg, memory_gb=budget / 2**30), tcfg, 2, None, kd)["kd"]
    assert (plan["micro"], plan["n_micro"]) == (2, 4) and plan["peak"] <= 0.9 * budget


@pytest.mark.parametrize("stage", ["init", "hybrid_init"])
def test_stages_that_build_models_build_them_in_host_memory(stage):
    # init and the composition hold nothing on the device beyond the teachers (and init's calibration ids):
    # the students they build and the files they read are counted as host memory
    cfg = distill.parse_args(["--size", "tiny", "--memory-gb", "80"])
    st = next(s for s in distill.STAGES if s.name == stage)
    peak, start, host = distill.simulate(
        st, cfg, convert.with_hybrid_fields(M.size_config("tiny"), "tiny"), None, 1, 4
    )
    n = M.Model(M.size_config("tiny")).num_params()
    assert peak - start <= 4 * cfg.seq_len * 8  # at most init's calibration ids (4 rows of int64)
    assert host >= 2 * 4 * n  # two fp32 students, or two students and a hybrid


def test_dpo_trains_with_the_teachers_in_host_memory_and_gives_them_back():
    # the simulated DPO counts the teachers as host memory while it trains, and a real run has them back
    # on the device afterwards (eval reads them)
    cfg = distill.parse_args(["--size", "tiny", "--memory-gb", "80"])
    tcfg = convert.with_hybrid_fields(M.size_config("tiny"), "tiny")
    dpo = next(s for s in distill.STAGES if s.name == "dpo")
    peak, start, host = distill.simulate(dpo, cfg, tcfg, None, 1, 2)
    assert host == start >= 4 * M.Model(tcfg).num_params()  # all that was alive at the start: the teacher


def test_a_stage_that_does_not_fit_stops_the_run_before_any_work():
    # a budget too small for one row: the error names the stage and the fixes
    cfg = distill.parse_args(["--size", "tiny", "--memory-gb", "0.0001"])
    with pytest.raises(ValueError, match="stage init needs .* --micro-batch 1"):
        distill.plan_micro_batches(cfg, convert.with_hybrid_fields(M.size_config("tiny"), "tiny"), 1, 0)


def test_fsdp_simulation_counts_one_ranks_shards_of_weights_gradients_and_adamw_state():
    # under FSDP2 a rank holds 1/world of the fp32 parameters, gradients and both AdamW moments: 16 bytes per
    # parameter / world once a step has run, whatever dtype the gathered parameters compute in
    world = 4
    with distill.FakeTensorMode(), distill.LiveBytes() as lb:
        model = M.Model(M.size_config("tiny"))
        n = sum(p.numel() for p in model.parameters())
        distill.fsdp_shares(model, lb, world, torch.bfloat16)
        assert lb.now == 4 * n // world
        opt = torch.optim.AdamW(model.parameters())
        model(torch.randint(0, 272, (1, 16))).float().sum().backward()
        opt.step()
        assert abs(lb.now - 16 * n / world) < 16 * len(list(model.parameters()))  # rounding per tensor


def test_dry_run_runs_every_stage_in_bf16_under_its_own_folder(tmp_path):
    # --dry-run: random bf16 teacher, every stage once, checkpoints in bf16 under OUT/dry-run/SIZE
    r = subprocess.run(
        [sys.executable, "distill.py", "--size", "tiny", "--dry-run", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
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


def test_out_of_memory_under_torchrun_is_one_clear_error_not_a_lone_retry():
    # with several processes a rank must not halve its micro-batch alone (the others would wait at the sync)
    def step_loss(m, step, micro, n_micro):
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(MemoryError, match="--micro-batch 2"):
        distill.accumulate(torch.nn.Linear(2, 2), step_loss, 0, 4, 4, contextlib.nullcontext(), print, False)


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused_before_any_work():
    # every stage's global batch must split evenly over the processes; the flag is named
    cfg = distill.parse_args(["--size", "tiny", "--dpo-batch-size", "3"])
    with pytest.raises(ValueError, match="--dpo-batch-size 3"):
        distill.plan_micro_batches(cfg, convert.with_hybrid_fields(M.size_config("tiny"), "tiny"), 2, 0)


def greedy_reply(model, tok, ids, max_new):
    """The oracle of a greedy reply: a full forward per new token, up to and with the end-of-turn id."""
    out = []
    with torch.no_grad():
        while len(out) < max_new and (not out or out[-1] != tok.eos_id):
            out.append(model(torch.tensor([ids + out]))[0, -1, : tok.n_vocab].argmax().item())
    return out


def test_eval_shows_the_teachers_greedy_answers_to_the_fixed_questions(finished):
    # eval.json's teacher answers are the teacher's greedy continuations (a full forward per token)
    res = M.read_json(finished[0] / "tiny" / "eval.json")
    teacher, tok = convert.load_teacher("tiny")
    for q, got in zip(distill.QUESTIONS, res["answers"]["teacher"]):
        out = greedy_reply(teacher, tok, tok.chat([{"role": "user", "content": q}]), 32)
        assert got == tok.decode([t for t in out if t != tok.eos_id]).strip()
    assert len(res["answers"]["distilled"]) == len(distill.QUESTIONS)


def test_teacher_chats_are_prompts_followed_by_the_teachers_greedy_replies():
    # two topic questions, then two corpus first turns, each followed by the teacher's own greedy reply, in
    # this order, although batches of 2 group the prompts by length (the short turn with the short question)
    teacher, tok = convert.load_teacher("tiny")
    turns = [
        [{"role": "user", "content": "hi there, how was your day? " * 3}],
        [{"role": "user", "content": "hi"}],
    ]
    questions = [[{"role": "user", "content": f.format(distill.TOPICS[0])}] for f in distill.FORMS[:2]]
    want = [t for p in questions + turns for t in tok.chat(p) + greedy_reply(teacher, tok, tok.chat(p), 5)]
    assert distill.teacher_chats(teacher, tok, turns, 4, max_new=5, batch=2) == want


def test_teacher_text_samples_the_teachers_nucleus_after_each_opening():
    # texts follow the OPENINGS in turn; every written id lies in the top-0.95 nucleus of the teacher's
    # distribution (a full forward per position), not every one is the argmax, and a rerun writes the same
    teacher, tok = convert.load_teacher("tiny")
    ids = distill.teacher_text(teacher, tok, 3, max_new=6, batch=2)
    assert ids == distill.teacher_text(teacher, tok, 3, max_new=6, batch=2)
    pos, greedy = 0, []
    for opening in distill.OPENINGS[:3]:
        start = tok.encode(opening)
        assert ids[pos : pos + len(start)] == start
        pos += len(start)
        text = start
        while len(text) < len(start) + 6 and text[-1] != tok.eos_id:
            with torch.no_grad():
                probs = teacher(torch.tensor([text]))[0, -1, : tok.n_vocab].float().softmax(-1)
            order = probs.argsort(descending=True)
            before = probs[order].cumsum(0) - probs[order]  # mass of the ids likelier than each
            assert before[(order == ids[pos]).nonzero()[0, 0]] < 0.95
            greedy.append(ids[pos] == order[0])
            text, pos = text + [ids[pos]], pos + 1
    assert pos == len(ids) and not all(greedy)


def test_teacher_reply_topics_avoid_the_subjects_of_the_fixed_questions():
    # no topic shares a content word with the evaluation's questions, whose answers must not be trained
    words = {w.strip("?.").lower() for q in distill.QUESTIONS for w in q.split() if len(w) > 3}
    assert not words & {w for t in distill.TOPICS for w in t.split()}


def test_training_steps_cycle_through_corpus_teacher_texts_and_replies(finished):
    # of ILD and KD steps 0-9, steps 1, 3, 4, 6, 8, 9 take their rows from the teacher's texts, steps 2, 7
    # from its replies, steps 0, 5 from their own split
    out = finished[0] / "tiny"
    meta, cfg = M.read_json(out / "data.json"), distill.parse_args(TINY)

    def rows(split):
        return {
            tuple(r) for r in np.fromfile(out / f"data_{split}.bin", dtype=np.uint32).reshape(-1, 64).tolist()
        }

    for split in ("ild", "kd"):
        for step, read in enumerate(["own", "text", "gen", "text", "text"] * 2):
            got = {tuple(r.tolist()) for r in distill.get_batch(str(out), meta, split, step, cfg)}
            assert got and got <= rows(split if read == "own" else read)


@pytest.mark.parametrize("with_text", [True, False])
def test_each_split_a_step_turns_to_is_read_row_block_after_row_block(tmp_path, with_text):
    # every row holds its split and its row number; a split some ILD steps turn to gives all its rows, then
    # all again, and so on: with texts, steps 1, 3, 4, ... read the 8 text rows 2 at a time and steps 2, 7,
    # 12, ... the 6 reply rows; without, steps 2, 5, 8, ... read the replies
    cfg = distill.parse_args(TINY)
    n = dict(ild=40, kd=40, gen=6) | (dict(text=8) if with_text else {})
    for code, (split, rows) in enumerate(n.items()):
        ids = np.arange(rows)[:, None] + 1000 * code + np.zeros((1, cfg.seq_len), dtype=np.int64)
        ids.astype(np.uint32).tofile(tmp_path / f"data_{split}.bin")
    cycle = ["own", "text", "gen", "text", "text"] if with_text else ["own", "own", "gen"]
    reads = {}
    for step in range(40):
        batch = distill.get_batch(str(tmp_path), dict(n=n), "ild", step, cfg)
        split = list(n)[int(batch[0, 0]) // 1000]
        assert split == ("ild" if cycle[step % len(cycle)] == "own" else cycle[step % len(cycle)])
        reads.setdefault(split, []).extend((batch[:, 0] % 1000).tolist())
    for split in ("gen", "text")[: 1 + with_text]:
        for i in range(0, len(reads[split]) - n[split] + 1, n[split]):
            assert sorted(reads[split][i : i + n[split]]) == list(range(n[split]))


def test_unseen_split_is_the_text_of_the_tempest(finished):
    # the unseen-domain rows decode to the start of The Tempest (byte-level tokenizer: one id per byte)
    ids = np.fromfile(finished[0] / "tiny" / "data_unseen.bin", dtype=np.uint32)[:4096].tolist()
    text = convert.Tokenizer.byte_level().decode(ids)
    assert text.startswith("THE TEMPEST") and convert.unseen_text().startswith(text)
