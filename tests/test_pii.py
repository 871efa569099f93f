"""Personal and secret data: each detector on values of several countries and brands, ordinary
numbers left alone, pseudonyms, the streamed redactor, and scrubbing through `gptstack prepare`,
a fine-tune and a live server."""

import json
import re
import time

import httpx
import numpy as np
import pytest

from gptstack.config import parse_pii_types, pii_settings
from gptstack.data.pii import Scrubber, StreamRedactor, iban_valid, luhn_valid, run_key
from gptstack.data.prepare import DataError, ensure_prepared, prepare
from gptstack.tokenizer import load_tokenizer

from conftest import Server, cli_args, run_cli, tiny_finetune_overrides

FOUND = {
    "EMAIL": ["jane.roe@example.org", "o'neil+tag@mail.example.co.uk", "müller@beispiel.de"],
    "PHONE": ["+44 20 7946 0958", "+49 (0) 30 901820", "+33 1 42 68 53 00", "+81 3-1234-5678", "(415) 555-0132",
              "+1-202-555-0173x123", "030 901820 11", "+39 06 6982 1234", "+55 11 91234-5678"],
    "CARD": ["4111 1111 1111 1111", "5555-5555-5555-4444", "3782 822463 10005", "6011111111111117",
             "3530111333300000", "6759649826438453"],
    "IBAN": ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "FR1420041010050500013M02606",
             "NL91ABNA0417164300", "ES91 2100 0418 4502 0005 1332", "CH9300762011623852957"],
    "SSN": ["078-05-1120", "219-09-9999"],
    "IP": ["192.168.1.20", "8.8.4.4", "2001:db8:85a3::8a2e:370:7334", "fe80::1ff:fe23:4567:890a"],
    "SECRET": ["AKIAIOSFODNN7EXAMPLE", "ghp_" + "a1B2" * 9, "xoxb-123456789012-abcdefGHIJKL",
               "AIza" + "Sy" * 17 + "X", "sk-proj-" + "Ab3" * 10, "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc",
               "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
               "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM\n-----END RSA PRIVATE KEY-----"],
    "ADDRESS": ["221B Baker Street", "1600 Pennsylvania Avenue", "Flat 3, 12 Kings Road",
                "742 Evergreen Terrace Apt. 2", "12 Elm St.", "8, rue de la Paix", "Via Roma, 12", "Calle Mayor 5 Piso 2", "Rua Augusta, 274",
                "ul. Marszałkowska 84/92", "Hauptstraße 5", "Hans-Müller-Straße 12a", "Jansenstraat 7",
                "神南1丁目2番3号"],
    "NAME": ["Ngozi Okonkwo", "Jürgen Müller", "Mary-Jane O'Brien"],
}
CONTEXT = {"NAME": "Dear {}, the ship sails at noon.", "SECRET": "deploy with {} tonight"}
ORDINARY = ("In 1599 the Globe opened; tickets cost $12.99 or 3,500 pounds at 10:30 on 2021-03-04 and 12.03.2021. "
            "Python 3.10.2 needs 4 GB; see Chapter 12, page 214, verses 1914-1918, 45% of 7 days, v2.4.1. "
            "In Act 2 Scene 1 of Henry V the 3 Green Apples and 2 Big Ideas take route 66 for 5 Long Days. "
            "During 1990 and in Spring 2021 the Offering 3 stood at 67%. Send 5 Items via post: 10 Best Places, "
            "5 Easy Ways, 4 Great Lakes, 2nd place, 3rd Street fair. On 17 March St. Patrick came; on 5 May Dr. "
            "visits stop. Chapter 12 The Way of Kings; et al. Nature 2019; Appendix C. Notes 2001; Keypad 2.")


@pytest.mark.parametrize("kind,value", [(kind, value) for kind, values in FOUND.items() for value in values])
def test_each_type_is_found_and_replaced_by_its_tag(kind, value):
    text = CONTEXT.get(kind, "contact: {} please").format(value)
    scrubbed, counts = Scrubber().scrub(text)
    assert value not in scrubbed
    assert counts == {kind: 1}
    assert scrubbed == text.replace(value, f"<{kind}>")


def test_checksums_and_never_issued_numbers_are_refused():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("DE89370400440532013000") and not iban_valid("DE88370400440532013000")
    for text in ("card 4111 1111 1111 1112", "IBAN DE88 3704 0044 0532 0130 00", "SSN 666-12-3456",
                 "SSN 123-00-4567", "addr 999.1.1.1", "secret: --nurse, come"):
        assert Scrubber().scrub(text) == (text, {}), text


def test_ordinary_numbers_survive():
    assert Scrubber().scrub(ORDINARY) == (ORDINARY, {})


def test_pseudonyms_are_consistent_per_value_and_key():
    text = "mail a.b@example.com, then A.B@example.com, not c.d@example.com; call +44 20 7946 0958 or +442079460958"
    scrubbed, counts = Scrubber(replacement="pseudonym", key=b"run-1").scrub(text)
    emails = re.findall(r"<EMAIL_[0-9a-f]{8}>", scrubbed)
    phones = re.findall(r"<PHONE_[0-9a-f]{8}>", scrubbed)
    assert counts == {"EMAIL": 3, "PHONE": 2}
    assert emails[0] == emails[1] != emails[2] and phones[0] == phones[1]
    other_run = Scrubber(replacement="pseudonym", key=b"run-2").scrub(text)[0]
    assert set(re.findall(r"<EMAIL_\w+>", other_run)).isdisjoint(emails)
    with pytest.raises(ValueError, match="key"):
        Scrubber(replacement="pseudonym")


def test_bad_settings_are_clear_errors():
    assert parse_pii_types("email, Phone") == ("EMAIL", "PHONE")
    with pytest.raises(ValueError, match="POSTCODE"):
        parse_pii_types("email,postcode")
    with pytest.raises(ValueError, match="replacement"):
        pii_settings(True, "blank", "all")
    proc = run_cli("prepare", "x.txt", "--out", "y", "--scrub-pii", "--pii-types", "email,shoe")
    assert proc.returncode == 2 and "SHOE" in proc.stderr


LONG_EMAIL = "jane.roe.of.the.accounts.payable.department@invoices.north-west-region.example.org"   # 80 characters
JWT = FOUND["SECRET"][6]       # recognised only once its third part has arrived


def streamed(text: str, size: int) -> list[str]:
    """What a StreamRedactor sends of ``text`` arriving ``size`` characters at a time."""
    redactor = StreamRedactor(Scrubber())
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    return [redactor.push(piece, last=i == len(pieces) - 1) for i, piece in enumerate(pieces)]


def test_streamed_text_never_shows_a_value_cut_between_pieces():
    text = (f"Write to jane.roe@example.org or call +44 20 7946 0958 today. {FOUND['SECRET'][-1]} done; "
            f"the token is {JWT} and the ledger goes to {LONG_EMAIL} with the password: hunter2hunter2 "
            f"by Friday, Dear {FOUND['NAME'][0]}.")
    for size in (1, 3, 7, 40):
        sent = streamed(text, size)
        assert "".join(sent) == Scrubber().scrub(text)[0]
        assert not any(fragment in piece for piece in sent
                       for fragment in ("jane.roe", "7946", "MIIEp", JWT[:12], "hunter2", "Okonkwo"))


def test_a_stream_without_whitespace_is_still_sent_before_its_end():
    text = "x" * (3 * StreamRedactor.MAX_RUN)
    sent = streamed(text, 7)
    assert "".join(sent) == text
    assert len("".join(sent[:-1])) >= 2 * StreamRedactor.MAX_RUN     # not all held back to the last piece
    assert max(len(piece) for piece in sent) <= StreamRedactor.MAX_RUN + StreamRedactor.HOLD + 7


@pytest.mark.parametrize("text", ["Aa-" * 20000, "Mr. " + "Aa-" * 20000, "Dear " + "Ää-" * 20000, "@" + "O'" * 30000,
                                  "@" + "a-" * 30000, "eyJa" * 15000, "eyJ-" * 15000, "Aa de " * 10000,
                                  "1 Aa-" * 12000, "1 " + "Aa-" * 20000 + "straße 1", "Via de " * 8000 + "1",
                                  "中1" * 30000, "Apt 1, " * 9000, "12 Aa Bb " * 6000])
def test_adversarial_text_is_scrubbed_in_linear_time(text):
    """Texts that made a detector try a match from each character and read on to the end of the
    text (quadratic time: 60 000 characters took minutes): a denial of service on the server's log."""
    started = time.perf_counter()
    Scrubber().scrub(text)
    assert time.perf_counter() - started < 2.0


def decoded(dataset) -> str:
    manifest = json.loads((dataset / "manifest.json").read_text())
    tokens = np.concatenate([np.fromfile(dataset / shard["file"], dtype=manifest["dtype"])
                             for split in manifest["splits"].values() for shard in split["shards"]])
    return load_tokenizer(manifest["tokenizer"], base_dir=dataset).decode(tokens.tolist())


def test_prepare_scrubs_before_tokenizing_and_reports_counts_per_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text(f"Mail {FOUND['EMAIL'][0]} or call {FOUND['PHONE'][0]}.\n{ORDINARY}\nDear Ngozi Okonkwo,\n")
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"text": f"server {ip} with key {FOUND['SECRET'][0]}"}) + "\n"
                               for ip in FOUND["IP"]))
    out = tmp_path / "out"
    proc = run_cli("prepare", str(notes), str(records), "--out", str(out), "--scrub-pii", "--quiet",
                   "--val-fraction", "0", check=True)
    report = json.loads((out / "pii_report.json").read_text())
    for path in (notes, records):
        expected = Scrubber().scrub(path.read_text())[1]
        assert {k: v for k, v in report["files"][str(path)].items() if v} == expected
    assert sum(report["replaced"].values()) == sum(sum(f.values()) for f in report["files"].values()) > 0
    text = decoded(out)
    values = [FOUND["EMAIL"][0], FOUND["PHONE"][0], "Okonkwo", FOUND["SECRET"][0], *FOUND["IP"]]
    for value in values:
        assert value not in text and value not in proc.stdout and value not in (out / "pii_report.json").read_text()
    assert "<EMAIL>" in text and ORDINARY in text
    assert f"{notes}: " in proc.stdout and "EMAIL 1" in proc.stdout


def test_training_refuses_a_dataset_not_scrubbed_as_asked(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("call +44 20 7946 0958 tomorrow\n" * 50)
    ensure_prepared(text, tmp_path / "cache", progress=False)
    with pytest.raises(DataError, match="without --scrub-pii"):
        ensure_prepared(text, tmp_path / "cache", progress=False, pii=pii_settings(True, "tag", "all"))
    scrubbed = ensure_prepared(text, tmp_path / "other", progress=False, pii=pii_settings(True, "tag", "all"))
    assert "7946" not in decoded(scrubbed) and "<PHONE>" in decoded(scrubbed)


def test_finetune_scrubs_its_records(tiny_checkpoint, tmp_path):
    data = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"I am Dr. Ngozi Okonkwo, mail me at user{i}@example.org"},
                          {"role": "assistant", "content": f"Noted; I will call +44 20 7946 {1000 + i}."}]}
            for i in range(20)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    overrides = tiny_finetune_overrides(tiny_checkpoint, data, out, task="sft", max_steps=2, eval_interval=2,
                                        batch_size=4, scrub_pii=True, pii_replacement="pseudonym")
    run_cli("finetune", *cli_args(overrides), check=True)
    written = (out / "splits" / "train.jsonl").read_text() + (out / "splits" / "val.jsonl").read_text()
    assert "example.org" not in written and "7946" not in written and "Okonkwo" not in written
    assert len(set(re.findall(r"<EMAIL_\w+>", written))) == 20       # twenty people, twenty pseudonyms
    report = json.loads((out / "pii_report.json").read_text())
    assert report["files"][str(data)]["EMAIL"] == report["files"][str(data)]["PHONE"] == 20
    assert (out / "pii_key").stat().st_mode & 0o777 == 0o600
    resumed = run_cli("finetune", *cli_args({**overrides, "max_steps": 3}), check=True)   # the run's key again
    assert "done: 3 steps" in resumed.stdout
    assert (out / "splits" / "train.jsonl").read_text() + (out / "splits" / "val.jsonl").read_text() == written


def test_a_runs_datasets_share_its_pseudonym_key(tmp_path):
    """Training and validation text prepared by one `gptstack train` get the same pseudonyms."""
    from gptstack.train.distributed import DistInfo
    from gptstack.train.pretrain import prepared_dataset
    for name in ("train", "val"):
        (tmp_path / f"{name}.txt").write_text("mail jane.roe@example.org today\n" * 20)
    run, pii = tmp_path / "run", pii_settings(True, "pseudonym", "EMAIL")
    texts = [decoded(prepared_dataset(str(tmp_path / f"{name}.txt"), run, "gpt2", DistInfo(), False, pii))
             for name in ("train", "val")]
    assert len({pseudonym for text in texts for pseudonym in re.findall(r"<EMAIL_\w+>", text)}) == 1
    assert (run / "pii_key").stat().st_mode & 0o777 == 0o600


def test_a_preparation_keeps_its_own_key_private_until_it_ends(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("mail jane.roe@example.org today\n" * 20)
    key = run_key(tmp_path / "out")         # as an interrupted preparation left it
    assert (tmp_path / "out" / "pii_key").stat().st_mode & 0o777 == 0o600 and run_key(tmp_path / "out") == key
    prepare([corpus], tmp_path / "out", progress=False, scrub_pii=True, pii_replacement="pseudonym")
    expected = Scrubber(replacement="pseudonym", key=key).scrub("jane.roe@example.org")[0]
    assert expected in decoded(tmp_path / "out")         # the key found, not a new one
    assert not (tmp_path / "out" / "pii_key").exists()   # and gone with the finished preparation
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pii_key").write_text("0123")
    with pytest.raises(ValueError, match="does not hold a pseudonym key"):
        run_key(tmp_path / "bad")


def test_server_logs_prompts_scrubbed_and_redacts_its_output(tiny_checkpoint, server):
    # (ended by a line break: a value glued to generated letters, "...1111MON", would be another text)
    prompt = f"Mail {FOUND['EMAIL'][0]} or call {FOUND['PHONE'][0]} about card {FOUND['CARD'][0]}.\n"
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "echo": True, "seed": 0}
    plain = httpx.post(server.url + "/v1/completions", headers=server.headers, json=body, timeout=60)
    assert plain.json()["choices"][0]["text"].startswith(prompt)       # no --redact-output: as generated
    assert FOUND["EMAIL"][0] not in server.output() and "<EMAIL>" not in server.output()   # no prompt logged
    redacting = Server(tiny_checkpoint, "--log-prompts", "--redact-output")
    try:
        answer = httpx.post(redacting.url + "/v1/completions", headers=redacting.headers, json=body, timeout=60).json()
        assert answer["choices"][0]["text"].startswith("Mail <EMAIL> or call <PHONE> about card <CARD>")
        with httpx.stream("POST", redacting.url + "/v1/completions", headers=redacting.headers,
                          json={**body, "stream": True}, timeout=60) as stream:
            chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
        streamed = "".join(c["choices"][0]["text"] for c in chunks)
        assert streamed.startswith("Mail <EMAIL> or call <PHONE> about card <CARD>")
        refused = httpx.post(redacting.url + "/v1/completions", headers=redacting.headers,
                             json={**body, "logprobs": 1}, timeout=60)
        assert refused.status_code == 400 and "logprobs" in refused.json()["error"]["message"]
        log = redacting.output()
        assert "Mail <EMAIL> or call <PHONE> about card <CARD>" in log
        assert all(value not in log for value in (FOUND["EMAIL"][0], FOUND["PHONE"][0], FOUND["CARD"][0]))
    finally:
        redacting.stop()


def test_scrubbing_in_worker_processes_writes_what_one_process_writes(tmp_path):
    from conftest import CORPUS
    lines = CORPUS.read_text().splitlines()[:20000]
    for i in range(0, len(lines), 500):            # a value every 500 lines, across several pieces
        lines[i] += f" mail user{i}@example.org"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines))
    outputs = [prepare([corpus], tmp_path / f"out{workers}", workers=workers, progress=False, scrub_pii=True)
               for workers in (1, 2)]
    assert outputs[0]["pii"]["replaced"]["EMAIL"] == outputs[1]["pii"]["replaced"]["EMAIL"] == len(range(0, 20000, 500))
    assert decoded(tmp_path / "out1") == decoded(tmp_path / "out2")
    assert "example.org" not in decoded(tmp_path / "out2")
