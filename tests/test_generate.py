"""generate.py: cached greedy = recomputed greedy, batch = one by one, sampling uses its arguments.
Run: python -m pytest tests/test_generate.py"""

import pytest
import torch

import model as M
from generate import generate, sample


def hybrid():
    torch.manual_seed(0)
    return M.Model(M.size_config("tiny", kinds=["mla", "m2", "attn", "m2"])).eval()


def greedy_by_recompute(m, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_cached_greedy_equals_recomputing_the_full_sequence():
    m = hybrid()
    prompt = torch.randint(0, 272, (11,)).tolist()
    got = [int(t) for t in generate(m, [prompt], max_new_tokens=24)]
    assert got == greedy_by_recompute(m, prompt, 24)


def test_batch_of_ragged_prompts_equals_one_by_one():
    m = hybrid()
    prompts = [torch.randint(0, 272, (n,)).tolist() for n in (3, 17, 9)]
    batch = torch.stack(list(generate(m, prompts, max_new_tokens=12)), 1)  # (B, 12)
    for b, p in enumerate(prompts):
        assert batch[b].tolist() == [int(t) for t in generate(m, [p], max_new_tokens=12)]


def test_stops_at_stop_token_and_rejects_too_long_prompts():
    m = hybrid()
    prompt = [5, 6, 7]
    first = int(next(generate(m, [prompt], max_new_tokens=5)))
    assert len(list(generate(m, [prompt], max_new_tokens=50, stop_ids={first}))) == 1
    with pytest.raises(ValueError, match="context"):
        next(generate(m, [[1] * 500], max_new_tokens=20))


def test_top_k_and_top_p_use_their_arguments():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    freq = lambda ids: torch.bincount(ids, minlength=4).float() / len(ids)
    f = freq(sample(logits, 1.0, top_k=2, generator=g))
    assert f[2:].sum() == 0 and abs(f[0] - 0.5 / 0.8) < 0.03
    f = freq(sample(logits, 1.0, top_p=0.7, generator=g))  # {0, 1} reach 0.8 >= 0.7; {0} alone does not
    assert f[2:].sum() == 0 and abs(f[1] - 0.3 / 0.8) < 0.03
    f = freq(sample(logits, 1.0, top_p=0.9, generator=g))
    assert f[3] == 0 and f[2] > 0.1
    f = freq(sample(logits, 1.0, generator=g))
    assert abs(f[3] - 0.05) < 0.02
    assert sample(logits[:2], 0.0).tolist() == [0, 0]
