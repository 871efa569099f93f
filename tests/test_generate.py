import pytest
import torch

from gptstack.checkpoint import load_model
from gptstack.inference.generate import StopMatcher, generate_text, generate_tokens
from gptstack.inference.sampling import SamplingParams, filter_logits, sample

from conftest import run_cli


def test_cached_greedy_generation_equals_recomputing_everything(tiny_checkpoint):
    model, tok, _ = load_model(tiny_checkpoint)
    prompt = tok.encode("ROMEO:\nWhat")
    got = list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=20, temperature=0)))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    assert got == ids[len(prompt):]


def test_generation_past_the_context_shifts_instead_of_failing(tiny_checkpoint):
    model, tok, _ = load_model(tiny_checkpoint)
    out = list(generate_tokens(model, tok.encode("a b c"), SamplingParams(max_new_tokens=300, temperature=0)))
    assert len(out) == 300 > model.config.block_size


def test_seed_makes_sampling_repeatable(tiny_checkpoint):
    model, tok, _ = load_model(tiny_checkpoint)
    params = SamplingParams(max_new_tokens=15, temperature=1.0, top_p=0.9, seed=42)
    first = "".join(generate_text(model, tok, "KING:", params))
    assert first == "".join(generate_text(model, tok, "KING:", params))
    assert first != "".join(generate_text(model, tok, "KING:", SamplingParams(max_new_tokens=15, seed=43)))


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    one = torch.ones(1)
    kept = filter_logits(logits, one, torch.tensor([2]), one).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, one, torch.tensor([0]), torch.tensor([0.7])).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, one, torch.tensor([0]), torch.tensor([0.1])).isfinite()
    assert kept.tolist() == [[True, False, False, False]]
    assert sample(logits, torch.zeros(1), torch.zeros(1, dtype=torch.long), one).item() == 0


def test_stop_matcher_holds_back_partial_matches():
    stops = StopMatcher(["\n\n", "END"])
    assert stops.push("hello E") == ("hello ", False)
    assert stops.push("N") == ("", False)
    assert stops.push("x") == ("ENx", False)
    assert stops.push(" more\n") == (" more", False)
    assert stops.push("\nafter") == ("", True)


def test_bad_sampling_params():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0).validate()
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1).validate()


def test_cli_generate_streams_and_stops(tiny_checkpoint):
    proc = run_cli("generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "40",
                   "--seed", "1", "--stop", "\n", check=True)
    assert proc.stdout.startswith("ROMEO:")
    body = proc.stdout[len("ROMEO:"):-1]
    assert "\n" not in body
    bad = run_cli("generate", "--checkpoint", str(tiny_checkpoint), "--top-p", "1.5")
    assert bad.returncode == 2 and "top_p must be in (0, 1]" in bad.stderr
