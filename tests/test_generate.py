"""`gptstack generate`: the engine's own output, streamed, with every sampling option of the API."""

import re
from pathlib import Path

import pytest
import torch

import gptstack
from gptstack.checkpoint import load_model
from gptstack.cli import main
from gptstack.inference.engine import Engine, EngineConfig
from gptstack.inference.sampling import SamplingParams, filter_logits, sample
from gptstack.inference.stops import StopMatcher

from conftest import run_cli

CLI_DEFAULTS = {"max_new_tokens": 40, "temperature": 0.8, "top_p": 0.95}


def engine_completion(checkpoint, prompt: str, **params):
    """What the engine writes for ``prompt`` with the CLI's defaults, updated by ``params``."""
    model, tok, _ = load_model(checkpoint)
    engine = Engine(model, tok, EngineConfig(max_batch_size=1, context_shift=True))
    return engine.generate([prompt], SamplingParams(**{**CLI_DEFAULTS, **params}))[0]


def cli_output(capsys, checkpoint, prompt: str, *args: str) -> str:
    """The CLI's output after the prompt it echoes, run in this process."""
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", prompt, "--max-new-tokens", "40", *args]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt)
    return out[len(prompt):]


@pytest.mark.parametrize("args, params, without", [
    (["--seed", "3"], {"seed": 3}, None),
    (["--seed", "3", "--min-p", "0.2"], {"seed": 3, "min_p": 0.2}, {"seed": 3}),
    (["--seed", "3", "--top-k", "3", "--temperature", "1.5"], {"seed": 3, "top_k": 3, "temperature": 1.5},
     {"seed": 3, "temperature": 1.5}),
    (["--temperature", "0", "--frequency-penalty", "1", "--presence-penalty", "0.5", "--repetition-penalty", "1.3"],
     {"temperature": 0, "frequency_penalty": 1, "presence_penalty": 0.5, "repetition_penalty": 1.3},
     {"temperature": 0}),
])
def test_cli_writes_what_the_engine_writes(tiny_checkpoint, capsys, args, params, without):
    """Each option reaches the engine: the same text as the engine's, and another than without it."""
    expected = engine_completion(tiny_checkpoint, "KING:", **params).text
    assert cli_output(capsys, tiny_checkpoint, "KING:", *args) == expected + "\n"
    if without is not None:
        assert engine_completion(tiny_checkpoint, "KING:", **without).text != expected


def checkpoint_ending_at(source, token_id: int, out):
    """``source``'s weights with the same GPT-2 BPE, as a Hugging Face tokenizer.json that names token
    ``token_id`` its end-of-text: the tiny model never writes the real one, but writes this."""
    from tokenizers import ByteLevelBPETokenizer
    from gptstack.checkpoint import save_checkpoint
    from gptstack.tokenizer import HFTokenizer
    assets = Path(gptstack.__file__).parent / "assets" / "tokenizer"
    bpe = ByteLevelBPETokenizer(str(assets / "encoder.json"), str(assets / "vocab.bpe"))
    bpe.save(str(out.parent / "tokenizer.json"))
    model, _, _ = load_model(source)
    tok = HFTokenizer(out.parent / "tokenizer.json", eot_token=bpe.id_to_token(token_id))
    save_checkpoint(out, model, tok)
    return tok


def test_cli_stops_at_end_of_text_unless_told_not_to(tiny_checkpoint, capsys, tmp_path):
    greedy = engine_completion(tiny_checkpoint, "ROMEO:", temperature=0, ignore_eos=True).token_ids
    end = greedy[6]
    tok = checkpoint_ending_at(tiny_checkpoint, end, tmp_path / "ckpt")
    assert tok.encode("ROMEO:") == load_model(tiny_checkpoint)[1].encode("ROMEO:") and tok.eot_id == end
    stopped = cli_output(capsys, tmp_path / "ckpt", "ROMEO:", "--temperature", "0")
    assert stopped == tok.decode(greedy[:greedy.index(end)]) + "\n"
    assert cli_output(capsys, tmp_path / "ckpt", "ROMEO:", "--temperature", "0", "--ignore-eos") == \
        tok.decode(greedy) + "\n"


def test_cli_writes_past_the_context_by_shifting_it(tiny_checkpoint, capsys):
    model, _, _ = load_model(tiny_checkpoint)
    n = model.config.block_size + 44
    expected = engine_completion(tiny_checkpoint, "ROMEO:", max_new_tokens=n, seed=5, ignore_eos=True)
    assert len(expected.token_ids) == n and expected.finish_reason == "length"
    assert cli_output(capsys, tiny_checkpoint, "ROMEO:", "--max-new-tokens", str(n), "--seed", "5",
                      "--ignore-eos") == expected.text + "\n"


def test_cli_numbers_its_samples_and_prints_logprobs(tiny_checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "O", "--max-new-tokens", "6",
                 "--seed", "9", "--num-samples", "2", "--logprobs", "2", "--ignore-eos"]) == 0
    _, tok, _ = load_model(tiny_checkpoint)
    pattern = ""
    for sample, seed in enumerate((9, 10)):      # sample i has seed + i, as the API's n samples do
        completion = engine_completion(tiny_checkpoint, "O", max_new_tokens=6, seed=seed, logprobs=2, ignore_eos=True)
        pattern += re.escape(f"--- sample {sample + 1} ---\nO{completion.text}\n--- logprobs ---\n")
        for token, logprob in zip(completion.token_ids, completion.logprobs, strict=True):
            pattern += re.escape(f"{tok.decode([token])!r}\t{logprob:.4f}\t") + r"[^\n]+ -?\d+\.\d{4}\n"
    assert re.fullmatch(pattern, capsys.readouterr().out)


def test_cli_stops_at_a_stop_string_and_refuses_bad_options(tiny_checkpoint):
    full = engine_completion(tiny_checkpoint, "ROMEO:", seed=1).text
    stop = full[10:13]
    proc = run_cli("generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "40",
                   "--seed", "1", "--stop", stop, check=True)
    assert proc.stdout == "ROMEO:" + full[:full.index(stop)] + "\n"
    bad = run_cli("generate", "--checkpoint", str(tiny_checkpoint), "--top-p", "1.5")
    assert bad.returncode == 2 and "top_p must be in (0, 1]" in bad.stderr


def test_top_k_top_p_and_min_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    one = torch.ones(1)
    kept = filter_logits(logits, one, torch.tensor([2]), one).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, one, torch.tensor([0]), torch.tensor([0.7])).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, one, torch.tensor([0]), torch.tensor([0.1])).isfinite()
    assert kept.tolist() == [[True, False, False, False]]
    kept = filter_logits(logits, one, torch.tensor([0]), one, torch.tensor([0.25])).isfinite()   # p >= 0.125
    assert kept.tolist() == [[True, True, True, False]]
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
