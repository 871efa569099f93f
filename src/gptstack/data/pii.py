"""Finding and replacing personal and secret data in text: ``--scrub-pii`` of ``gptstack prepare``
and of fine-tuning, and the server's scrubbed prompt log and ``--redact-output``.

Each type is a compiled regular expression whose candidates a validator then checks, so that
ordinary numbers (years, prices, times, versions, dates) survive:

- EMAIL: local part, ``@``, a dotted domain ending in a letters-only top-level domain.
- PHONE: digit groups with phone separators (``+``/``00`` prefix, spaces, dots, dashes,
  parentheses, an extension), 7 to 15 digits; numbers written internationally must have a real
  country code and a possible length for it (Google's libphonenumber, the ``phonenumbers``
  package); date, year-range and SSN shapes are refused; a run of digits with no separator counts
  only from 9 digits on (8 after a trunk prefix 0).
- CARD: 12 to 19 digits (Maestro has 12), whole or in groups of four (American Express 4-6-5),
  with a valid Luhn check digit.
- IBAN: a country code, check digits and the account, whole or in groups of four, cut to the
  country's registered length and passing the ISO 13616 mod-97 check.
- SSN: US Social Security numbers ``AAA-GG-SSSS`` outside the never-issued ranges.
- IP: IPv4 and IPv6 addresses that Python's ``ipaddress`` accepts.
- SECRET: cloud and service keys by their documented prefixes (AWS, GitHub, Slack, Google,
  OpenAI, Stripe), JSON Web Tokens, PEM private-key blocks, and the value after a word such as
  ``password=`` or ``api_key:`` when it has a digit in it or 16 characters.
- ADDRESS: a house number beside a street's name that holds a word for a street, in the English,
  French, Italian, Spanish, Portuguese, Polish, German and Dutch word orders, or Japanese block
  numbers; a flat or suite beside it is taken too.
- NAME: words after a cue (Mr., Dr., Frau, "my name is", "Dear" ...), and a given name from the
  1990 US Census lists (assets/pii/, public domain) followed by a capitalised word. Names with
  no cue whose first name is not on those lists are missed: see docs/security.md.

Overlapping findings keep the more specific type (SECRET > EMAIL > IBAN > CARD > SSN > IP >
PHONE > ADDRESS > NAME), then the longer span.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import tempfile
from collections import Counter
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import phonenumbers

from ..config import PII_TYPES as TYPES, check_replacement

KEY_FILE = "pii_key"
KEY_BYTES = 32


class Finding(NamedTuple):
    kind: str
    start: int
    end: int


# --- the detectors: each a text -> (start, end) spans function ------------------------------------
# A regular expression is costly per character, so the detectors of values that always hold a
# digit, an "@" or a keyword run only in the stretches of text around one: in prose that is a
# small part of the text (a corpus full of numbers is searched whole, no slower than without).

SPACE = re.compile(r"\s")
DIGITS = re.compile(r"\d+")
AT_SIGN = re.compile("@")
NEAR_DIGITS = 48             # the longest value found around digits (an IPv6 or a spaced IBAN) fits in this
NEAR_AT_SIGN = 64            # the longest local part of an e-mail address (RFC 5321)


def _windows(text: str, hits: Iterable[re.Match], reach: int) -> Iterator[tuple[int, int]]:
    """The stretches within ``reach`` characters of the hits, merged, widened to whitespace."""
    start = end = -1
    for hit in hits:
        if hit.start() - reach > end:
            if end >= 0:
                yield start, _next_space(text, end)
            start = max(text.rfind(" ", 0, hit.start() - reach), text.rfind("\n", 0, hit.start() - reach)) + 1
        end = hit.end() + reach
    if end >= 0:
        yield start, _next_space(text, end)


def _next_space(text: str, at: int) -> int:
    space = SPACE.search(text, at)
    return space.start() if space else len(text)


def _matches(pattern: re.Pattern, text: str, windows: Iterable[tuple[int, int]]) -> Iterator[re.Match]:
    for start, end in windows:
        yield from pattern.finditer(text, start, end)


def _near_digits(pattern: re.Pattern, text: str) -> Iterator[re.Match]:
    return _matches(pattern, text, _windows(text, DIGITS.finditer(text), NEAR_DIGITS))


# (a local part starts only where one could not go on: tried from every character of a long run, each
# try reading to its end, the search would take time quadratic in the run's length; so too JWTs)
EMAIL = re.compile(r"(?<![\w.+%'-])\w[\w.+%'-]*@(?:[^\W_](?:[\w-]*[^\W_])?\.)+[^\W\d_]{2,}(?![\w-])")


def emails(text: str) -> Iterator[tuple[int, int]]:
    for match in _matches(EMAIL, text, _windows(text, AT_SIGN.finditer(text), NEAR_AT_SIGN)):
        yield match.span()


PHONE = re.compile(r"(?<![\w+.,/:-])(?:\+|\b00)?\(?\d[\d ().-]{5,24}\d(?:\s?(?:x|ext\.?)\s?\d{1,6})?(?![\w-]|[.,:/]\d)")
# dates, year ranges and the SSN shape (a never-issued SSN is no phone number either)
NOT_PHONE_SHAPES = re.compile(r"\d{4}[-.]\d{1,2}[-.]\d{1,2}|\d{1,2}[-.]\d{1,2}[-.]\d{2,4}|\d{4}\s?-\s?\d{4}|\d{3}-\d{2}-\d{4}")
EXTENSION = re.compile(r"\s?(?:x|ext\.?)\s?\d+$")


def phones(text: str) -> Iterator[tuple[int, int]]:
    for match in _near_digits(PHONE, text):
        number = EXTENSION.sub("", match[0])
        digits = sum(c.isdigit() for c in number)
        if not 7 <= digits <= 15 or NOT_PHONE_SHAPES.fullmatch(number) or "  " in number:
            continue
        if number.isdigit() and digits < (8 if number.startswith("0") else 9):
            continue          # a bare run of digits is a phone number only when long or with a trunk prefix
        if number.startswith("+") and not _possible_international(number):
            continue
        yield match.span()


def _possible_international(number: str) -> bool:
    try:
        return phonenumbers.is_possible_number(phonenumbers.parse(number))
    except phonenumbers.NumberParseException:
        return False


CARD = re.compile(r"(?<![\w.,+-])(?:\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{4,5}|\d{12,19})(?![\w-]|[.,]\d)")


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, digit in enumerate(reversed(digits)):
        value = int(digit) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def cards(text: str) -> Iterator[tuple[int, int]]:
    for match in _near_digits(CARD, text):
        digits = re.sub(r"\D", "", match[0])
        if 12 <= len(digits) <= 19 and luhn_valid(digits):
            yield match.span()


# The registered IBAN length of each country (SWIFT's IBAN registry).
IBAN_LENGTHS = {entry[:2]: int(entry[2:]) for entry in (
    "AD24 AE23 AL28 AT20 AZ28 BA20 BE16 BG22 BH22 BI27 BR29 BY28 CH21 CR22 CY28 CZ24 DE22 DJ27 DK18 DO28 EE20 EG29 "
    "ES24 FI18 FK18 FO18 FR27 GB22 GE22 GI23 GL18 GR27 GT28 HR21 HU28 IE22 IL23 IQ23 IS26 IT27 JO30 KW30 KZ20 LB28 "
    "LC32 LI21 LT20 LU20 LV21 LY25 MC27 MD24 ME22 MK19 MN18 MR27 MT31 MU30 NI28 NL18 NO15 OM23 PK24 PL28 PS29 PT25 "
    "QA29 RO24 RS22 RU33 SA24 SC31 SD18 SE24 SI19 SK24 SM27 SO23 ST25 SV28 TL23 TN24 TR26 UA29 VA22 VG24 XK20").split()}
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")


def iban_valid(iban: str) -> bool:
    """ISO 13616: the country code and check digits moved to the end, letters as 10..35, mod 97 is 1."""
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def ibans(text: str) -> Iterator[tuple[int, int]]:
    for match in _near_digits(IBAN, text):
        length = IBAN_LENGTHS.get(match[0][:2])
        if length is None:
            continue
        end, kept = match.start(), 0       # the span of the first `length` characters that are not spaces
        while kept < length and end < match.end():
            kept += text[end] != " "
            end += 1
        iban = text[match.start():end].replace(" ", "")
        if len(iban) == length and (end == len(text) or not text[end].isalnum()) and iban_valid(iban):
            yield match.start(), end


SSN = re.compile(r"(?<![\w-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\w-])")


def ssns(text: str) -> Iterator[tuple[int, int]]:
    """Never issued: area 000, 666 or 900-999, group 00, serial 0000."""
    for match in _near_digits(SSN, text):
        area, group, serial = match[1], match[3], match[4]
        if area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000":
            yield match.span()


IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")


def ip_addresses(text: str) -> Iterator[tuple[int, int]]:
    """IPv4, and IPv6 with a digit in it (a digit-less one such as fd::a is missed)."""
    for pattern, parse in ((IPV4, ipaddress.IPv4Address), (IPV6, ipaddress.IPv6Address)):
        for match in _near_digits(pattern, text):
            if pattern is IPV6 and (match[0].count(":") < 2 or len(match[0]) < 6):
                continue           # "::" alone, or a time like 10:30:00 (not valid anyway)
            try:
                parse(match[0])
            except ValueError:
                continue
            yield match.span()


# Each starts with its literal prefix, which the regular expression engine finds fast.
KEYS = [re.compile(pattern, re.DOTALL) for pattern in (
    r"(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b",                        # AWS access key id
    r"gh[pousr]_[A-Za-z0-9]{36,255}\b",                               # GitHub tokens
    r"github_pat_[A-Za-z0-9_]{22,255}\b",                             # GitHub fine-grained token
    r"xox[abposr]-[A-Za-z0-9-]{10,}",                                 # Slack
    r"AIza[0-9A-Za-z_-]{35}(?![\w-])",                                # Google API key
    r"sk-[A-Za-z0-9_-]{20,}",                                         # OpenAI-style secret keys
    r"sk_(?:live|test)_[A-Za-z0-9]{16,}\b", r"rk_(?:live|test)_[A-Za-z0-9]{16,}\b",   # Stripe
    r"(?<![\w-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",   # JSON Web Token
    # a PEM private key, to its end line or, if cut off, to the end of the text; a text that
    # starts inside one (a piece cut from a corpus) loses the part before the end line too
    r"-----BEGIN[A-Z ]*PRIVATE KEY-----.*?(?:-----END[A-Z ]*PRIVATE KEY-----|\Z)",
    r"\A[A-Za-z0-9+/=\s]*?-----END[A-Z ]*PRIVATE KEY-----")]
# the value after key=, password: ... (the value alone is replaced)
SECRET_WORD = re.compile("key|secret|token|passw|pwd")
ASSIGNED_SECRET = re.compile(r"(?i)(?:api[_-]?key|apikey|secret(?:[_-]?key)?|access[_-]?key|auth[_-]?token|"
                             r"token|password|passwd|pwd|client[_-]?secret)[\"']?\s*[:=]\s*[\"']?([^\s\"',;]{6,})")


def secrets_in(text: str) -> Iterator[tuple[int, int]]:
    for pattern in KEYS:
        for match in pattern.finditer(text):
            if match.start() == 0 or not text[match.start() - 1].isalnum():
                yield match.span()
    lowered = text.lower()      # which can change the length (İ): then the slower search of the text itself
    words = SECRET_WORD.finditer(lowered) if len(lowered) == len(text) else re.finditer(SECRET_WORD.pattern, text, re.I)
    for start, end in _windows(text, words, 24):
        for match in ASSIGNED_SECRET.finditer(text, start, end):
            if re.search(r"\d", match[1]) or len(match[1]) >= 16:    # "secret: --nurse" is prose
                yield match.span(1)


UPPER, LOWER = r"[^\W\d_a-z]", r"[^\W\d_A-Z]"     # a capital / small letter of any script with cases
# Smith, O'Brien, Wulff-Rörricht. Atomic: a word, once read, is never re-read shorter (each letter of a
# long hyphenated run would otherwise be tried as a word end, and a match tried from every part of it).
WORD = rf"(?>(?:{UPPER}['’])?{UPPER}{LOWER}+(?:-{UPPER}?{LOWER}+)*)"
PARTICLE = r"(?:van|von|der|den|de|da|di|del|della|du|la|le|bin|ibn|al)"
FULL_NAME = rf"{WORD}(?: {UPPER}\.)?(?: (?:{PARTICLE} )*{WORD}){{0,2}}"
CUE = (r"\b(?:Mr|Mrs|Ms|Mx|Miss|Dr|Prof|Sir|Dame|Madam|Herr|Frau|Mme|Mlle|Sr|Sra|Srta|Sig|Sig\.ra|Dott|Dhr|Mevr)\.?"
       r"|\b[Mm]y name is|\bI am called|\bName:|\bDear|\b(?:Regards|Sincerely|Cheers|Thanks),\n?")
CUED_NAME = re.compile(rf"(?:{CUE}) ((?:{PARTICLE} )*{FULL_NAME})")
GIVEN_AND_FAMILY = re.compile(rf"(?<![\w.-])({WORD})(?: {UPPER}\.)? (?:{PARTICLE} )*{WORD}(?:-{WORD})?(?!\w)")


# On the Census lists, but far more often a word or a title than a first name in running text.
NOT_GIVEN_NAMES = frozenset("an art don earl grace guy hope in joy king lady long love major may my page prince "
                            "princess queen rich royal see so sterling will young".split())


@cache
def given_names() -> frozenset[str]:
    path = resources.files("gptstack") / "assets" / "pii" / "given_names.txt"
    return frozenset(path.read_text(encoding="utf-8").split()) - NOT_GIVEN_NAMES


def names(text: str) -> Iterator[tuple[int, int]]:
    for match in CUED_NAME.finditer(text):
        yield match.span(1)
    known = given_names()
    for match in GIVEN_AND_FAMILY.finditer(text):
        if match[1].lower() in known:
            yield match.span()


# Street addresses: a house number beside a street's name, which holds a word for a street. In English
# the word ends the name (USPS Publication 28's street suffixes, British ones, and abbreviations: "12
# Baker Street", "17066 Heather Grove Apt. 915"); in French the number comes first and the word opens
# the name ("16, rue de Salmon"); in Italian, Spanish, Portuguese and Polish the word opens it and
# the number follows ("Via Roma, 12", "al. Leśna 74/39"); in German and Dutch the word is glued to
# the end of the name ("Hans-Müller-Straße 12", "Jansenstraat 7"); Japanese addresses count blocks
# ("神南1丁目2番3号"). A flat, suite or floor before or after is part of it. A house number (or a
# flat's) is required, which is what keeps prose out: a street named without one is missed. So are
# plural endings but the few that name real streets ("10 Best Places", "5 Easy Ways" are titles).
STREET_ENDINGS = (
    "alley|annex|arcade|avenue|bayou|beach|bend|bluff|bottom|boulevard|branch|bridge|brook|burg|"
    "bypass|camp|canyon|cape|causeway|center|centre|circle|circus|cliff|close|club|common|corner|course|"
    "court|cove|creek|crescent|crest|crossing|crossroad|curve|dale|dam|divide|drive|embankment|"
    "estate|expressway|extension|fall|ferry|field|flat|ford|forest|forge|fork|fort|freeway|garden|gate|"
    "gateway|glen|green|grove|harbor|harbour|haven|heights|highway|hill|hollow|inlet|island|isle|"
    "junction|key|knoll|lake|land|landing|lane|light|loaf|lock|lodge|loop|mall|manor|meadow|mews|mill|"
    "mission|motorway|mount|mountain|neck|orchard|oval|overpass|parade|park|parkway|pass|passage|path|"
    "pike|pine|place|plain|plaza|point|port|prairie|promenade|quay|radial|ramp|ranch|rapid|rest|ridge|rise|"
    "river|road|route|row|rue|run|shoal|shore|skyway|spring|spur|square|station|strand|stravenue|stream|"
    "street|summit|terrace|throughway|trace|track|trafficway|trail|trailer|tunnel|turnpike|"
    "underpass|union|vale|valley|via|viaduct|view|village|ville|vista|walk|wall|way|well|wharf|wynd|yard|"
    "commons|estates|falls|gardens|hills|meadows|mills|oaks|pines|springs|woods")
STREET_ABBREVIATIONS = "ave|blvd|cir|cres|ct|dr|hwy|ln|pkwy|pl|rd|sq|st|ter|trl"
STREET_OPENINGS = (
    # French (also in small letters, as written after a number), Italian, Spanish, Catalan, Portuguese
    "[Rr]ue|[Aa]venue|[Bb]oulevard|[Bb]d|[Cc]hemin|[Aa]llée|[Ii]mpasse|[Pp]lace|[Qq]uai|[Rr]oute|[Cc]ours|"
    "Via|Viale|Vicolo|Vico|Piazza|Piazzale|Corso|Largo|Strada|Contrada|Borgo|Rotonda|Stretto|Canale|Incrocio|"
    "Calle|Avenida|Avda\\.|Av\\.|Paseo|Plaza|Camino|Ronda|Rambla|Cañada|Callejón|Alameda|Pasaje|Pasadizo|"
    "Acceso|Urbanización|Vial|Carretera|Glorieta|Travesía|Cuesta|Carrer|Passeig|"
    "Rua|Travessa|Praça|Rodovia|Estrada|Ladeira|Vila|Viela|Quadra|Conjunto|Setor|Trecho|Núcleo|Vereda|"
    "Esplanada|Passarela|Parque|Residencial|Lagoa|Lago|Sítio|Chácara|Fazenda|Loteamento|Condomínio|Jardim|"
    "Recanto|Morro|Vale|Campo|Feira|Pátio|Distrito|Colônia|Área|Aeroporto|Estação|Favela|Viaduto|"
    # Polish, whole and abbreviated
    "[Uu]lica|[Uu]l\\.|[Aa]leja|[Aa]l\\.|[Pp]lac|[Pp]l\\.|[Oo]siedle|[Oo]s\\.")
# not "ring" or "pad", whose English words are many ("During 1990", "Spring 2021", "Keypad 2")
STREET_GLUED = ("stra(?:ß|ss)e|str\\.|gasse|weg|allee|platz|damm|ufer|chaussee|steig|pfad|markt|"
                "straat|laan|baan|plein|gracht|singel|dreef|steeg|kade|boulevard|hof|park|dijk")
# the same after a hyphen, "Ring" too: Hans-Müller-Straße, Danielle-Dobes-Ring
STREET_HYPHENED = "Stra(?:ß|ss)e|Str\\.|Gasse|Weg|Allee|Platz|Ring|Damm|Ufer|Chaussee|Steig|Pfad|Markt"
HOUSE_NUMBER = r"\d{1,5}(?:[A-Za-z]| [A-Z])?(?!\w)(?:[/-]\d{1,5}[A-Za-z]?)?"    # 221B, 12 B, 74/39, 47-26
MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sept?(?:ember)?|"
         r"Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\b")                        # "17 March St." is a date
UNIT = (r"(?:Apt\.?|Apartment|Suite|Ste\.?|Unit|Flat|Studio|Floor|Room|Appartamento|Piano|Interno|Scala|"
        r"Puerta|Piso|Planta|Apto\.?|Apartamento|Bloco|Sala|Casa|Lote|Wohnung|m\.|lok\.) ?#?\d{1,5}[A-Za-z]?")
STREET_PARTICLE = (r"(?:de|da|do|dos|das|del|della|dei|degli|di|du|des|la|le|les|l'|d'|y|e|i|von|van|der|den|het|"
                   r"ter|ten)")
CJK = r"[\u3040-\u30ff\u3400-\u9fff々]"
KANJI_KATAKANA = r"[\u30a0-\u30ff\u3400-\u9fff々]"      # a place name; not hiragana, the grammar around it
STREET_WORD = rf"(?:{WORD}|{CJK}{{1,8}}|{UPPER}\.|[IVX]{{1,4}}\b|\d{{1,3}}(?:st|nd|rd|th))"   # Jana Pawła II, 5th
STREET_NAME = rf"(?:{STREET_PARTICLE} )*{STREET_WORD}(?: (?:{STREET_PARTICLE} )*{STREET_WORD}){{0,3}}"
ADDRESS = re.compile("(?:" + "|".join([
    rf"(?<![\w.,/-])(?:{UNIT},? (?:{HOUSE_NUMBER},? )?|{HOUSE_NUMBER},? )(?!{MONTH})(?:{STREET_WORD} ){{1,3}}"
    rf"(?=[A-Z])(?i:(?:{STREET_ENDINGS})\b|(?:{STREET_ABBREVIATIONS})\b\.?)",
    rf"(?<![\w.,/-]){HOUSE_NUMBER},? (?:{STREET_OPENINGS}) {STREET_NAME}",
    rf"(?<![\w.])(?<!et )(?:{STREET_OPENINGS}) {STREET_NAME},? {HOUSE_NUMBER}",          # not "et al. Nature 2019"
    rf"(?<![\w'’-])(?:(?:{UPPER}[\w'’]*-){{1,3}}(?:{STREET_HYPHENED})"
    rf"|(?:{UPPER}[\w'’]*-){{0,3}}{UPPER}[\w'’]*?(?:{STREET_GLUED})) {HOUSE_NUMBER}",
    rf"{KANJI_KATAKANA}{{0,16}}\d{{1,4}}丁目(?:\d{{1,4}}番地?(?:\d{{1,4}}号)?)?",
]) + rf")(?:,? {UNIT}){{0,2}}")
NEAR_ADDRESS = 64            # a long street name before its number, and a flat after it
# a number after these words counts something else: "Chapter 12 The Way of Kings", "Act 3 Main Street scene"
NOT_A_HOUSE_NUMBER_AFTER = re.compile(r"(?i)\b(?:chapter|act|scene|page|part|book|vol|volume|no|number|episode|"
                                      r"season|step|level|round|figure|fig|table|section|verse|track|psalm)\.?\s*$")


def addresses(text: str) -> Iterator[tuple[int, int]]:
    for match in _matches(ADDRESS, text, _windows(text, DIGITS.finditer(text), NEAR_ADDRESS)):
        if not NOT_A_HOUSE_NUMBER_AFTER.search(text, max(0, match.start() - 16), match.start()):
            yield match.span()


DETECTORS: dict[str, Callable[[str], Iterable[tuple[int, int]]]] = {
    "SECRET": secrets_in, "EMAIL": emails, "IBAN": ibans, "CARD": cards, "SSN": ssns, "IP": ip_addresses,
    "PHONE": phones, "ADDRESS": addresses, "NAME": names}


# --- finding and replacing ----------------------------------------------------------------------

@dataclass(frozen=True)
class Scrubber:
    """What to look for and what to put in its place: a type tag (``<EMAIL>``), or with
    ``replacement="pseudonym"`` a tag with a keyed hash of the value (``<EMAIL_3f9a0c1e>``), the
    same for the same value wherever it occurs under the same ``key``, so a model still sees that
    two mentions are one person without seeing who."""
    types: tuple[str, ...] = TYPES
    replacement: str = "tag"
    key: bytes = b""

    def __post_init__(self):
        check_replacement(self.replacement)
        if self.replacement == "pseudonym" and not self.key:
            raise ValueError("pseudonyms need a key (a per-run secret): without one they could be reversed "
                             "by hashing guesses")

    def find(self, text: str) -> list[Finding]:
        """Non-overlapping findings in text order."""
        rank = {kind: i for i, kind in enumerate(TYPES)}
        found = sorted((Finding(kind, start, end) for kind in self.types for start, end in DETECTORS[kind](text)
                        if end > start), key=lambda f: (f.start, rank[f.kind], f.start - f.end))
        kept: list[Finding] = []
        for finding in found:
            if kept and finding.start < kept[-1].end:
                last = kept[-1]
                if (rank[finding.kind], finding.start - finding.end) < (rank[last.kind], last.start - last.end):
                    kept[-1] = finding
                continue
            kept.append(finding)
        return kept

    def scrub(self, text: str) -> tuple[str, Counter]:
        """The text with every finding replaced, and how many of each type were replaced."""
        return self.replace(text, self.find(text))

    def replace(self, text: str, findings: Iterable[Finding]) -> tuple[str, Counter]:
        """The text with ``findings`` (non-overlapping, in text order) replaced, and their counts."""
        parts, counts, at = [], Counter(), 0
        for finding in findings:
            parts += [text[at:finding.start], self.placeholder(finding.kind, text[finding.start:finding.end])]
            counts[finding.kind] += 1
            at = finding.end
        parts.append(text[at:])
        return "".join(parts), counts

    def placeholder(self, kind: str, value: str) -> str:
        if self.replacement == "tag":
            return f"<{kind}>"
        canonical = re.sub(r"\W", "", value).lower()     # "+1 (555) 010-0199" and "+15550100199" are one number
        return f"<{kind}_{hmac.new(self.key, f'{kind}:{canonical}'.encode(), hashlib.sha256).hexdigest()[:8]}>"


def run_key(directory: str | Path) -> bytes:
    """The pseudonym key of the run whose files are in ``directory``: drawn by the first process that
    asks and kept in ``directory``/pii_key (mode 0600), so that a resumed run, and every dataset the
    run prepares (training and validation), give a value the same pseudonym. Written to a file of its
    own then linked into place, so two processes asking at once still get one key."""
    path = Path(directory) / KEY_FILE
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, draft = tempfile.mkstemp(prefix=".pii_key.", dir=path.parent)    # mode 0600
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(KEY_BYTES) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(draft, path)
                except FileExistsError:      # another process was first: its key is the run's
                    pass
            finally:
                os.unlink(draft)
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError as exc:
        raise ValueError(f"cannot keep the pseudonym key in {path}: {exc.strerror}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ValueError(f"{path} does not hold a pseudonym key (64 hexadecimal digits); restore it, or remove it "
                         "to start the run's pseudonyms afresh (they will not match the ones made before)")
    return key


def scrub_strings(value, scrubber: Scrubber, counts: Counter, skip: frozenset[str] = frozenset()):
    """A JSON-like value (a record, a chat) with every string in it scrubbed, except the values of
    the keys in ``skip`` (labels, tags); ``counts`` adds up what was replaced."""
    if isinstance(value, str):
        text, found = scrubber.scrub(value)
        counts.update(found)
        return text
    if isinstance(value, list):
        return [scrub_strings(item, scrubber, counts, skip) for item in value]
    if isinstance(value, dict):
        return {key: item if key in skip else scrub_strings(item, scrubber, counts, skip) for key, item in value.items()}
    return value


class StreamRedactor:
    """Redacts text that arrives in pieces (a streamed completion). A finding may straddle pieces,
    and some are recognised only once whole (a JSON Web Token only when its third part arrives), so
    the text sent is cut only at whitespace, at least ``HOLD`` characters before the end of what has
    arrived, and before any finding reaching past the cut; the rest waits for the next piece (or the
    end). The last ``HOLD`` characters sent are searched again with what follows them, so a value
    whose cue was sent ("password: ", "Dear ") is still found.

    A run of more than ``MAX_RUN`` characters without whitespace (no value we find is so long) is
    sent ``MAX_RUN`` characters at a time, scrubbed of what is found in each, so that a stream
    without whitespace is not held back to its end: a value cut by such a cut can be missed."""

    HOLD = 64
    MAX_RUN = 4096

    def __init__(self, scrubber: Scrubber):
        self.scrubber, self.sent, self.pending = scrubber, "", ""

    def push(self, text: str, last: bool = False) -> str:
        """The redacted text that can be sent now."""
        self.pending += text
        # the findings in what has arrived, its positions counted from the start of self.pending
        base = len(self.sent)
        findings = [Finding(f.kind, max(0, f.start - base), f.end - base)
                    for f in self.scrubber.find(self.sent + self.pending) if f.end > base]
        cut = len(self.pending) if last else self._cut(findings)
        ready, self.pending = self.pending[:cut], self.pending[cut:]
        self.sent = (self.sent + ready)[-self.HOLD:]
        return self.scrubber.replace(ready, [f for f in findings if f.end <= cut])[0]

    def _cut(self, findings: list[Finding]) -> int:
        """Where what may be sent now ends."""
        held = cut = max(0, len(self.pending) - self.HOLD)
        while cut > 0 and not self.pending[cut - 1].isspace() and held - cut < self.MAX_RUN:
            cut -= 1
        if cut > 0 and not self.pending[cut - 1].isspace():    # a run longer than MAX_RUN
            cut = held
        return next((f.start for f in findings if f.start < cut < f.end), cut)
