"""Personal data and secrets in training text: found, counted and replaced by typed placeholders.

Kinds, from the most specific to the least (an overlap goes to the earlier kind, so a token
inside a URL or an address inside a key is claimed once): private key blocks, passwords in
URLs, JWTs, AWS access keys and secrets, GitHub and Slack tokens, ``sk-``/Stripe/Google/Hugging
Face/GitLab/npm keys, bearer and basic credentials, ``password=``/``api_key:`` assignments,
e-mail addresses, IPv6 and IPv4 addresses, payment card numbers and phone numbers. Each is
replaced by ``<KIND>``.

Precision matters as much as recall: training text is full of version numbers, dates, hashes,
ISBNs and order numbers. Each finder validates what it matched (octet ranges, the Luhn checksum
and issuer prefix of a card, the randomness of a key, words before a number such as "version"
or "order") before reporting it.

Speed: the anchors of the fixed-prefix finders and the keywords of the ``key = value`` finders
are found by Aho-Corasick automata, runs of digits by one regular expression; the detailed
expressions run only where those found something. ``Scrubber.find_many`` does the same for a
batch of texts with a numpy pre-scan instead (see _prescan): a text with nothing to find then
costs a few microseconds per kilobyte, and finders run only where the pre-scan saw their marks.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

PLACEHOLDER = "<{}>"
KINDS = ("PRIVATE_KEY", "PASSWORD", "JWT", "AWS_ACCESS_KEY", "AWS_SECRET_KEY", "GITHUB_TOKEN",
         "SLACK_TOKEN", "API_KEY", "BEARER_TOKEN", "EMAIL", "IPV6", "IPV4", "CARD_NUMBER", "PHONE")

# Values that stand for a secret in documentation rather than being one.
_PLACEHOLDER_VALUE = re.compile(
    r"^(?:\$\{?[\w.-]*\}?|\{\{.*\}\}|<[^>]*>|%[sd]|\*+|x{3,}|\.{3,}|your[\w-]*|"
    r"(?:password|passwd|pass|pwd|secret|token|changeme|example|redacted|hidden|none|null)\W*)$",
    re.IGNORECASE,
)
_FILE_TLDS = {"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "js", "ts", "py", "css", "html",
              "json", "md", "txt", "zip", "gz", "tar", "pdf", "csv", "yaml", "yml", "exe", "dll"}
_VERSION_CONTEXT = re.compile(
    r"(?i)(?:version|release|build|firmware|\bv|ver|kernel|python|node|java|upgrade|update|"
    r"downgrade|tag|sdk|api|chapter|section|figure|fig|table|step|clause|rule|paragraph|appendix|"
    r"§)\W{0,3}$")
_IP_CONTEXT = re.compile(r"(?i)(?:\bip|address|host|server|dns|ping|gateway|subnet|route|proxy|"
                         r"connect\w*|from|to)\W{0,12}$")
_NUMBER_CONTEXT = re.compile(r"(?i)(?:order|invoice|tracking|ticket|isbn|ref|reference|serial|"
                             r"transaction|account|acct|\bid|sku|part|item|case|\bno)\W{0,4}"
                             r"(?:number|no|id)?\W{0,4}$")
_CARD_CONTEXT = re.compile(r"(?i)(?:card|visa|mastercard|amex|credit|debit|\bcc|\bpan)\b[^\n]{0,24}$")
_PHONE_LABEL = re.compile(r"(?i)(?:phone|\btel|telephone|mobile|\bcell|\bfax|whatsapp|\bcall(?: me)?"
                          r"(?: at| on)?|\bsms|\bdial)\W{0,3}(?:no\.?|number)?\W{0,3}$")


def _mixed(value: str, min_classes: int = 2) -> bool:
    """Looks random: letters and digits mixed (or upper case, lower case and digits)."""
    digit = any(c.isdigit() for c in value)
    classes = digit + any(c.islower() for c in value) + any(c.isupper() for c in value)
    return classes >= 3 or (digit and classes >= min_classes)


def _word_char(text: str, i: int) -> bool:
    return 0 <= i < len(text) and (text[i].isalnum() or text[i] == "_")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_issuer(d: str) -> bool:
    n = len(d)
    if d[0] == "4":
        return n in (13, 16, 19)
    two, three, four = int(d[:2]), int(d[:3]), int(d[:4])
    if 51 <= two <= 55 or 2221 <= four <= 2720:
        return n == 16
    if two in (34, 37):
        return n == 15
    if d.startswith("6011") or two == 65 or 644 <= three <= 649:
        return 16 <= n <= 19
    if 3528 <= four <= 3589 or two == 62:
        return 16 <= n <= 19
    if 300 <= three <= 305 or two in (36, 38, 39):
        return 14 <= n <= 19
    if two in (50, 56, 57, 58) or d.startswith(("6304", "6759", "676")):
        return 12 <= n <= 19
    return False


@dataclass
class Hit:
    kind: str
    value: str
    start: int = 0
    end: int = 0


Span = tuple[int, int, str]  # start, end, kind


# --------------------------------------------------------------------------------------------
# Finders: each yields spans of the original text
# --------------------------------------------------------------------------------------------

_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    r"(?:(?:\s|\\n)*[A-Za-z-]+: [^\n\\]*)*(?:\s|\\n)*[A-Za-z0-9+/]{20,}[A-Za-z0-9+/=\s\\]*"
    r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----)?")
_URL_CREDENTIALS = re.compile(r"[^\s:/@'\"<>]{1,64}:(?P<v>[^\s@/'\"<>]{1,128})@(?=[A-Za-z0-9\[])")
# Tokens with a fixed prefix: all prefixes (and the other anchors below) are found in one pass of
# an Aho-Corasick automaton, and each expression is matched only where its prefix occurs.
_AWS = re.compile(r"A(?:KIA|SIA|BIA|CCA|GPA|IDA|IPA|NPA|NVA|PKA|ROA|SCA)[A-Z0-9]{16}(?![A-Za-z0-9])")
_GITHUB = re.compile(r"gh[pousr]_[A-Za-z0-9]{36,255}(?!\w)")
_STRIPE = re.compile(r"[rs]k_(?:live|test)_[A-Za-z0-9]{16,}")
_TOKENS: dict[str, tuple[str, re.Pattern[str], int]] = {  # prefix: kind, expression, classes
    "eyJ": ("JWT", re.compile(r"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*"), 0),
    **{p: ("AWS_ACCESS_KEY", _AWS, 0) for p in ("AKIA", "ASIA", "ABIA", "ACCA", "AGPA", "AIDA", "AIPA",
                                                "ANPA", "ANVA", "APKA", "AROA", "ASCA")},
    **{p: ("GITHUB_TOKEN", _GITHUB, 0) for p in ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")},
    "github_pat_": ("GITHUB_TOKEN", re.compile(r"github_pat_[A-Za-z0-9_]{22,255}"), 0),
    "xox": ("SLACK_TOKEN", re.compile(r"xox[abposre]-[A-Za-z0-9-]{10,250}"), 0),
    "xapp-": ("SLACK_TOKEN", re.compile(r"xapp-\d-[A-Z0-9]+-\d+-[a-z0-9]+"), 0),
    "https://hooks.slack.com/": ("SLACK_TOKEN", re.compile(
        r"https://hooks\.slack\.com/services/T[A-Za-z0-9]+/B[A-Za-z0-9]+/[A-Za-z0-9]+"), 0),
    "sk-": ("API_KEY", re.compile(r"sk-(?:proj-|ant-(?:api\d\d-)?|or-v1-|live-|svcacct-)?[A-Za-z0-9_-]{20,}"), 3),
    **{p: ("API_KEY", _STRIPE, 3) for p in ("sk_live_", "sk_test_", "rk_live_", "rk_test_")},
    "AIza": ("API_KEY", re.compile(r"AIza[0-9A-Za-z_-]{35}(?![\w-])"), 3),
    "hf_": ("API_KEY", re.compile(r"hf_[A-Za-z0-9]{30,}(?!\w)"), 3),
    "glpat-": ("API_KEY", re.compile(r"glpat-[A-Za-z0-9_-]{20,}"), 3),
    "npm_": ("API_KEY", re.compile(r"npm_[A-Za-z0-9]{36}(?!\w)"), 3),
}
# After a keyword (found in the lower-cased text): ``key = value`` and friends. A value ends at
# whitespace, quotes, brackets or an ``&name=`` that starts the next URL parameter.
_ASSIGNED = re.compile(r"(?i:[_-]?(?:access[_-]?)?key(?:[_-]?id)?|[_-]?string)?[\"']?\s*(?:[:=]|=>)\s*[\"']?"
                       r"(?P<v>(?:[^\s\"'`,;)(\]\[&]|&(?![A-Za-z_]\w*=)){6,})")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z_.]*")
_ASSIGN_KEYWORDS = ("password", "passwd", "pwd", "secret", "token", "key")
_KEY_PREFIX = re.compile(r"(?:api[_-]?|secret[_-]?|access[_-]?|private[_-]?|client[_-]?|auth[_-]?)$")
_KEY_PREFIX_LAST = "itseh_-"  # the last character of each _KEY_PREFIX match
_AUTH = re.compile(r"(?i)(?:bearer|authorization:\s*basic|authorization:\s*token)\s+(?P<v>[A-Za-z0-9._~+/-]{16,}=*)")
_AUTH_WORDS = ("bearer", "authorization")
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}$")
_EMAIL_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?"
                   r"(?:%\w+)?(?![\w:-]|\.\d)")
_COLON = re.compile(":")
# A character-class start keeps the scan on the regex engine's fast path; a "+" or "(" just
# before a run is included by starting the detailed match one character earlier.
_DIGIT_RUN = re.compile(r"[0-9][0-9 .()/-]{4,}[0-9]")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                   r"(?!\w|\.\w)")
_CARD = re.compile(r"(?<![\w.-])\d(?:[ -]?\d){11,18}(?![\w-]|\.\d)")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}(?:[ .-]?\(?\d{1,5}\)?){2,5}|(?:\([2-9]\d{2}\)\s?|[2-9]\d{2}[-. ])"
                    r"\d{3}[-. ]\d{4})(?![\w-]|\.\d)")
_PHONE_LABELLED = re.compile(r"(?<![\w+])\+?\(?\d[\d ()./-]{5,18}\d(?![\w-]|\.\d)")


def _automaton(words):
    import ahocorasick

    a = ahocorasick.Automaton()
    for w in words:
        a.add_word(w, (w, len(w) - 1))
    a.make_automaton()
    return a


_ANCHORS = _automaton([*_TOKENS, "PRIVATE KEY", "://", "@", "::"])
_KEYWORDS = _automaton([*_ASSIGN_KEYWORDS, *_AUTH_WORDS])
_ASCII_LOWER = {c: c + 32 for c in range(65, 91)}


def _anchors(automaton, text: str) -> dict[str, list[int]]:
    """Start positions of every anchor word in ``text`` (one pass)."""
    found: dict[str, list[int]] = {}
    for end, (word, back) in automaton.iter(text):
        found.setdefault(word, []).append(end - back)
    return found


def _find_private_keys(text: str) -> Iterator[Span]:
    for m in _PRIVATE_KEY.finditer(text):
        yield m.start(), m.end(), "PRIVATE_KEY"


def _find_url_passwords(text: str, positions: list[int]) -> Iterator[Span]:
    for pos in positions:
        m = _URL_CREDENTIALS.match(text, pos + 3)
        if m and not _PLACEHOLDER_VALUE.match(m.group("v")):
            yield m.start("v"), m.end("v"), "PASSWORD"


def _find_tokens(text: str, anchors: dict[str, list[int]]) -> Iterator[Span]:
    for prefix, positions in anchors.items():
        token = _TOKENS.get(prefix)
        if token is None:
            continue
        kind, pattern, classes = token
        for pos in positions:
            m = pattern.match(text, pos)
            if m and not _word_char(text, pos - 1) and (not classes or _mixed(m.group(0), classes)):
                yield pos, m.end(), kind


def _find_assignments(text: str, low: str, keyword: str, positions: list[int]) -> Iterator[Span]:
    for pos in positions:
        # the character before "key" must end a _KEY_PREFIX word ("api", "secret", ...) or be
        # a separator: checked first, as most "key"s in ordinary text are whole words
        if keyword == "key" and (pos == 0 or low[pos - 1] not in _KEY_PREFIX_LAST
                                 or not _KEY_PREFIX.search(low, max(0, pos - 8), pos)):
            continue
        m = _ASSIGNED.match(text, pos + len(keyword))
        if m:
            span = _assignment(m, keyword, low, pos)
            if span:
                yield span


def _assignment(m: re.Match[str], keyword: str, low: str, pos: int) -> Span | None:
    v = m.group("v").rstrip(".")
    after = m.string[m.end("v"):m.end("v") + 1]
    if (_PLACEHOLDER_VALUE.match(v) or v.startswith(("<", "$", "{", "%", "os.", "process.", "env"))
            or "://" in v or after == "(" or _IDENTIFIER.fullmatch(v)):
        return None  # a placeholder, a variable, a call or a URL: not the secret itself
    start = m.start("v")
    if keyword in ("password", "passwd", "pwd"):
        ok = len(v) >= 6 and (_mixed(v) or not v.isalpha())
        return (start, start + len(v), "PASSWORD") if ok else None
    if keyword == "secret" and len(v) == 40 and _mixed(v, 3) and all(c.isalnum() or c in "/+" for c in v):
        return start, start + len(v), "AWS_SECRET_KEY"
    if keyword == "token" and _word_char(low, pos + len(keyword)):
        return None
    return (start, start + len(v), "API_KEY") if len(v) >= 12 and _mixed(v) else None


def _find_auth(text: str, positions: list[int]) -> Iterator[Span]:
    for pos in positions:
        m = _AUTH.match(text, pos)
        if m and _mixed(m.group("v")) and not _PLACEHOLDER_VALUE.match(m.group("v")):
            yield m.start("v"), m.end("v"), "BEARER_TOKEN"


def _find_emails(text: str, positions: list[int]) -> Iterator[Span]:
    for pos in positions:
        local = _EMAIL_LOCAL.search(text, max(0, pos - 64), pos)
        if local and not _word_char(text, local.start() - 1) and text[local.start() - 1:local.start()] not in ".+-":
            dom = _EMAIL_DOMAIN.match(text, pos + 1)
            if dom and dom.group(0).rsplit(".", 1)[-1].lower() not in _FILE_TLDS:
                yield local.start(), dom.end(), "EMAIL"


def _ipv6_candidates(text: str) -> Iterator[re.Match[str]]:
    pos = text.find("::")
    last = -1
    while pos >= 0:
        for m in _IPV6.finditer(text, max(last, pos - 40), min(len(text), pos + 48)):
            if m.start() <= pos < m.end() or m.end() == pos:
                last = m.end()
                yield m
        pos = text.find("::", max(pos + 2, last))
    if text.count(":") >= 7:
        # the full form has 7 colons within 39 characters: only look where colons cluster
        colons = [c.start() for c in _COLON.finditer(text)]
        for i in range(len(colons) - 6):
            if colons[i + 6] - colons[i] <= 36:
                for m in _IPV6.finditer(text, max(0, colons[i] - 5), min(len(text), colons[i + 6] + 6)):
                    if "::" not in m.group(0):
                        yield m


def _find_ipv6(text: str) -> Iterator[Span]:
    seen: set[int] = set()
    for m in _ipv6_candidates(text):
        s = m.group(0)
        if m.start() in seen or s.count(":") < 2 or not any(c.isdigit() for c in s):
            continue
        seen.add(m.start())
        try:
            addr = ipaddress.IPv6Address(s.split("%", 1)[0])
        except ValueError:
            continue
        if addr.is_loopback or addr.is_unspecified:
            continue
        if "::" not in s and s.count(":") != 7:
            continue
        yield m.start(), m.end(), "IPV6"


def _ipv4_ok(text: str, m: re.Match[str]) -> bool:
    octets = [int(x) for x in m.group(0).split(".")]
    before = text[max(0, m.start() - 24):m.start()]
    if _VERSION_CONTEXT.search(before) or octets == [0, 0, 0, 0]:
        return False
    # 1.2.3.4, 2.4.1.0: small numbers everywhere read as a version unless the text says "IP"
    return not all(o < 10 for o in octets) or bool(_IP_CONTEXT.search(before))


def _card_ok(text: str, m: re.Match[str]) -> bool:
    s = m.group(0)
    digits = s.replace(" ", "").replace("-", "")
    if len({c for c in s if c in " -"}) > 1 or len(set(digits)) < 2:
        return False
    if not (luhn_ok(digits) and _card_issuer(digits)):
        return False
    before = text[max(0, m.start() - 32):m.start()]
    return not _NUMBER_CONTEXT.search(before) or bool(_CARD_CONTEXT.search(before))


def _phone_ok(text: str, m: re.Match[str], labelled: bool) -> bool:
    digits = sum(c.isdigit() for c in m.group(0))
    if not 7 <= digits <= 15:
        return False
    before = text[max(0, m.start() - 32):m.start()]
    if labelled:
        return bool(_PHONE_LABEL.search(before))
    return not (_NUMBER_CONTEXT.search(before) or _VERSION_CONTEXT.search(before))


def _find_numbers(text: str, runs: list[tuple[int, int]] | None = None) -> Iterator[Span]:
    """IPv4 addresses, card numbers and phone numbers inside runs of digits (``runs``: the
    spans _DIGIT_RUN matches, when already known)."""
    if runs is None:
        runs = [m.span() for m in _DIGIT_RUN.finditer(text)]
    for start, end in runs:
        a, b = max(0, start - 1), min(len(text), end + 2)
        chunk = text[start:end]
        if chunk.count(".") >= 3:
            for m in _IPV4.finditer(text, a, b):
                if _ipv4_ok(text, m):
                    yield m.start(), m.end(), "IPV4"
        ndigits = sum(c.isdigit() for c in chunk)
        if ndigits >= 12:
            for m in _CARD.finditer(text, a, b):
                if _card_ok(text, m):
                    yield m.start(), m.end(), "CARD_NUMBER"
        if ndigits >= 7:
            for m in _PHONE.finditer(text, a, b):
                if _phone_ok(text, m, False):
                    yield m.start(), m.end(), "PHONE"
            for m in _PHONE_LABELLED.finditer(text, a, b):
                if _phone_ok(text, m, True):
                    yield m.start(), m.end(), "PHONE"


_PRIORITY = {kind: i for i, kind in enumerate(KINDS)}


# --------------------------------------------------------------------------------------------
# Pre-scan of many texts at once (Scrubber.find_many)
# --------------------------------------------------------------------------------------------
# Most rows hold nothing to find, but find() still walks each one with two Aho-Corasick passes
# and a digit-run expression. find_many() instead looks at the UTF-8 bytes of a batch of texts
# with numpy for what each finder needs before it can match anything:
#   - an anchor or keyword: every occurrence contains a known 3-byte sequence (an anchor's first
#     three characters, or a distinctive three letters of a keyword in any ASCII case), found by
#     one table look-up per byte position;
#   - and around it, what the finder's expression needs next to it (_place_may_match): the
#     whole keyword, then a ":" or "=" after at most some letters, quotes and spaces for
#     ``key = value``; a character an address can hold on both sides of an "@"; an "@" before
#     the first space or "/" after "://"; the anchor's first 7 bytes for a token. Only the
#     places that pass are checked in Python (_checked);
#   - a run of digits for _find_numbers: runs of [0-9 .()/-] whose first and last digits are at
#     least 5 apart (what _DIGIT_RUN matches) with at least 7 digits or 3 dots (fewer make no
#     IPv4 address, card or phone number);
#   - for IPv6 addresses without "::" (always a place): 7 colons within 36 characters.
# These are necessary conditions, so a text without them holds nothing those finders would
# find, and find_many() gives exactly what find() gives. ASCII bytes in UTF-8 are only ever the
# ASCII characters themselves, so byte-level matches are character-level matches; a byte of a
# non-ASCII character (>= 0x80) is taken as anything it might be (a space, a letter).

_ANCHOR_WORDS = (*_TOKENS, "PRIVATE KEY", "://", "@", "::")
# keyword -> offset of its 3 distinctive letters (rare in ordinary text, unlike "sec" or "aut")
_KEYWORD_TRIGRAMS = {"password": 2, "passwd": 2, "pwd": 0, "secret": 1, "token": 0, "key": 0,
                     "bearer": 3, "authorization": 5}
assert set(_KEYWORD_TRIGRAMS) == {*_ASSIGN_KEYWORDS, *_AUTH_WORDS}
# The only character that str.lower() maps to an ASCII letter without changing the text's
# length (so keyword positions in the lower-cased text could come from it): KELVIN SIGN -> "k".
# A text with it is scanned for keywords the slow way.
_LOWERS_TO_ASCII = "\u212a".encode()
_SCAN_BYTES = 1 << 16  # bytes per numpy pass (see SKETCH_BYTES in data_prep.py)
_SCAN: dict[str, Any] = {}
# kinds of place (the table's values): each has its test in _place_may_match
_AT, _DOUBLE_COLON, _URL, _ALWAYS, _TOKEN = 1, 2, 3, 4, 5  # _ALWAYS: "PRIVATE KEY", KELVIN SIGN
_KEYWORD_KIND = {tri: 6 + i for i, tri in enumerate(dict.fromkeys(
    w[k:k + 3] for w, k in _KEYWORD_TRIGRAMS.items()))}  # one kind per trigram ("ssw": two words)
_WINDOW = 32  # bytes looked at after a keyword for its ":" or "="
_URL_WINDOW = 256  # bytes looked at after "://" for its "@"


def _byte_set(chars: str, non_ascii: bool = False):
    """A 256-entry bool table: the bytes of these ASCII characters (and every byte >= 0x80)."""
    import numpy as np

    t = np.zeros(256, dtype=bool)
    t[list(chars.encode("ascii"))] = True
    if non_ascii:
        t[128:] = True
    return t


def _scan_tables() -> dict[str, Any]:
    """The 2**24-entry table of interesting 3-byte sequences (the kind of place each is), what
    to check at each, and the byte tables of _place_may_match."""
    if _SCAN:
        return _SCAN
    import numpy as np

    table = np.zeros(1 << 24, dtype=np.uint8)
    # 3 bytes -> (word, offset of the 3 bytes in it, is a keyword) to check there
    checks: dict[bytes, list[tuple[str, bytes, int, bool]]] = {}

    def mark(prefix: bytes, kind: int) -> None:  # every 3-byte sequence that starts with prefix
        lo = int.from_bytes(prefix.ljust(3, b"\0"), "big")
        part = table[lo: lo + (1 << (8 * (3 - len(prefix))))]
        assert not np.any((part != 0) & (part != kind)), "a 3-byte sequence has one kind"
        part[:] = kind

    for word in _ANCHOR_WORDS:
        w = word.encode()
        kind = {"@": _AT, "::": _DOUBLE_COLON, "://": _URL, "PRIVATE KEY": _ALWAYS}.get(word, _TOKEN)
        mark(w[:3], kind)
        if len(w) >= 3:  # "@" and "::" are checked by _checked itself
            checks.setdefault(w[:3], []).append((word, w, 0, False))
    for word, k in _KEYWORD_TRIGRAMS.items():
        tri = word[k:k + 3]
        for variant in {"".join(c) for c in itertools.product(*((ch, ch.upper()) for ch in tri))}:
            mark(variant.encode(), _KEYWORD_KIND[tri])
            checks.setdefault(variant.encode(), []).append((word, word.encode(), k, True))
    mark(_LOWERS_TO_ASCII, _ALWAYS)
    checks[_LOWERS_TO_ASCII] = []
    # _checked orders words by where they first end, as the automata report them; that is
    # their order only if no word ends another (two words never end at the same place)
    for words in (_ANCHOR_WORDS, tuple(_KEYWORD_TRIGRAMS)):
        assert not any(a != b and a.endswith(b) for a in words for b in words)
    # token anchors by their first 7 bytes (or fewer): sorted values for each length
    prefixes: dict[int, set[int]] = {}
    for word in _TOKENS:
        w = word.encode()[:7]
        prefixes.setdefault(len(w), set()).add(int.from_bytes(w, "big"))
    ascii_space = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f "  # what \s matches in ASCII
    _SCAN.update(
        np=np, table=table, pairs=(table != 0).reshape(1 << 16, 256).any(axis=1), checks=checks,
        prefixes={n: np.array(sorted(v), dtype=np.uint64) for n, v in prefixes.items()},
        # _EMAIL_LOCAL's last character, _EMAIL_DOMAIN's first
        local=_byte_set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-"),
        domain=_byte_set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"),
        # what _URL_CREDENTIALS allows in neither the user nor the password (so its "@" is the
        # first of these after "://")
        url_stop=_byte_set("\t\n\x0b\x0c\r /@'\"<>"),
        # what _ASSIGNED may match between a keyword and its ":" or "=": the letters of its
        # optional "access_key_id"/"_string", "_", "-", a quote and spaces
        assign_gap=_byte_set("acceskyidtrngACCESKYIDTRNG_-'\"" + ascii_space, non_ascii=True),
        key_before=_byte_set(_KEY_PREFIX_LAST + _KEY_PREFIX_LAST.upper()),
        word=_byte_set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_"),
        space=_byte_set(ascii_space, non_ascii=True),
    )
    return _SCAN


def _place_may_match(sc: dict[str, Any], data, hits, kinds):
    """Which of the places ``hits`` (byte offsets in ``data``, of these ``kinds``) a finder
    could match at, judged by the bytes around them (see the comment above). ``data`` ends
    with two "\\n" that belong to no text: offsets just past either end land on them."""
    np = sc["np"]
    keep = np.ones(len(hits), dtype=bool)
    last = len(data) - 1

    def window(starts, width: int):  # data[start:start + width] per start, past the end "\n"
        idx = starts[:, None] + np.arange(width)
        np.minimum(idx, last, out=idx)
        return data[idx]

    def first_of(rows, table):  # each row's first byte in table (None: none there)
        found = table[rows]
        at = found.argmax(axis=1)
        return rows[np.arange(len(rows)), at], found.any(axis=1)

    for kind in np.unique(kinds).tolist():
        sel = np.flatnonzero(kinds == kind)
        h = hits[sel]
        if kind == _AT:  # _EMAIL_LOCAL ends just before it ("$" also matches before a "\n")
            before, before2 = data[h - 1], data[h - 2]  # -1 and -2: the final "\n"s
            ok = sc["local"][before] | ((before == 10) & sc["local"][before2])
            keep[sel] = ok & sc["domain"][data[h + 1]]
        elif kind == _URL:
            first, found = first_of(window(h + 3, _URL_WINDOW), sc["url_stop"])
            keep[sel] = (first == 64) | ~found
        elif kind == _TOKEN:
            head = window(h, 7).astype(np.uint64) << (np.arange(48, -8, -8, dtype=np.uint64))
            value = head.sum(axis=1, dtype=np.uint64)
            ok = np.zeros(len(h), dtype=bool)
            for n, known in sc["prefixes"].items():
                v = value >> np.uint64(8 * (7 - n))
                at = np.minimum(np.searchsorted(known, v), len(known) - 1)
                ok |= known[at] == v
            keep[sel] = ok
        elif kind >= 6:
            ok = np.zeros(len(h), dtype=bool)
            for word, k in _KEYWORD_TRIGRAMS.items():
                if _KEYWORD_KIND[word[k:k + 3]] != kind:
                    continue
                w = np.frombuffer(word.encode(), dtype=np.uint8)
                start = h - k
                # the whole word in any ASCII case (its letters | 0x20 are the lower-case ones)
                same = ((window(np.maximum(start, 0), len(w)) | np.uint8(0x20)) == w).all(axis=1)
                same &= start >= 0
                end = start + len(w)
                after = data[np.minimum(end, last)]
                if word == "bearer":  # _AUTH: spaces after it
                    same &= sc["space"][after]
                elif word == "authorization":  # _AUTH: "authorization:"
                    same &= after == 58
                else:  # _ASSIGNED: ":" or "=" after what it may skip
                    if word == "key":  # _find_assignments: after a _KEY_PREFIX word
                        same &= sc["key_before"][data[start - 1]]  # start 0: the final "\n"
                    if word == "token":  # _assignment: not part of a longer word
                        same &= ~sc["word"][after]
                    first, found = first_of(window(np.minimum(end, last), _WINDOW), ~sc["assign_gap"])
                    same &= (first == 58) | (first == 61) | ~found
                ok |= same
            keep[sel] = ok
    return keep


def _prescan(encoded: list[bytes]) -> dict[int, tuple[list[int], list[tuple[int, int]]]]:
    """The texts (UTF-8) that a finder could find something in, by index in order, each with
    the byte offsets of its places (interesting 3-byte sequences that pass _place_may_match)
    and the spans (byte offsets) that _DIGIT_RUN matches in it and _find_numbers looks into.
    A text of 7 colons within 36 characters (or with 7 colons, not ASCII) is there for IPv6.

    The table look-ups and digit runs go through the texts _SCAN_BYTES at a time; the tests of
    the few places found run once over all of them."""
    sc = _scan_tables()
    np = sc["np"]
    n = len(encoded)
    if not n:
        return {}
    row_start = np.zeros(n, dtype=np.int64)
    np.cumsum([len(e) + 1 for e in encoded[:-1]], out=row_start[1:])
    # "\n" between texts: it is in no anchor or keyword and ends a run of digits; two more
    # after the last text, so that 3-byte sequences and windows past the end land on "\n"
    data = np.frombuffer(b"\n".join(encoded) + b"\n\n", dtype=np.uint8)
    size = len(data) - 2
    hit_parts, kind_parts, run_parts, colon_parts = [], [], [], []
    bounds = [*row_start.tolist(), size + 1]
    i = 0
    while i < n:
        j = i + 1
        while j < n and bounds[j + 1] - bounds[i] <= _SCAN_BYTES:
            j += 1
        a, b = bounds[i], bounds[j]  # texts i to j - 1 and the "\n" after each
        seg = data[a:b]
        # a first look-up by the first two bytes (a small table that stays in cache) leaves
        # few places for the 16 MB table of three bytes (none starts at the last "\n")
        pair = data[a:b - 1].astype(np.uint16)
        pair <<= 8
        pair |= data[a + 1:b]
        maybe = np.flatnonzero(np.take(sc["pairs"], pair))
        if len(maybe):
            code = pair[maybe].astype(np.uint32)
            code <<= 8
            code |= data[maybe + (a + 2)]
            kinds = np.take(sc["table"], code)
            found = kinds != 0
            hit_parts.append(maybe[found] + a)
            kind_parts.append(kinds[found])
        # comparisons (several times faster than a table look-up): 0-9, and " ", "(", ")",
        # "-", ".", "/" (40-47 but for 42-44) that _DIGIT_RUN allows between digits
        digit = (seg - np.uint8(48)) < 10
        digits = np.flatnonzero(digit)
        if len(digits) >= 2:
            run = digit | (seg == 32) | (((seg - np.uint8(40)) < 8) & ((seg - np.uint8(42)) >= 3))
            # digits in one run have no other character between them
            other = np.cumsum(~run, dtype=np.int32)[digits]
            first = np.flatnonzero(np.diff(other, prepend=-1))
            last = np.append(first[1:], len(digits)) - 1
            # _DIGIT_RUN matches a run from its first digit to its last, if they are 5+ apart;
            # _find_numbers looks for something only in one of 7+ digits or 3+ dots
            start, end = digits[first], digits[last] + 1
            long = np.flatnonzero(end - start >= 6)
            if len(long):
                start, end = start[long], end[long]
                dots = np.flatnonzero(seg == 46)
                dotted = np.searchsorted(dots, end) - np.searchsorted(dots, start) >= 3
                useful = ((last - first + 1)[long] >= 7) | dotted
                run_parts.append(np.stack([start[useful], end[useful]]) + a)
        colon_parts.append(np.flatnonzero(seg == 58) + a)
        i = j
    out: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}
    if hit_parts:
        hits = np.concatenate(hit_parts)
        hits = hits[_place_may_match(sc, data, hits, np.concatenate(kind_parts))]
        row = np.searchsorted(row_start, hits, side="right") - 1
        for r, p in zip(row.tolist(), (hits - row_start[row]).tolist(), strict=True):
            if r in out:
                out[r][0].append(p)
            else:
                out[r] = ([p], [])
    if run_parts:
        runs = np.concatenate(run_parts, axis=1)
        row = np.searchsorted(row_start, runs[0], side="right") - 1
        for r, a, b in zip(row.tolist(), (runs[0] - row_start[row]).tolist(),
                           (runs[1] - row_start[row]).tolist(), strict=True):
            if r not in out:
                out[r] = ([], [])
            out[r][1].append((a, b))
    colons = np.concatenate(colon_parts)
    if len(colons) >= 7:
        row = np.searchsorted(row_start, colons, side="right") - 1
        many = np.flatnonzero(np.bincount(row, minlength=n) >= 7)
        if len(many):
            # _ipv6_candidates looks for 7 colons within 36 characters: at most 36 bytes apart
            # in ASCII text (a run of them across two texts only adds a text to look at)
            close = set(row[:-6][colons[6:] - colons[:-6] <= 36].tolist())
            for r in many.tolist():
                if r not in out and (r in close or not encoded[r].isascii()):
                    out[r] = ([], [])
    return dict(sorted(out.items())) if out else out


def _checked(text: str, data: bytes, places: list[int]) -> tuple[dict[str, list[int]], dict[str, list[int]] | None]:
    """The anchors and keywords at the pre-scan's places in one text (``data`` is its UTF-8),
    as ``_anchors`` reports them: start positions, words in the order in which they first end.
    Keywords are None for a text that needs the full keyword scan (see _LOWERS_TO_ASCII)."""
    anchors: dict[str, list[int]] = {}
    keywords: dict[str, list[int]] | None = {}
    if not places:
        return anchors, keywords
    checks = _SCAN["checks"]
    for p in places:
        tri = data[p:p + 3]
        first = tri[0]
        if first == 64:  # "@"
            anchors.setdefault("@", []).append(p)
        elif first == 58 and tri[1:2] == b":":  # "::"
            anchors.setdefault("::", []).append(p)
        for word, w, k, is_keyword in checks.get(tri, ()):
            if not is_keyword:
                if data.startswith(w, p):
                    anchors.setdefault(word, []).append(p)
            elif keywords is not None and p >= k and data[p - k:p - k + len(w)].lower() == w:
                keywords.setdefault(word, []).append(p - k)
        if tri == _LOWERS_TO_ASCII:
            keywords = None
    if len(data) != len(text):  # not ASCII: byte offsets to character positions
        found = [anchors, keywords or {}]
        offsets = sorted({q for f in found for ps in f.values() for q in ps})
        char_at, chars, last = {}, 0, 0
        for q in offsets:  # one pass through the text, not one decode per offset
            chars += len(data[last:q].decode("utf-8", "surrogatepass"))
            char_at[q], last = chars, q
        for f in found:
            for word, ps in f.items():
                f[word] = [char_at[q] for q in ps]
    if len(anchors) > 1:
        anchors = dict(sorted(anchors.items(), key=lambda kv: kv[1][0] + len(kv[0])))
    if keywords and len(keywords) > 1:
        keywords = dict(sorted(keywords.items(), key=lambda kv: kv[1][0] + len(kv[0])))
    return anchors, keywords


class Scrubber:
    """Finds and replaces personal data and secrets; ``scrub`` returns the new text and hits."""

    def __init__(self, kinds: tuple[str, ...] = KINDS):
        self.kinds = set(kinds)

    def find(self, text: str) -> list[Span]:
        """Non-overlapping spans of personal data and secrets, in text order."""
        return self._find(text, _anchors(_ANCHORS, text), None, None, None)

    def find_many(self, texts: list[str], lowered: list[str] | None = None) -> list[list[Span]]:
        """``[find(t) for t in texts]``, several times faster on text that mostly holds nothing
        to find (see _prescan). ``lowered`` may give ``t.lower()`` of each text."""
        out: list[list[Span]] = [[] for _ in texts]  # most rows: nothing any finder could match
        encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
        for i, (places, runs) in _prescan(encoded).items():
            text, data = texts[i], encoded[i]
            anchors, keywords = _checked(text, data, places)
            if runs and len(data) != len(text):  # not ASCII: to character positions
                runs = [(c, c + b - a) for a, b in runs
                        for c in (len(data[:a].decode("utf-8", "surrogatepass")),)]
            out[i] = self._find(text, anchors, keywords, runs, lowered[i] if lowered is not None else None)
        return out

    def _find(self, text: str, anchors: dict[str, list[int]], keywords: dict[str, list[int]] | None,
              runs: list[tuple[int, int]] | None, low: str | None) -> list[Span]:
        """find() given the anchors, the keywords (None: scan the lower-cased text for them)
        and the digit runs (None: scan the text for them)."""
        spans: list[Span] = []
        if anchors:
            if "PRIVATE KEY" in anchors:
                spans += _find_private_keys(text)
            if "://" in anchors:
                spans += _find_url_passwords(text, anchors["://"])
            spans += _find_tokens(text, anchors)
            if "@" in anchors:
                spans += _find_emails(text, anchors["@"])
        if keywords is None or keywords:
            if low is None:
                low = text.lower()
            if len(low) != len(text):  # a few characters lower-case to two: keep positions aligned
                low = text.translate(_ASCII_LOWER)
            for keyword, positions in (_anchors(_KEYWORDS, low) if keywords is None else keywords).items():
                if keyword in _AUTH_WORDS:
                    spans += _find_auth(text, positions)
                else:
                    spans += _find_assignments(text, low, keyword, positions)
        if "::" in anchors or text.count(":") >= 7:
            spans += _find_ipv6(text)
        if runs is None or runs:
            spans += _find_numbers(text, runs)
        if not spans:
            return spans
        spans.sort(key=lambda s: (_PRIORITY[s[2]], s[0]))
        taken: list[Span] = []
        for s in spans:
            if s[2] in self.kinds and all(s[1] <= t[0] or s[0] >= t[1] for t in taken):
                taken.append(s)
        taken.sort()
        return taken

    def scrub(self, text: str) -> tuple[str, list[Hit]]:
        return self.replace(text, self.find(text))

    def replace(self, text: str, spans: list[Span]) -> tuple[str, list[Hit]]:
        """``text`` with ``spans`` (from find) replaced by placeholders, and the hits."""
        if not spans:
            return text, []
        parts: list[str] = []
        hits: list[Hit] = []
        last = 0
        for start, end, kind in spans:
            parts.append(text[last:start])
            parts.append(PLACEHOLDER.format(kind))
            hits.append(Hit(kind, text[start:end], start, end))
            last = end
        parts.append(text[last:])
        return "".join(parts), hits



def mask(value: str, kind: str) -> str:
    """A shown-but-safe form of a found value, for reports."""
    if kind == "PRIVATE_KEY":
        head = value.split("-----")[1] if value.count("-----") >= 2 else "PRIVATE KEY"
        return f"-----{head}----- [{len(value)} chars]"
    if kind == "EMAIL":
        local, _, domain = value.partition("@")
        name, _, tld = domain.rpartition(".")
        return f"{local[:1]}***@{name[:1]}***.{tld}"
    if kind == "CARD_NUMBER":
        digits = [c for c in value if c.isdigit()]
        return "*" * (len(digits) - 4) + "".join(digits[-4:])
    if kind == "PHONE":
        return "".join("*" if c.isdigit() else c for c in value[:-2]) + value[-2:]
    if kind in ("IPV4", "IPV6"):
        sep = "." if kind == "IPV4" else ":"
        parts = value.split(sep)
        return sep.join(parts[:1] + ["*" * min(len(p), 3) if p else p for p in parts[1:]])
    if kind == "PASSWORD":
        return "*" * min(len(value), 8)
    keep = 4 if len(value) >= 16 else 1
    return value[:keep] + "*" * min(max(len(value) - keep - 2, 3), 12) + value[-2:]
