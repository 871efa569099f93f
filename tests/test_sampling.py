"""The draw of the sampler: the C++ race against its PyTorch twin, and the distribution it draws."""

import math

import pytest
import torch

from gptstack.inference.sampling import draw, race_sample_reference, race_uniforms
from gptstack.ops import library


def random_probs(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    probs = torch.rand(rows, vocab) ** 4
    probs[:, ::5] = 0                      # filtered tokens
    return probs / probs.sum(dim=-1, keepdim=True)


@pytest.mark.skipif(library is None, reason="the kernels are not built")
def test_the_cpp_race_draws_what_its_pytorch_twin_draws():
    probs = random_probs(64, 50257)
    keys = torch.randint(0, 2 ** 62, (64,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(library.race_sample(probs, keys), race_sample_reference(probs, keys))


def test_draws_follow_the_probabilities_and_never_take_a_filtered_token():
    probs = torch.tensor([[0.05, 0.0, 0.6, 0.25, 0.1, 0.0]])
    generator = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(torch.cat([draw(probs, generator) for _ in range(n)]), minlength=6).double()
    assert counts[1] == 0 and counts[5] == 0
    expected = probs[0].double() * n
    sigma = (expected * (1 - probs[0].double())).sqrt()
    kept = expected > 0
    assert ((counts[kept] - expected[kept]).abs() <= 4 * sigma[kept]).all(), counts / n


def test_a_rows_draw_is_its_own_alone_or_in_a_batch():
    probs = random_probs(5, 1000, seed=3)
    alone = [draw(probs[i:i + 1], torch.Generator().manual_seed(i))[0] for i in range(5)]
    together = draw(probs, [torch.Generator().manual_seed(i) for i in range(5)])
    assert torch.equal(torch.stack(alone), together)
    other = draw(probs, [torch.Generator().manual_seed(100 + i) for i in range(5)])
    assert not torch.equal(other, together)      # another seed, other draws (a 1e-3 chance each to agree)


def test_the_race_numbers_are_uniform_and_an_even_race_goes_to_the_largest():
    """The counter-based numbers behind the race have U(0, 1)'s mean and variance; with equal
    probabilities the race takes the token of the smallest E = -log U, the largest U."""
    keys = torch.tensor([12345, 678])
    uniform = race_uniforms(keys, 200000)
    assert ((uniform > 0) & (uniform < 1)).all()
    assert (uniform.mean(dim=1) - 0.5).abs().max() < 4 * math.sqrt(1 / 12 / 200000)
    assert (uniform.var(dim=1) - 1 / 12).abs().max() < 1e-3
    assert not torch.equal(uniform[0], uniform[1])
    even = torch.full((2, 200000), 1 / 200000)
    assert torch.equal(race_sample_reference(even, keys), uniform.argmax(dim=1))
