"""How well ``--scrub-pii`` finds what it should and leaves what it should: a labelled set made by
putting values into lines of the shipped Shakespeare corpus, then recall and precision per type,
ordinary numbers wrongly removed, and throughput over the whole corpus.

    pip install -e '.[pii-eval]'
    python bench/pii.py --per-type 1000

Values come from Faker in several locales (structured types) and from format-following random
strings (keys, which Faker does not make); addresses are Faker's street addresses, one locale in
turn, with their per-locale recall. Names do NOT come from Faker: the person names of the
shipped WNUT 2017 data (tweets) and a hand-picked list from many cultures are used, half with a cue
("Dear", "Mr.") before them and half bare, so the figure is not a detector scoring its own lists.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import re
import string
import time
from collections import Counter, defaultdict
from pathlib import Path

from faker import Faker

from gptstack.data.pii import TYPES, Scrubber
from machine import cpu_model   # bench/machine.py

ASSETS = Path(__file__).resolve().parents[1] / "src" / "gptstack" / "assets"
CORPUS = ASSETS / "corpus" / "tinyshakespeare.txt"
LOCALES = ["en_US", "en_GB", "de_DE", "fr_FR", "it_IT", "es_ES", "nl_NL", "pl_PL", "pt_BR", "ja_JP"]
# written for this benchmark, from many cultures; none generated
HAND_PICKED_NAMES = [
    "Ngozi Okonkwo", "Chidi Nwosu", "Aiko Tanaka", "Wei Zhang", "Priya Raghunathan", "Oluwaseun Adeyemi",
    "Siobhán Ní Bhriain", "Mehmet Yılmaz", "Fatima Al-Sayed", "Kwame Mensah", "Astrid Lindqvist", "Björn Håkansson",
    "Anh Nguyen", "Thandiwe Ndlovu", "Rahul Deshpande", "Hiroshi Watanabe", "Ingrid Solberg", "Tomasz Wiśniewski",
    "Zeynep Kaya", "Javier Ortega", "Marisol Castañeda", "Dmitri Volkov", "Olga Petrenko", "Ayesha Siddiqui",
    "Bilal Haddad", "Leilani Kahale", "Tupac Quispe", "Amara Diallo", "Sven Eriksen", "Margit Horváth",
    "Nikos Papadopoulos", "Eleni Georgiou", "Keanu Makoa", "Yusuf Demir", "Chen Jing", "Min-jun Park",
    "Seo-yeon Kim", "Lars van der Berg", "Pieter de Vries", "Anneke Jansen", "Jean-Luc Moreau", "Émilie Fontaine",
    "Giulia Marchetti", "Lorenzo Esposito", "Ana Lúcia Ferreira", "João Pedro Carvalho", "Aroha Ngata",
    "Tariq Rahman", "Noor Hassan", "Kofi Boateng", "Esi Owusu", "Juan Carlos Mendoza", "Camila Restrepo",
    "Ravi Subramanian", "Lakshmi Narayanan", "Ahmed Mansour", "Layla Nasser", "Daniel Okafor", "Grace Achieng",
    "Samuel Kiprop", "Hannah Goldberg", "Miriam Rosen", "Patrick O'Sullivan", "Eilidh MacLeod", "Rhys Llewellyn"]
NAME_CUES = ["Dear {}, ", "Mr. {} said ", "Dr. {} wrote ", "my name is {} and "]
NAME_BARE = ["{} wrote ", "I met {} today ", "with {} ", "{}: "]
VALUE_CONTEXTS = ["{} ", "({}) ", "at {}, ", "contact: {} "]
DECOYS = [lambda r: str(r.randint(1200, 2030)), lambda r: f"${r.randint(1, 999)}.{r.randint(0, 99):02d}",
          lambda r: f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}", lambda r: f"{r.randint(0, 12)}.{r.randint(0, 20)}.{r.randint(0, 9)}",
          lambda r: f"Chapter {r.randint(1, 60)}", lambda r: f"{r.randint(1990, 2030)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
          lambda r: f"{r.randint(1, 28)}.{r.randint(1, 12)}.{r.randint(1900, 2030)}", lambda r: f"{r.randint(1, 28)}/{r.randint(1, 12)}/{r.randint(1900, 2030)}",
          lambda r: f"{r.randint(1, 99)}%", lambda r: f"{r.randint(1, 999)},{r.randint(0, 999):03d}",
          lambda r: f"{r.randint(1500, 1700)}-{r.randint(1700, 1900)}", lambda r: f"page {r.randint(1, 999)}",
          lambda r: f"v{r.randint(0, 9)}.{r.randint(0, 30)}.{r.randint(0, 30)}", lambda r: f"{r.randint(1, 9)}.{r.randint(0, 99)} kg"]


def wnut_person_names() -> list[str]:
    """Person entities of two or more title-cased words from the shipped WNUT 2017 data."""
    found, current = set(), []
    for split in ("train.conll", "dev.conll"):
        for line in (ASSETS / "wnut17" / split).read_text(encoding="utf-8").splitlines() + [""]:
            token, _, tag = line.partition("\t")
            if tag.endswith("person") and not (tag.startswith("B-") and current):
                current.append(token)
                continue
            if len(current) >= 2 and all(re.fullmatch(r"[A-Z][a-z]+(?:[A-Z][a-z]+)?", w) for w in current):
                found.add(" ".join(current))
            current = [token] if tag.endswith("person") else []
    return sorted(found)


def random_secret(rng: random.Random) -> str:
    def chars(n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    def b64(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
    makers = [lambda: "AKIA" + chars(16, string.ascii_uppercase + string.digits),
              lambda: "ghp_" + chars(36), lambda: "github_pat_" + chars(22) + "_" + chars(59),
              lambda: f"xoxb-{chars(11, string.digits)}-{chars(12, string.digits)}-{chars(24)}",
              lambda: "AIza" + chars(35, string.ascii_letters + string.digits + "_-"),
              lambda: "sk-proj-" + chars(48), lambda: "sk_live_" + chars(24),
              lambda: f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64({'sub': chars(8), 'iat': rng.randint(1, 2**31)})}.{chars(43)}",
              lambda: "-----BEGIN PRIVATE KEY-----\n" + "\n".join(chars(64) for _ in range(4)) + "\n-----END PRIVATE KEY-----",
              lambda: "password=" + seeded(Faker(), rng).password(length=12)]
    return rng.choice(makers)()


def seeded(fake: Faker, rng: random.Random) -> Faker:
    fake.seed_instance(rng.randint(0, 2**31))
    return fake


def values(kind: str, n: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """n (label, text, the part of it that must go) of a type; an address's label names its locale."""
    fakers = [seeded(Faker(locale), rng) for locale in LOCALES]
    out = []
    for i in range(n):
        locale, fake = LOCALES[i % len(LOCALES)], fakers[i % len(fakers)]
        if kind == "EMAIL":
            value = rng.choice([fake.email, fake.free_email, fake.company_email])()
        elif kind == "PHONE":
            value = fake.phone_number()
        elif kind == "CARD":
            value = fakers[0].credit_card_number()
            value = " ".join(value[k:k + 4] for k in range(0, len(value), 4)) if i % 2 and len(value) == 16 else value
        elif kind == "IBAN":
            value = fake.iban()
            value = " ".join(value[k:k + 4] for k in range(0, len(value), 4)) if i % 2 else value
        elif kind == "SSN":
            value = fakers[0].ssn()
        elif kind == "IP":
            value = rng.choice([fake.ipv4, fake.ipv4_private, fake.ipv6])()
        elif kind == "SECRET":
            value = random_secret(rng)
        elif kind == "ADDRESS":     # a British flat is written on a line of its own: here after a comma
            value = fake.street_address().replace("\n", ", ").strip()
        label = f"ADDRESS_{locale}" if kind == "ADDRESS" else kind
        if kind == "SECRET" and value.startswith("password="):
            out.append((label, value, value[len("password="):]))
        else:
            out.append((label, value, value))
    return out


def labelled_lines(per_type: int, seed: int) -> tuple[list[str], list[tuple[int, int, int, str]], dict]:
    """Corpus lines with values put in: the lines, the labelled spans (line, start, end, type; a
    NAME type is NAME_CUED or NAME_BARE, an ADDRESS one ADDRESS_<locale>) and the decoys' spans."""
    rng = random.Random(seed)
    corpus = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    items = [(label, text, secret, rng.choice(VALUE_CONTEXTS)) for kind in TYPES if kind != "NAME"
             for label, text, secret in values(kind, per_type, rng)]
    held_out = wnut_person_names() + HAND_PICKED_NAMES
    for i in range(per_type):
        name, cued = rng.choice(held_out), i % 2 == 0
        items.append(("NAME_CUED" if cued else "NAME_BARE", name, name, rng.choice(NAME_CUES if cued else NAME_BARE)))
    items += [("DECOY", text, text, "{} ") for text in (rng.choice(DECOYS)(rng) for _ in range(per_type * 2))]
    rng.shuffle(items)
    lines, spans = [], []
    for kind, text, secret, context in items:
        line = rng.choice(corpus)
        words = [m.start() for m in re.finditer(r"(?<=\s)\S", line)] or [0]
        at = rng.choice(words + [len(line)])
        before = line[:at] + ("" if at == 0 or line[at - 1] == " " else " ")
        inserted = context.format(text)
        start = len(before) + inserted.index(text) + text.index(secret)
        spans.append((len(lines), start, start + len(secret), kind))
        lines.append(before + inserted + line[at:])
    return lines, spans, {"held_out_names": len(held_out)}


def evaluate(lines: list[str], spans: list[tuple[int, int, int, str]], scrubber: Scrubber) -> dict:
    findings = [scrubber.find(line) for line in lines]
    by_line = defaultdict(list)
    for line, start, end, kind in spans:
        by_line[line].append((start, end, kind))
    found, total, wrong_decoys = Counter(), Counter(), 0
    true_findings, all_findings = Counter(), Counter()
    for index, line_findings in enumerate(findings):
        for start, end, kind in by_line[index]:
            covering = [f for f in line_findings if f.start <= start and end <= f.end]
            overlapping = [f for f in line_findings if f.start < end and start < f.end]
            total[kind] += 1
            if kind == "DECOY":
                wrong_decoys += bool(overlapping)
            elif any(f.kind == kind.partition("_")[0] for f in covering):
                found[kind] += 1
        for f in line_findings:
            all_findings[f.kind] += 1
            true_findings[f.kind] += any(f.start < end and start < f.end and kind.partition("_")[0] == f.kind
                                         for start, end, kind in by_line[index])
    return {"found": found, "total": total, "wrong_decoys": wrong_decoys, "true": true_findings, "all": all_findings}


def throughput(scrubber: Scrubber, repeats: int = 3) -> float:
    text = CORPUS.read_text(encoding="utf-8")
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        scrubber.scrub(text)
        best = min(best, time.perf_counter() - started)
    return len(text.encode()) / best / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-type", type=int, default=1000, help="values of each type put into the corpus")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lines, spans, info = labelled_lines(args.per_type, args.seed)
    scrubber = Scrubber()
    result = evaluate(lines, spans, scrubber)
    in_corpus = Counter(f.kind for f in scrubber.find(CORPUS.read_text(encoding="utf-8")))
    print(f"{len(lines)} corpus lines with one value each, seed {args.seed}; CPU: {cpu_model()}\n")
    print("| type | values | recall | precision (findings of the type that are labelled) |")
    print("|---|---:|---:|---:|")
    for kind in TYPES:
        rows = [k for k in result["total"] if k.partition("_")[0] == kind]
        found, total = sum(result["found"][k] for k in rows), sum(result["total"][k] for k in rows)
        precision = result["true"][kind] / result["all"][kind] if result["all"][kind] else float("nan")
        print(f"| {kind} | {total} | {found / total:.2%} | {precision:.2%} ({result['all'][kind]} findings) |")
        if kind in ("NAME", "ADDRESS"):
            for k in sorted(rows):
                print(f"| &nbsp; {k.lower().replace('_', ', ', 1)} | {result['total'][k]} | "
                      f"{result['found'][k] / result['total'][k]:.2%} | |")
    decoys = result["total"]["DECOY"]
    print(f"\nordinary numbers wrongly removed: {result['wrong_decoys']} of {decoys} "
          f"({result['wrong_decoys'] / decoys:.2%})")
    print(f"held-out names drawn from: {info['held_out_names']} (WNUT 2017 person entities + hand-picked)")
    print(f"findings in the unmodified corpus (false positives unless a character's name): {dict(in_corpus)}")
    print(f"throughput over {CORPUS.name}: all types {throughput(scrubber):.1f} MB/s, "
          f"without NAME {throughput(Scrubber(types=tuple(t for t in TYPES if t != 'NAME'))):.1f} MB/s (one core)")


if __name__ == "__main__":
    main()
