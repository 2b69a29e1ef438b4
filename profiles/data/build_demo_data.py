#!/usr/bin/env python3
"""Build the shipped demo data sets from the OWASP Cheat Sheet Series.

Reads the Markdown cheat sheets in --source (a copy of the `cheatsheets/`
folder of OWASP/CheatSheetSeries) and writes, into --out (default: the
directory holding this script):

  owasp-text.jsonl     {"text", "source"}            continued pre-training
  owasp-sft.jsonl      {"prompt", "completion"}      supervised fine-tuning
  owasp-chat.jsonl     {"messages": [...]}           chat-format fine-tuning
  owasp-dpo.jsonl      {"prompt", "chosen", "rejected"}  preference tuning
  owasp-prompts.jsonl  {"prompt"}                    held-out inference prompts

Standard library only. The output is deterministic: files are read in sorted
order and every random choice comes from a fixed seed.

The cheat sheets are licensed CC BY-SA 4.0 (copyright the OWASP Cheat Sheet
Series contributors); everything written here is derived from them and is
distributed under the same licence. See SOURCE.md beside this script.
"""

from __future__ import annotations

import argparse
import collections
import html
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field

SEED = 20260817

N_PROMPTS = 16
N_CHAT = 150
N_DPO = 320
MAX_SFT = 560
MIN_SFT = 300

MIN_TEXT_CHARS = 200
MAX_ANSWER_CHARS = 400
MIN_ANSWER_CHARS = 60

SYSTEM_PROMPT = "You are a concise application-security assistant."

# Cheat sheets that only point somewhere else.
SKIP_FILES = {
    "Access_Control_Cheat_Sheet.md",
    "TLS_Cipher_String_Cheat_Sheet.md",
}

# Section headings that carry link lists or other material that makes neither
# good running text nor a good question.
REFERENCE_HEADINGS = {
    "references", "reference", "related articles", "related article",
    "related cheat sheets", "related owasp cheat sheets", "further reading",
    "references and further reading", "references and future reading",
    "resources", "additional resources", "external references", "links",
    "useful links", "sources", "authors", "authors and primary editors",
    "contributors", "credits", "acknowledgements", "acknowledgments",
    "table of contents", "contents", "appendix",
}

RE_REFERENCE_HEADING = re.compile(
    r"^(references?|related (articles?|cheat ?sheets?|owasp|resources)|further reading|"
    r"((owasp|other|additional|external|useful) )?(resources|references|links|reading)$|"
    r"standards and specifications$)", re.I)


def is_reference_heading(h: str) -> bool:
    h = clean_heading(h).lower()
    return h in REFERENCE_HEADINGS or bool(RE_REFERENCE_HEADING.match(h))


# Headings that describe the cheat sheet as a whole: questions are phrased
# with the cheat sheet title instead of the heading.
INTRO_HEADINGS = {
    "introduction", "overview", "context", "background", "objective",
    "objectives", "purpose", "scope", "about", "description", "goal", "goals",
    "intro", "summary", "executive summary", "motivation", "proposition",
    "the problem",
}

# Headings too generic (or too tied to their parent heading) to stand alone
# as a question.
GENERIC_HEADINGS = {
    "do", "don't", "dont", "do's and don'ts", "dos and don'ts", "tools",
    "tooling", "example", "examples", "code example", "code examples",
    "example code", "sample", "samples", "general", "implementation",
    "implementation details", "details", "notes", "note", "limitations",
    "caveats", "defense", "defence", "defenses", "defences", "mitigation",
    "mitigations", "solution", "solutions", "remediation", "risk", "risks",
    "recommendation", "recommendations", "how to test", "testing", "usage",
    "browser support", "support", "conclusion", "conclusions", "cases",
    "advantages", "disadvantages", "pros", "cons", "pros and cons",
    "attack vectors", "attack scenario", "attack scenarios", "scenario",
    "scenarios", "case study", "configuration", "setup", "installation",
    "semgrep rules", "rules", "checklist", "faq", "glossary", "terminology",
    "definitions", "vocabulary", "other", "others", "misc", "miscellaneous",
    "php", "java", "python", "ruby", ".net", "net", "c#", "go", "javascript",
    "node.js", "nodejs", "android", "ios", "libxml2", "windows", "linux",
    "macos", "apache", "nginx", "iis", "tomcat", "spring", "django", "rails",
    "known issues", "issues", "problem", "problems", "why", "how", "what",
    "what's next", "next steps", "key takeaways", "takeaways", "level 1",
    "level 2", "level 3", "option 1", "option 2", "option 3", "warning",
    "warnings", "important", "caution", "tip", "tips", "remark", "remarks",
}

# First words that mark an imperative heading ("Use HTTPS", "Avoid X").
IMPERATIVE_VERBS = {
    "accept", "add", "adopt", "allow", "allowlist", "apply", "assess",
    "audit", "authenticate", "authorize", "automate", "avoid", "bind",
    "block", "build", "check", "choose", "configure", "consider", "create",
    "define", "deny", "deploy", "detect", "disable", "do", "document",
    "don't", "drop", "employ", "enable", "encode", "encrypt", "enforce",
    "ensure", "escape", "establish", "expire", "filter", "follow",
    "generate", "grant", "handle", "harden", "hash", "identify", "implement",
    "include", "integrate", "invalidate", "isolate", "keep", "leverage",
    "limit", "lock", "log", "maintain", "make", "manage", "minimize",
    "minimise", "mitigate", "monitor", "never", "perform", "pin", "plan",
    "prefer", "prevent", "protect", "provide", "reduce", "reject", "remove",
    "require", "restrict", "return", "review", "rotate", "run", "sandbox",
    "sanitize", "sanitise", "scan", "secure", "segment", "select",
    "separate", "set", "sign", "store", "strip", "test", "treat", "understand",
    "update", "upgrade", "use", "validate", "verify", "whitelist", "always",
    "only", "apply", "establish", "pass", "put", "send", "serve", "specify",
    "track", "train", "trust", "consume", "beware", "disallow", "forbid",
    "guard", "inspect", "migrate", "opt", "pay", "regenerate", "favor",
    "favour", "hide", "adhere", "be", "get", "go", "give", "shift", "start",
    "stop", "turn", "write", "design", "harden", "tighten", "harmonize",
    "centralize", "centralise", "collect", "compare", "develop", "find",
    "install", "notify", "optimize", "receive", "record", "renew",
    "segregate", "transmit", "force", "assume", "embed", "close", "register", "respond", "rely",
    "change", "clean", "control", "deploy", "educate", "evaluate",
    "introduce", "obtain", "patch", "reuse", "think", "tune", "watch",
}

# First words that are as often nouns as verbs: imperative only when followed
# by a lower-case word or a determiner ("Log all failures", not "Log Format").
AMBIGUOUS_VERBS = {
    "audit", "block", "change", "check", "control", "document", "filter",
    "handle", "hash", "lock", "log", "monitor", "patch", "pin", "plan",
    "review", "sandbox", "scan", "segment", "set", "sign", "store", "test",
    "track", "train", "trust", "update", "upgrade", "watch", "register",
    "respond", "secure", "consume", "only", "pass", "put", "clean", "tune",
    "think", "reuse", "introduce", "evaluate", "educate", "drop", "return",
    "record", "force", "embed", "close", "design", "find", "compare",
}
DETERMINERS = {
    "a", "an", "the", "all", "any", "each", "every", "your", "only", "no",
    "and", "to", "with", "for", "on", "in", "out", "up", "strong", "secure",
    "proper", "appropriate", "sensitive", "untrusted", "user", "third-party",
}

# Vague, unhelpful answers used as the rejected side of some preference pairs.
VAGUE_ANSWERS = [
    "It depends on the application; there is no general guidance.",
    "This is mostly handled by modern frameworks, so there is usually nothing to do.",
    "Just follow general security best practices and keep your software up to date.",
    "There is no real risk here as long as the application uses HTTPS.",
    "This only matters for very large organisations; most applications can ignore it.",
    "Security teams disagree on this, so any reasonable approach is fine.",
    "You should be careful and make sure it is secure.",
    "Add a firewall in front of the application and the problem goes away.",
]

ABBREVIATIONS = [
    "e.g.", "i.e.", "etc.", "vs.", "cf.", "Fig.", "fig.", "No.", "no.",
    "approx.", "U.S.", "Inc.", "Ltd.", "Mr.", "Ms.", "Dr.", "St.", "al.",
    "resp.", "incl.", "min.", "max.", "Sec.", "sec.", "Vol.", "v.",
]


# --------------------------------------------------------------------------
# Markdown parsing
# --------------------------------------------------------------------------


@dataclass
class Section:
    heading: str            # raw heading text
    level: int              # 2 or 3 (1 for the text before the first ##)
    lines: list = field(default_factory=list)   # direct body (until next heading)
    parent: str = ""        # enclosing ## heading for ### sections


@dataclass
class Sheet:
    filename: str
    title: str              # normalised, e.g. "Authentication Cheat Sheet"
    topic: str              # title without "Cheat Sheet"
    top: list = field(default_factory=list)     # [(heading, [all lines])]
    sections: list = field(default_factory=list)  # Section objects


def is_fence(line: str) -> bool:
    return line.lstrip().startswith("```") or line.lstrip().startswith("~~~")


def fence_toggles(line: str) -> bool:
    """A fence line toggles code mode unless it is a one-line ```code```."""
    s = line.strip()
    marker = s[:3]
    return not (len(s) > 6 and marker in s[3:])


def normalise_title(raw: str, filename: str) -> str:
    t = raw.strip()
    t = re.sub(r"^DEPRECATED:\s*", "", t, flags=re.I)
    t = re.sub(r"\s*\((Historical|Deprecated)\)\s*$", "", t, flags=re.I)
    t = re.sub(r"\bCheat ?sheet\b", "Cheat Sheet", t, flags=re.I)
    if "Cheat Sheet" not in t:
        # e.g. "Top 10 Automotive Security Vulnerabilities": fall back on the
        # file name, which always ends in _Cheat_Sheet.md.
        t = filename[:-3].replace("_", " ")
    return t


def parse_sheet(path: str) -> Sheet:
    filename = os.path.basename(path)
    with open(path, encoding="utf-8") as fh:
        raw = fh.read()
    raw = raw.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    lines = raw.split("\n")

    title = None
    in_code = False
    top = []           # (heading, lines)
    sections = []
    cur_top = None
    cur_sec = None
    cur_parent = ""
    for line in lines:
        if is_fence(line):
            if fence_toggles(line):
                in_code = not in_code
        elif not in_code:
            m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
            if m:
                level = len(m.group(1))
                text = m.group(2).strip()
                if level == 1 and title is None:
                    title = text
                    cur_top = (title, [])
                    top.append(cur_top)
                    cur_sec = Section(heading=title, level=1)
                    sections.append(cur_sec)
                    continue
                if level == 2:
                    cur_top = (text, [])
                    top.append(cur_top)
                    cur_parent = text
                    cur_sec = Section(heading=text, level=2)
                    sections.append(cur_sec)
                    continue
                if level == 3:
                    if cur_top is not None:
                        cur_top[1].append(line)
                    cur_sec = Section(heading=text, level=3, parent=cur_parent)
                    sections.append(cur_sec)
                    continue
                # deeper headings end the direct body of the current section
                if cur_top is not None:
                    cur_top[1].append(line)
                cur_sec = None
                continue
        if cur_top is not None:
            cur_top[1].append(line)
        if cur_sec is not None:
            cur_sec.lines.append(line)

    if title is None:
        title = filename[:-3].replace("_", " ")
    ntitle = normalise_title(title, filename)
    topic = re.sub(r"\s*Cheat Sheet\s*", " ", ntitle).strip()
    # Text before the first ## is stored under the (normalised) title.
    if top and top[0][0] == title:
        top[0] = (ntitle, top[0][1])
    if sections and sections[0].level == 1:
        sections[0].heading = ntitle
    return Sheet(filename=filename, title=ntitle, topic=topic, top=top,
                 sections=sections)


# --------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------

HTML_TAGS = (
    "a|abbr|b|br|center|code|dd|del|details|div|dl|dt|em|font|h[1-6]|hr|i|"
    "img|ins|kbd|li|mark|ol|p|pre|s|small|span|strike|strong|sub|summary|sup|"
    "table|tbody|td|tfoot|th|thead|tr|u|ul|iframe|figure|figcaption|picture|"
    "source|video"
)
_LTEXT = r"((?:\\.|[^\]\\])*)"
_LURL = r"\(\s*(?:[^()\s]|\([^()]*\))*(?:\s+\"[^\"]*\")?\s*\)"
RE_IMAGE = re.compile(r"!\[" + _LTEXT + r"\]" + _LURL)
RE_IMAGE_REF = re.compile(r"!\[[^\]]*\]\[[^\]]*\]")
RE_LINK = re.compile(r"\[" + _LTEXT + r"\]" + _LURL)
RE_LINK_REF = re.compile(r"\[([^\]]+)\]\[[^\]]*\]")
RE_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|<>])")
RE_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*\S+.*$")
RE_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
RE_HTML_TAG = re.compile(r"</?(?:%s)\b[^>]*>" % HTML_TAGS, re.I)
RE_SUMMARY = re.compile(r"<summary\b[^>]*>.*?</summary>", re.I | re.S)
RE_CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def _protect_code(s: str):
    spans = []

    def keep(m):
        spans.append(m.group(0))
        return "\x00%d\x00" % (len(spans) - 1)

    return RE_CODE_SPAN.sub(keep, s), spans


def _restore_code(s: str, spans) -> str:
    return re.sub(r"\x00(\d+)\x00", lambda m: spans[int(m.group(1))], s)


def clean_inline(s: str) -> str:
    """Drop images, link URLs and HTML tags from one line of prose."""
    s, spans = _protect_code(s)
    s = RE_SUMMARY.sub("", s)
    s = RE_HTML_COMMENT.sub("", s)
    s = RE_IMAGE.sub("", s)
    s = RE_IMAGE_REF.sub("", s)
    for _ in range(2):  # nested [text [x](y)](z)
        s = RE_LINK.sub(r"\1", s)
    s = RE_LINK_REF.sub(r"\1", s)
    s = RE_HTML_TAG.sub("", s)
    s = re.sub(r"<(https?://[^>\s]+)>", r"\1", s)   # autolinks: keep the text
    s = RE_MD_ESCAPE.sub(r"\1", s)
    s = html.unescape(s)
    return _restore_code(s, spans)


def clean_block(lines) -> str:
    """Lightly clean a run of Markdown lines (code blocks are kept verbatim)."""
    out = []
    prose = []
    in_code = False

    def flush_prose():
        if not prose:
            return
        # Clean a whole run of prose lines at once so that links spanning
        # lines ("[text](\n https://...)") are handled too.
        for c in clean_inline("\n".join(prose)).split("\n"):
            c = c.rstrip()
            if re.fullmatch(r"\s*([-*+]|\d+[.)])\s*", c):
                continue  # list bullet left empty (it held only an image)
            out.append(c)
        prose.clear()

    for line in lines:
        if is_fence(line):
            flush_prose()
            if fence_toggles(line):
                in_code = not in_code
            out.append(line.rstrip())
            continue
        if in_code:
            out.append(line.rstrip())
            continue
        if RE_REF_DEF.match(line):
            continue
        prose.append(line)
    flush_prose()
    text = "\n".join(out).strip("\n")
    text = re.sub(r"\n[ \t]*\n(?:[ \t]*\n)+", "\n\n", text)  # 3+ newlines
    return text.strip()


def strip_emphasis(s: str) -> str:
    s, spans = _protect_code(s)
    s = re.sub(r"\*\*(.+?)\*\*", r"\1", s)
    s = re.sub(r"__(.+?)__", r"\1", s)
    s = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"\1", s)
    s = re.sub(r"(?<![\w_])_(?!\s)([^_]+?)(?<!\s)_(?![\w_])", r"\1", s)
    return _restore_code(s, spans)


def plain(s: str) -> str:
    """Inline Markdown to plain prose (keeps `code` spans)."""
    s = clean_inline(s)
    s = strip_emphasis(s)
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"\s+([,.;:!?])(?=\s|$)", r"\1", s)
    s = re.sub(r"\(\s*\)", "", s)
    s = re.sub(r"\s{2,}", " ", s)
    return s.strip()


# --------------------------------------------------------------------------
# Sentences and answers
# --------------------------------------------------------------------------


RE_ABBREV = re.compile(r"(?<![A-Za-z])(?:%s)" % "|".join(re.escape(a) for a in ABBREVIATIONS))


def split_sentences(text: str):
    s, spans = _protect_code(text)
    s = RE_ABBREV.sub(lambda m: m.group(0).replace(".", "\x01"), s)
    # decimal numbers and dotted names (Node.js, 1.2) never contain ". "
    parts = re.split(r"(?:(?<=[.!?])|(?<=[.!?][\"”')\]]))\s+(?=[A-Z0-9\"“'(\[`\x00])", s)
    out = []
    for p in parts:
        p = p.replace("\x01", ".")
        p = _restore_code(p, spans).strip()
        if p:
            out.append(p)
    return out


def blocks_of(lines):
    """Group a section body into (kind, [lines]) blocks."""
    blocks = []
    cur = []
    kind = None
    in_code = False

    def flush():
        nonlocal cur, kind
        if cur:
            blocks.append((kind, cur))
        cur, kind = [], None

    for line in lines:
        if in_code:
            cur.append(line)
            if is_fence(line) and fence_toggles(line):
                in_code = False
                flush()
            continue
        if is_fence(line):
            flush()
            if fence_toggles(line):
                in_code = True
                kind = "code"
                cur = [line]
            else:
                blocks.append(("code", [line]))
            continue
        if not line.strip():
            flush()
            continue
        s = line.lstrip()
        if kind is None:
            if s.startswith("|"):
                kind = "table"
            elif re.match(r"([-*+]|\d+[.)])\s+", s):
                kind = "list"
            elif s.startswith(">"):
                kind = "quote"
            elif line.startswith("    ") or line.startswith("\t"):
                kind = "code"
            elif s.startswith("<"):
                kind = "html"
            else:
                kind = "prose"
        elif kind == "prose" and re.match(r"([-*+]|\d+[.)])\s+", s) and not line.startswith(" "):
            flush()
            kind = "list"
        cur.append(line)
    flush()
    return blocks


def list_items(lines):
    """Top-level items of a Markdown list, as plain text."""
    items = []
    for line in lines:
        m = re.match(r"^([-*+]|\d+[.)])\s+(.*)$", line)
        if m:
            items.append(m.group(2))
        elif items and line.startswith((" ", "\t")) and not re.match(
                r"^\s+([-*+]|\d+[.)])\s+", line):
            items[-1] += " " + line.strip()
    return [re.sub(r"^\[[ xX]\]\s+", "", plain(i)) for i in items]


BAD_ANSWER_START = re.compile(
    r"^(this (section|cheat ?sheet|article|document|page|guide)|the following|"
    r"before we|let's|let us|we will|we'll|in this|now |next,|first,|so,|"
    r"following|below|see |please|refer |as (mentioned|described|discussed|"
    r"noted|stated)|here |in this (section|cheat ?sheet|article)|for example|"
    r"e\.g\.|note:|warning:|tl;dr|todo)",
    re.I,
)


def good_sentence(s: str, min_len: int = 20) -> bool:
    if len(s) < min_len:
        return False
    if "http://" in s or "https://" in s:
        return False
    if re.search(r"\b(below|above|following (table|examples?|code|diagram|figure|image|list|steps|sections?))\b", s, re.I):
        return False
    if re.search(r"\b(the|these) following\b", s, re.I) and not s.endswith(":"):
        return False
    if s.count("`") > 6:
        return False
    if re.search(r"\b(found|see|click|listed|available|described|more|documented|shown|"
                 r"explained|covered|discussed|details)\s+(here|in this link)\b", s, re.I):
        return False
    if re.search(r"\bhere\s*[.:]?$", s):
        return False
    return True


def first_answer(lines):
    """First 1-3 sentences (<= MAX_ANSWER_CHARS) of a section, or None."""
    blocks = blocks_of(lines)
    for idx, (kind, blines) in enumerate(blocks):
        if kind == "prose":
            text = plain(" ".join(l.strip() for l in blines))
            sents = split_sentences(text)
            chosen = []
            total = 0
            for s in sents:
                if not good_sentence(s):
                    break
                add = len(s) + (1 if chosen else 0)
                if total + add > MAX_ANSWER_CHARS or len(chosen) == 3:
                    break
                chosen.append(s)
                total += add
            # A trailing "...as follows:" sentence introduces a list.
            if chosen and chosen[-1].endswith(":"):
                nxt = blocks[idx + 1] if idx + 1 < len(blocks) else None
                lead = chosen.pop()
                if nxt and nxt[0] == "list":
                    items = [i.rstrip(".;,") for i in list_items(nxt[1])]
                    items = [i for i in items if 3 <= len(i.split()) and good_sentence(i, min_len=0)]
                    base = " ".join(chosen + [lead])
                    picked = []
                    for it in items:
                        cand = base + " " + "; ".join(picked + [it]) + "."
                        if len(cand) > MAX_ANSWER_CHARS + 40:
                            break
                        picked.append(it)
                    if len(picked) >= 2:
                        picked[0] = lower_first(picked[0])
                        chosen.append(lead + " " + "; ".join(picked) + ".")
            if not chosen:
                return None
            answer = " ".join(chosen)
            if answer[-1] not in ".!?)\"”":
                return None
            return answer
        if kind == "list" and idx == 0:
            items = [i for i in list_items(blines) if len(i.split()) >= 5]
            picked = []
            total = 0
            for it in items:
                if not good_sentence(it) or it.endswith(":"):
                    break
                it = it if it[-1] in ".!?" else it.rstrip(",;") + "."
                add = len(it) + (1 if picked else 0)
                if total + add > MAX_ANSWER_CHARS or len(picked) == 3:
                    break
                picked.append(it)
                total += add
            if len(picked) >= 2:
                return " ".join(picked)
            return None
        if kind in ("quote", "html"):
            continue
        return None  # code or table first: no usable prose
    return None


def lower_first(s: str) -> str:
    if len(s) > 1 and s[0].isupper() and s[1].islower():
        return s[0].lower() + s[1:]
    return s


# --------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------


class Casing:
    """Decides which capitalised words of a heading are proper nouns.

    A run of capitalised words is kept as written when the corpus writes it
    that way more often than in lower case ("Content Security Policy");
    otherwise a single word keeps its capital only when the corpus mostly
    capitalises it in mid-sentence ("Java", "Kubernetes").
    """

    def __init__(self, sheets):
        self.lower = collections.Counter()
        self.cap = collections.Counter()
        chunks = []
        for sh in sheets:
            for sec in sh.sections:
                for kind, blines in blocks_of(sec.lines):
                    if kind not in ("prose", "list"):
                        continue
                    text = plain(" ".join(l.strip() for l in blines))
                    chunks.append(text)
                    for sent in split_sentences(text):
                        words = re.findall(r"[A-Za-z][A-Za-z'.-]*[A-Za-z]|[A-Za-z]", sent)
                        for w in words[1:]:
                            if w.islower():
                                self.lower[w] += 1
                            elif w[0].isupper() and (len(w) == 1 or w[1:].islower()):
                                self.cap[w] += 1

        self.corpus = "  %s  " % self._norm(" ".join(chunks))
        self._names = {}

    def word(self, w: str) -> str:
        if "-" in w.strip("-"):
            return "-".join(self.word(p) if p else p for p in w.split("-"))
        core = re.sub(r"^[^A-Za-z]+|[^A-Za-z]+$", "", w)
        if not core or not core[0].isupper() or re.search(r"\d", w):
            return w
        if len(core) > 1 and not core[1:].islower():
            return w  # acronym or CamelCase
        if self.cap[core] >= 5 and self.cap[core] >= 3 * self.lower[core.lower()]:
            return w  # proper noun (Java, Django, Kubernetes ...)
        return w.replace(core, core.lower(), 1)

    @staticmethod
    def _norm(s: str) -> str:
        s = re.sub(r"\.(?=\s|$)", " ", s)
        return re.sub(r"[^A-Za-z0-9.+#]+", "  ", s).strip()

    @staticmethod
    def _titled(w: str) -> bool:
        parts = [re.sub(r"^[^A-Za-z]+|[^A-Za-z]+$", "", p) for p in w.split("-")]
        return all(p and p[0].isupper() for p in parts)

    def _is_name(self, words) -> bool:
        """Is this run of capitalised words written capitalised in the corpus
        more often than in lower case (e.g. "Cross-Site Request Forgery")?"""
        run = self._norm(" ".join(words))
        if run not in self._names:
            cap = self.corpus.count("  %s  " % run)
            low = self.corpus.count("  %s  " % run.lower())
            self._names[run] = cap >= 2 and cap > low
        return self._names[run]

    def phrase(self, h: str) -> str:
        words = h.split()
        out = []
        i = 0
        while i < len(words):
            if "-" in words[i].strip("-") and self._titled(words[i]) and self._is_name(words[i:i + 1]):
                out.append(words[i])
                i += 1
                continue
            if self._titled(words[i]):
                end = i
                while end < len(words) and self._titled(words[end]):
                    end += 1
                # Only runs that start where the capitalised run starts can be
                # names; a name is never looked for in the middle of a run.
                for j in range(end, i + 1, -1):
                    if self._is_name(words[i:j]):
                        out.extend(words[i:j])
                        i = j
                        break
                else:
                    out.append(self.word(words[i]))
                    i += 1
                while i < end:
                    out.append(self.word(words[i]))
                    i += 1
                continue
            out.append(self.word(words[i]))
            i += 1
        return " ".join(out)


def clean_heading(h: str) -> str:
    h = plain(h).replace("\u2019", "'")
    h = h.replace("`", "")
    h = re.sub(r"^(\d+(\.\d+)*[.)]?|[A-Z][.)]|Step \d+:?|(Rule|Guideline) #?\d+[a-z]?( -|:|\.)?|"
               r"Defen[cs]e Option \d+:?|Option \d+:?|Tip #?\d+:?|Level \d+:?|"
               r"Principle \d+:?|#\d+:?|\d+\s*-)\s+", "", h, flags=re.I)
    h = re.sub(r"^(INTRODUCTION|Introduction|Section \d+|SECTION \d+|Appendix( [A-Z0-9]+)?|"
               r"Vulnerability|Threat|Attack):?\s+", "", h)
    h = re.sub(r"\s*\((?:DEPRECATED|Deprecated|optional|Optional|recommended)\)\s*$", "", h)
    h = re.sub(r"\s+", " ", h).strip(" :.-")
    return h


def heading_ok(h: str) -> bool:
    if not h or len(h) > 90:
        return False
    if re.search(r"[\[\]{}=<>|_\\/]", h):
        return False
    if not re.match(r"[A-Za-z\"“(.]", h):
        return False
    if h.lower() in GENERIC_HEADINGS or h.lower() in REFERENCE_HEADINGS:
        return False
    base = re.sub(r"\s*\([^)]*\)\s*", " ", h).strip().lower()
    if base in GENERIC_HEADINGS or not base:
        return False
    if re.search(r"\bexamples?\b", h, re.I):
        return False
    if re.fullmatch(r"[a-z0-9.-]+", h):
        return False  # code-like identifier (strict-dynamic, libxml2)
    if len(h.split()) == 1 and not re.search(r"[A-Z]{2}", h) and h.lower() in IMPERATIVE_VERBS:
        return False
    return True


STOP_TERMS = {
    "this", "it", "there", "that", "these", "those", "when", "if", "while",
    "in", "for", "as", "with", "since", "because", "although", "most", "many",
    "some", "all", "each", "every", "today", "modern", "one", "our", "we",
    "you", "they", "here", "such", "other", "its", "their", "his", "her",
    "both", "any", "no", "not", "what", "why", "how", "where", "which",
}


def definition_verb(term: str, answer: str):
    """If the answer opens by defining `term`, return its verb (is/are)."""
    t = re.escape(term.lower())
    a = answer.lower()
    m = re.match(
        r"^(an?\s+|the\s+)?%s(\s*\([^)]*\))?\s+(is|are|refers to|means|describes)\b" % t,
        a)
    if not m:
        return None
    return "are" if m.group(3) == "are" else "is"


def sheet_ref(sheet: Sheet, rng: random.Random) -> str:
    return rng.choice([f"the OWASP {sheet.title}", f"the OWASP {sheet.title}",
                       f"OWASP's {sheet.title}"])


def upper_first(s: str) -> str:
    return s[:1].upper() + s[1:]


def definition_question(term: str, verb: str, ref: str, rng: random.Random) -> str:
    return rng.choice([
        f"In web security, what {verb} {term}?",
        f"What {verb} {term}?",
        f"Can you briefly explain what {term} {verb}?",
        f"How does {ref} describe {term}?",
    ])


def make_question(sheet: Sheet, sec: Section, heading: str, answer: str,
                  casing: Casing, rng: random.Random):
    """Return (question, kind) or None."""
    low = heading.lower()
    topic = sheet.topic
    ptopic = casing.phrase(topic)
    ref = sheet_ref(sheet, rng)

    if sec.level == 1 or low in INTRO_HEADINGS:
        # Questions about the cheat sheet as a whole.
        m = re.match(r"^(?:An?\s+|The\s+)?([A-Z][\w.+#/-]*(?: [\w.+#/-]+){0,4}?)"
                     r"(?:\s*\([^)]*\))?\s+(is|are|refers to)\s", answer)
        if m:
            term = m.group(1).strip()
            twords = set(re.findall(r"[a-z0-9]+", term.lower()))
            tiwords = set(re.findall(r"[a-z0-9]+", sheet.title.lower())) - {"cheat", "sheet", "security"}
            if (term.split()[0].lower() not in STOP_TERMS and twords & tiwords
                    and not twords & {"cheat", "cheatsheet", "article", "document", "section"}):
                verb = "are" if m.group(2) == "are" else "is"
                return definition_question(casing.phrase(term), verb, ref, rng), "definition"
        templates = [
            f"What is {ref} about?",
            f"What does {ref} cover?",
            f"Give a short overview of {ref}.",
            f"What is the scope of {ref}?",
        ]
        if not re.match(r"^(this|the following|in this)\b", answer, re.I):
            templates.append(f"Why does {ptopic} matter for application security?")
        return rng.choice(templates), "intro"

    m = re.match(r"^(Mitigation|Mitigations|Defen[cs]e|Prevention):\s+(.+)$", heading)
    if m:
        if not heading_ok(m.group(2)):
            return None
        t = casing.phrase(m.group(2))
        return rng.choice([
            f"In the context of {topic}, how can {t} be mitigated?",
            f"How does {ref} suggest mitigating {t}?",
            f"What mitigation does {ref} give for {t}?",
        ]), "mitigation"

    m = re.match(r"^Case \d+\s*[-:]\s*(.+)$", heading)
    if m:
        return f"What does {ref} recommend when {casing.phrase(m.group(1))}?", "case"

    if ":" in heading or not heading_ok(heading):
        return None

    h = casing.phrase(heading)
    words = heading.split()
    first = words[0].lower().rstrip(",")
    second = words[1].lower() if len(words) > 1 else ""

    # Headings that are questions, with or without the question mark.
    if heading.endswith("?") or (
            first in ("what", "why", "how", "when", "where", "which", "who") and
            second in ("is", "are", "do", "does", "can", "should", "must", "will")):
        if len(words) < 3 and not heading.endswith("?"):
            return None
        qh = upper_first(casing.phrase(heading.rstrip("?"))) + "?"
        if len(words) < 3:
            return None
        return rng.choice([qh, qh, f"{qh[:-1]} (according to {ref})?"]), "question"
    if first in ("why", "how", "what", "when", "where", "which", "who") and len(words) > 1:
        g = h
        templates = [f"Based on {ref}, can you explain {g}?",
                     f"In the context of {topic}, can you explain {g}?"]
        if len(words) >= 5:
            templates.append(f"Can you explain {g}?")
        return rng.choice(templates), "question"

    # Imperative headings: "Use HTTPS", "Do not trust client input".
    rest_orig = heading.split(" ", 1)[1] if len(words) > 1 else ""
    rest = casing.phrase(rest_orig)
    verb = first
    if verb in AMBIGUOUS_VERBS and second not in DETERMINERS:
        verb = ""  # "Review Process", "Trust Stores": a noun phrase
    if verb in IMPERATIVE_VERBS and rest:
        if verb in ("do", "don't") and rest_orig.lower().startswith("not "):
            action = "not " + casing.phrase(rest_orig[4:])
        elif verb == "don't":
            action = "not " + rest
        elif verb == "do":
            action = rest
        else:
            action = verb + " " + rest
        templates = [
            f"What does {ref} say about the advice to {action}?",
            f"What does {ref} mean by the advice to {action}?",
            f"When working on {topic}, why should developers {action}?",
            f"In {topic}, what is behind the recommendation to {action}?",
        ]
        if len(action.split()) >= 5:
            templates += [f"Why should developers {action}?",
                          f"Explain the recommendation to {action}.",
                          f"What should I know about the recommendation to {action}?"]
        return rng.choice(templates), "imperative"

    # Statements: "Authorization should be performed server-side".
    m = re.match(r"^(.+?) (should not|should|must not|must) (.+)$", heading, re.I)
    if m and len(m.group(1).split()) <= 5 and "you" not in m.group(1).lower().split():
        subj = casing.phrase(m.group(1))
        if subj in ("application", "applications"):
            subj = "the " + subj
        modal = m.group(2).lower().split()
        pred = casing.phrase(m.group(3))
        neg = " not" if len(modal) > 1 else ""
        return rng.choice([
            f"Why{' ' + modal[0]} {subj}{neg} {pred}?",
            f"According to {ref}, why{' ' + modal[0]} {subj}{neg} {pred}?",
        ]), "statement"
    if re.search(r"\b(is|are|can|cannot|should|must)\b", heading, re.I):
        return rng.choice([f"What does {ref} mean by \"{h}\"?",
                           f"Explain the principle \"{h}\" from {ref}."]), "statement"

    if first.endswith("ing") and len(first) > 5 and rest:
        g = h
        templates = [
            f"What does {ref} say about {g}?",
            f"What does {g} involve, according to {ref}?",
            f"In the context of {topic}, what should developers know about {g}?",
        ]
        if len(words) >= 5:
            templates += [f"What should developers know about {g}?",
                          f"What is the guidance on {g}?"]
        return rng.choice(templates), "gerund"

    g = h
    for term in (heading, re.sub(r"\s*\([^)]*\)$", "", heading)):
        verb = definition_verb(term, answer)
        if verb:
            if answer.lower().startswith("the ") and not g.lower().startswith("the "):
                g = "the " + g
            return definition_question(g, verb, ref, rng), "definition"

    templates = [
        f"What does {ref} recommend about {g}?",
        f"What does {ref} say about {g}?",
        f"In the context of {topic}, what should developers know about {g}?",
        f"What is the guidance on {g} in {ref}?",
        f"Can you explain {g} as it relates to {topic}?",
        f"What should I keep in mind about {g} when working on {topic}?",
    ]
    if len(words) <= 4 and re.search(r"\b(should|must|never|always)\b", answer) and not re.search(
            r"\b(attacks?|vulnerabilit(y|ies)|injection|overview|examples?|introduction|workflow)\b", low):
        templates.append(f"How should an application handle {g}?")
    return rng.choice(templates), "topic"


# --------------------------------------------------------------------------
# Building the data sets
# --------------------------------------------------------------------------


@dataclass
class Pair:
    key: str         # "<file>#<heading>"
    sheet: str
    prompt: str
    completion: str
    kind: str


def build_text(sheets):
    rows = []
    for sh in sheets:
        seen = collections.Counter()
        for heading, lines in sh.top:
            if is_reference_heading(heading):
                continue
            body = clean_block(lines)
            if len(body) < MIN_TEXT_CHARS:
                continue
            if heading == sh.title:
                text = f"# {sh.title}\n\n{body}"
            else:
                text = f"# {sh.title}\n\n## {plain(heading)}\n\n{body}"
            name = plain(heading)
            seen[name] += 1
            src = f"{sh.filename}#{name}"
            if seen[name] > 1:
                src += f" ({seen[name]})"
            rows.append({"text": text, "source": src})
    return rows


def build_pairs(sheets, casing):
    rng = random.Random(SEED)
    pairs = []
    seen_prompts = set()
    seen_answers = set()
    for sh in sheets:
        for sec in sh.sections:
            heading = clean_heading(sec.heading) if sec.level > 1 else sh.title
            if sec.level > 1 and is_reference_heading(heading):
                continue
            answer = first_answer(sec.lines)
            if not answer or len(answer) < MIN_ANSWER_CHARS:
                continue
            intro = sec.level == 1 or heading.lower() in INTRO_HEADINGS
            if BAD_ANSWER_START.match(answer) and not (
                    intro and re.match(r"^this (cheat ?sheet|article|document|guide)\b", answer, re.I)):
                continue
            if answer.startswith("Definition:"):
                answer = answer[len("Definition:"):].strip()
                answer = answer[0].upper() + answer[1:]
                if not heading_ok(heading):
                    continue
                term = casing.phrase(heading)
                qk = (rng.choice([f"In web security, what is {term}?",
                                  f"What does {term} mean?",
                                  f"Define {term}."]), "definition")
            else:
                qk = make_question(sh, sec, heading, answer, casing, rng)
            if not qk:
                continue
            q, kind = qk
            q = re.sub(r"\s+", " ", q).strip()
            if q.lower() in seen_prompts or answer in seen_answers:
                continue
            seen_prompts.add(q.lower())
            seen_answers.add(answer)
            pairs.append(Pair(key=f"{sh.filename}#{sec.heading}", sheet=sh.filename,
                              prompt=q, completion=answer, kind=kind))
    return pairs


def truncated(answer: str, rng: random.Random) -> str:
    words = answer.split()
    n = max(4, int(len(words) * rng.uniform(0.25, 0.45)))
    cut = " ".join(words[:n]).rstrip(",;:")
    return cut + "..."


def partition(pairs):
    rng = random.Random(SEED + 1)
    order = list(range(len(pairs)))
    rng.shuffle(order)

    # Held-out inference prompts: one per cheat sheet, preferring questions
    # that make a self-contained demo.
    prompts_idx = []
    used_sheets = set()
    kinds = ["definition", "imperative", "question", "intro", "statement",
             "gerund", "mitigation", "definition", "imperative", "intro"]
    k = 0
    while len(prompts_idx) < N_PROMPTS and k < 100 * N_PROMPTS:
        kind = kinds[k % len(kinds)]
        k += 1
        for i in order:
            p = pairs[i]
            if (p.kind == kind and p.sheet not in used_sheets and i not in prompts_idx
                    and len(p.prompt) <= 100):
                prompts_idx.append(i)
                used_sheets.add(p.sheet)
                break
    rest = [i for i in order if i not in set(prompts_idx)]
    chat_idx = rest[:N_CHAT]
    rest = rest[N_CHAT:]
    # DPO and SFT get disjoint sections when there is enough material,
    # otherwise DPO re-uses SFT sections (a common SFT-then-DPO set-up).
    if len(rest) >= N_DPO + MIN_SFT:
        n_dpo = min(N_DPO, len(rest) - MIN_SFT)
        dpo_idx = rest[:n_dpo]
        sft_idx = rest[n_dpo:n_dpo + MAX_SFT]
    else:
        sft_idx = rest[:MAX_SFT]
        dpo_idx = rest[:N_DPO]
    return (sorted(prompts_idx), sorted(chat_idx), sorted(dpo_idx), sorted(sft_idx))


def build_dpo(pairs, idx):
    rng = random.Random(SEED + 2)
    rows = []
    for n, i in enumerate(idx):
        p = pairs[i]
        mode = rng.random()
        if mode < 0.5:
            # wrong topic: a different section of a different cheat sheet
            while True:
                other = pairs[rng.randrange(len(pairs))]
                if other.sheet != p.sheet and other.completion != p.completion:
                    break
            rejected = other.completion
        elif mode < 0.75:
            rejected = rng.choice(VAGUE_ANSWERS)
        else:
            rejected = truncated(p.completion, rng)
        rows.append({"prompt": p.prompt, "chosen": p.completion, "rejected": rejected})
    return rows


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def check_rows(name, rows):
    def walk(v):
        if isinstance(v, str):
            assert v.strip(), f"{name}: empty string"
            v.encode("utf-8")
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            assert v, f"{name}: empty list"
            for x in v:
                walk(x)
    for r in rows:
        walk(r)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True,
                    help="folder with the OWASP cheat sheet Markdown files")
    ap.add_argument("--out", default=here, help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)

    files = sorted(f for f in os.listdir(args.source)
                   if f.endswith("_Cheat_Sheet.md") and f not in SKIP_FILES)
    if not files:
        sys.exit(f"no *_Cheat_Sheet.md files in {args.source}")
    sheets = [parse_sheet(os.path.join(args.source, f)) for f in files]
    casing = Casing(sheets)

    text_rows = build_text(sheets)
    pairs = build_pairs(sheets, casing)
    p_idx, c_idx, d_idx, s_idx = partition(pairs)

    sft_rows = [{"prompt": pairs[i].prompt, "completion": pairs[i].completion} for i in s_idx]
    chat_rows = [{"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": pairs[i].prompt},
        {"role": "assistant", "content": pairs[i].completion},
    ]} for i in c_idx]
    dpo_rows = build_dpo(pairs, d_idx)
    prompt_rows = [{"prompt": pairs[i].prompt} for i in p_idx]

    outputs = {
        "owasp-text.jsonl": text_rows,
        "owasp-sft.jsonl": sft_rows,
        "owasp-chat.jsonl": chat_rows,
        "owasp-dpo.jsonl": dpo_rows,
        "owasp-prompts.jsonl": prompt_rows,
    }
    os.makedirs(args.out, exist_ok=True)
    for name, rows in outputs.items():
        check_rows(name, rows)
        path = os.path.join(args.out, name)
        write_jsonl(path, rows)
        print(f"{name:22s} {len(rows):5d} rows {os.path.getsize(path):>10,d} bytes")
    print(f"{len(sheets)} cheat sheets, {len(pairs)} question/answer candidates")


if __name__ == "__main__":
    main()
