"""Issue 18, lever 3: library parsers against our own, timed and compared in one run.

Message parsers, per message, on both corpus mixes (``--count`` messages each) and on the
real-world-like corpora (tests/corpus and tests/corpus/realworld2):

* ``ours``: :func:`engine.parse.parse_message`, what a parsing worker runs per message;
* ``fast-mail-parser``: ``fast_mail_parser.parse_email`` (Rust, mailparse), which decodes
  every body and attachment as it parses;
* ``stdlib``: the baseline, ``email`` with ``policy.default``, the same fields taken out
  (subject, addresses, Message-ID, References, body text, every attachment's bytes).

HTML to text, on the distinct HTML bodies of the same corpora (the sanitized HTML that
:func:`engine.parse.bodies.render_html` is given): ours against selectolax (lexbor) and
resiliparse.

Every figure is the median of ``--repeat`` passes over the whole corpus, the candidates
alternating within each pass, divided by the number of messages; ratios are against the
stdlib (messages) or ours (HTML) in the same run. Then the correctness A/B: on how many
messages each candidate gives what ours gives on the fields the engine uses, and the classes
where it does not::

    python -m bench.parsers                # 2,000 messages per mix, 5 passes
    python -m bench.parsers --quick        # 50 messages per mix, 1 pass (tests/test_bench.py)

The candidates are not dependencies of the engine: one that is not installed is reported as
such and skipped (``.venv/bin/pip install fast-mail-parser selectolax resiliparse``).
"""

from __future__ import annotations

import argparse
import email
import hashlib
import importlib
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

from bench.corpus import MIXES, make_corpus, stamp
from engine.errors import MessageError
from engine.model import ParsedMessage
from engine.parse import parse_message, safe_filename
from engine.parse.bodies import render_html
from engine.parse.headers import msgid, msgids
from engine.parse.limits import DEFAULT_LIMITS

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "corpus"


@dataclass(frozen=True)
class Fields:
    """What the engine uses of a parsed message, in a form two parsers can be compared on."""

    subject: str
    sender: str
    recipients: tuple[str, ...]
    body: str
    attachment_names: tuple[str, ...]
    attachment_bytes: tuple[str, ...]
    ids: tuple[str | None, tuple[str, ...]]


FIELD_NAMES = (
    "subject",
    "sender",
    "recipients",
    "body",
    "attachment_names",
    "attachment_bytes",
    "ids",
)


@dataclass
class Corpus:
    """Named messages, each with the class its differences are counted under."""

    name: str
    messages: list[tuple[str, bytes]] = field(default_factory=list)


def _optional(module: str) -> Any:
    """A candidate library, or None when it is not installed here."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


# ------------------------------------------------------------------------------ the corpora


def corpora(count: int) -> list[Corpus]:
    """Both mixes (``count`` messages each, each with a Message-ID of its own) and the
    real-world-like corpora of tests/corpus, classed by file name."""
    out: list[Corpus] = []
    for mix in MIXES:
        templates = make_corpus(count, mix=mix)
        out.append(
            Corpus(
                f"{mix} mix",
                [(t.kind, stamp(t, f"p{i}.{mix}@bench.invalid")) for i, t in enumerate(templates)],
            )
        )
    for name, folder in (("realworld", CORPUS), ("realworld2", CORPUS / "realworld2")):
        files = sorted(folder.glob("*.eml"))
        out.append(Corpus(name, [(_class_of(f.stem), f.read_bytes()) for f in files]))
    return out


def _class_of(stem: str) -> str:
    """The class of a corpus file: its name up to the first dash, or up to its number."""
    m = re.match(r"(.+?)-\d+(?:-|$)", stem)
    if m is not None:
        return m.group(1)
    return stem.split("-", 1)[0]


# ------------------------------------------------------------------------------ the parsers

_MARK_RE = re.compile(r"\[attachment: [^\]\n]*\]")


def _words(text: str) -> str:
    """Text compared on its words: parsers differ in line ends and blank lines."""
    return " ".join(text.split())


_UNNAMED_RE = re.compile(r"attachment(?:-\d+)?(?:\.\w+)?")


def _names(names: Iterable[str]) -> tuple[str, ...]:
    """Attachment names as compared: the names parsers make up for unnamed files differ
    ("attachment", ours "attachment-2.txt"), and are all one here."""
    return tuple(sorted("(unnamed)" if _UNNAMED_RE.fullmatch(n) else n for n in names))


def _digests(blobs: Iterable[bytes]) -> tuple[str, ...]:
    return tuple(sorted(hashlib.sha256(b).hexdigest()[:16] for b in blobs))


def ours(raw: bytes) -> Fields:
    """Our parse, seen as :class:`Fields` (the markers of attachments left out of the body:
    they are ours alone)."""
    p: ParsedMessage = parse_message(raw)
    return Fields(
        subject=_words(p.subject),
        sender=p.from_addr.lower(),
        recipients=tuple(a.lower() for a in (*p.to, *p.cc)),
        body=_words(_MARK_RE.sub(" ", p.body)),
        attachment_names=_names(a.name for a in p.attachments),
        attachment_bytes=_digests(a.data for a in p.attachments),
        ids=(p.message_id, p.references),
    )


def _body_from(plain: list[str], html: list[str]) -> str:
    """The body the engine would make of a candidate's text parts: the plain parts, or the
    HTML through our converter when there is no plain text (as ours does)."""
    text = "\n".join(plain)
    if not text.strip() and html:
        from engine.parse.bodies import sanitize_html

        text = render_html(sanitize_html("\n".join(html)), DEFAULT_LIMITS)
    return _words(text)


def _first(headers: dict[str, list[str]], name: str) -> str | None:
    for key, values in headers.items():
        if key.lower() == name and values:
            return values[0]
    return None


def fast_mail(module: Any) -> Callable[[bytes], Fields]:
    """fast-mail-parser's parse, seen as :class:`Fields`."""

    def parse(raw: bytes) -> Fields:
        m = module.parse_email(raw)
        atts = list(m.attachments)
        return Fields(
            subject=_words(m.subject or ""),
            sender=(m.from_.address.lower() if m.from_ else ""),
            recipients=tuple(a.address.lower() for a in (*m.to, *m.cc)),
            body=_body_from(list(m.text_plain), list(m.text_html)),
            attachment_names=_names(safe_filename(a.filename, "attachment") for a in atts),
            attachment_bytes=_digests(bytes(a.content) for a in atts),
            ids=(
                msgid(_first(m.headers, "message-id")),
                msgids(_first(m.headers, "references")),
            ),
        )

    return parse


def _stdlib_body(msg: EmailMessage, render: bool) -> str:
    part = msg.get_body(("plain", "html"))
    if part is None:
        return ""
    text = str(part.get_content())
    if render and part.get_content_subtype() == "html":
        return _body_from([], [text])
    return _words(text)


def stdlib(raw: bytes, render: bool = True) -> Fields:
    """The standard library's parse (``policy.default``), seen as :class:`Fields`; timed
    without ``render`` (HTML through our converter, for the comparison only)."""
    msg = email.message_from_bytes(raw, policy=default_policy)
    assert isinstance(msg, EmailMessage)
    atts = list(msg.iter_attachments())

    def addresses(name: str) -> list[str]:
        header = msg.get(name)
        groups = getattr(header, "addresses", ())
        return [a.addr_spec.lower() for a in groups]

    def payload(part: Any) -> bytes:
        data = part.get_payload(decode=True)
        return data if isinstance(data, bytes) else str(part).encode("utf-8", "replace")

    sender = addresses("from")
    return Fields(
        subject=_words(str(msg.get("subject", ""))),
        sender=sender[0] if sender else "",
        recipients=tuple(addresses("to") + addresses("cc")),
        body=_stdlib_body(msg, render),
        attachment_names=_names(safe_filename(a.get_filename(), "attachment") for a in atts),
        attachment_bytes=_digests(payload(a) for a in atts),
        ids=(msgid(msg.get("message-id")), msgids(msg.get("references"))),
    )


def message_parsers() -> dict[str, Callable[[bytes], Fields] | None]:
    """The baseline first, then ours and the candidates (None: not installed)."""
    fmp = _optional("fast_mail_parser")
    return {
        "stdlib email": stdlib,
        "ours (parse_message)": ours,
        "fast-mail-parser": fast_mail(fmp) if fmp is not None else None,
    }


# What is timed of each message parser: the parse alone, as the engine would call it.
def timed_message_parsers() -> dict[str, Callable[[bytes], object] | None]:
    """The parse calls themselves, without the comparison's extra work."""
    fmp = _optional("fast_mail_parser")

    return {
        "stdlib email": _or_error(lambda raw: stdlib(raw, render=False)),
        "ours (parse_message)": _ours_or_error,
        "fast-mail-parser": _or_error(fmp.parse_email) if fmp is not None else None,
    }


def _ours_or_error(raw: bytes) -> object:
    try:
        return parse_message(raw)
    except MessageError as exc:
        return exc


def _or_error(parse: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def call(raw: bytes) -> object:
        try:
            return parse(raw)
        except Exception as exc:  # a candidate's refusal counts as a parse, as ours does
            return exc

    return call


def html_converters() -> dict[str, Callable[[str], str] | None]:
    """Ours (the baseline for HTML) and the candidates (None: not installed)."""
    lexbor = _optional("selectolax.lexbor")
    resili_text = _optional("resiliparse.extract.html2text")
    resili_html = _optional("resiliparse.parse.html")

    def ours_html(markup: str) -> str:
        return render_html(markup, DEFAULT_LIMITS)

    def selectolax(markup: str) -> str:
        return str(lexbor.LexborHTMLParser(markup).text(separator="\n"))

    def resiliparse(markup: str) -> str:
        tree = resili_html.HTMLTree.parse(markup)
        return str(resili_text.extract_plain_text(tree, links=True, list_bullets=True))

    return {
        "ours (render_html)": ours_html,
        "selectolax (lexbor)": selectolax if lexbor is not None else None,
        "resiliparse": resiliparse if resili_text is not None else None,
    }


# ------------------------------------------------------------------------------ timing


def per_item_medians(
    funcs: Mapping[str, Callable[[Any], object] | None], items: list[Any], repeat: int
) -> dict[str, float]:
    """Seconds per item of each function: the median of ``repeat`` passes over ``items``,
    the functions alternating within each pass so that load moves them all alike."""
    live = {name: f for name, f in funcs.items() if f is not None}
    times: dict[str, list[float]] = {name: [] for name in live}
    for f in live.values():  # warm up: first imports, caches
        for item in items[:5]:
            f(item)
    for k in range(repeat):
        order = list(live.items())
        if k % 2:
            order.reverse()
        for name, f in order:
            start = time.perf_counter()
            for item in items:
                f(item)
            times[name].append((time.perf_counter() - start) / max(1, len(items)))
    return {name: statistics.median(values) for name, values in times.items()}


# ------------------------------------------------------------------------------ correctness


@dataclass
class Agreement:
    """How a candidate's fields compare with ours over a corpus."""

    same: int = 0
    failed: int = 0  # the candidate raised where ours gave a message
    both_failed: int = 0
    ours_failed: int = 0
    fields: Counter[str] = field(default_factory=Counter)
    classes: Counter[str] = field(default_factory=Counter)


def _fields_or_none(parse: Callable[[bytes], Fields], raw: bytes) -> Fields | None:
    try:
        return parse(raw)
    except Exception:  # ours raises MessageError; a candidate anything
        return None


def agreement(parse: Callable[[bytes], Fields], corpus: Corpus) -> Agreement:
    """Message by message, ``parse`` against ours."""
    out = Agreement()
    for cls, raw in corpus.messages:
        mine = _fields_or_none(ours, raw)
        theirs = _fields_or_none(parse, raw)
        if mine is None or theirs is None:
            if mine is None and theirs is None:
                out.both_failed += 1
            elif mine is None:
                out.ours_failed += 1
                out.classes[cls] += 1
            else:
                out.failed += 1
                out.classes[cls] += 1
            continue
        differ = [n for n in FIELD_NAMES if getattr(mine, n) != getattr(theirs, n)]
        if not differ:
            out.same += 1
            continue
        out.fields.update(differ)
        out.classes[cls] += 1
    return out


def html_bodies(corpus: Corpus) -> list[str]:
    """The distinct sanitized HTML bodies of a corpus (what render_html is given)."""
    seen: dict[str, None] = {}
    for _, raw in corpus.messages:
        try:
            html = parse_message(raw).html
        except MessageError:
            continue
        if html:
            seen.setdefault(html)
    return list(seen)


# ------------------------------------------------------------------------------ the report


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}" if base else "-"


def timing_table(results: dict[str, dict[str, float]], baseline: str, unit: str) -> list[str]:
    """Rows ``| parser | corpus medians (ratio) ... |``."""
    names = list(results)
    parsers = list(dict.fromkeys(p for r in results.values() for p in r))
    lines = [
        f"| {unit} | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for p in parsers:
        cells = []
        for corpus in names:
            r = results[corpus]
            if p not in r:
                cells.append("n/a")
                continue
            cells.append(f"{r[p] * 1e6:,.0f} µs ({_ratio(r[p], r.get(baseline))})")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return lines


def agreement_lines(name: str, corpus: Corpus, a: Agreement) -> str:
    total = len(corpus.messages)
    fields = ", ".join(f"{k} {v}" for k, v in a.fields.most_common()) or "none"
    classes = ", ".join(f"{k} {v}" for k, v in a.classes.most_common(8)) or "none"
    return (
        f"| {name} | {corpus.name} | {a.same}/{total} | {a.failed} | {a.ours_failed} | "
        f"{a.both_failed} | {fields} | {classes} |"
    )


# What converters do each their own way: list bullets and numbers, and where a link's URL goes.
_LAYOUT_RE = re.compile(
    r"^[ \t]*(?:\*|•|\d+\.)[ \t]|\]\([^)\s]*\)|\((?:https?:|mailto:)?[^)\s]*\)|[\[\]]", re.M
)


def html_agreement(
    convert: Callable[[str], str], bodies: list[str]
) -> tuple[int, int, int, Counter[str]]:
    """(same text, same words, raised) of a converter against ours; why the rest differ."""
    exact = words = raised = 0
    why: Counter[str] = Counter()
    for markup in bodies:
        mine = render_html(markup, DEFAULT_LIMITS)
        try:
            theirs = convert(markup)
        except Exception:
            raised += 1
            continue
        exact += mine == theirs
        same = _words(mine) == _words(theirs)
        words += same
        if same:
            continue
        if _words(_LAYOUT_RE.sub(" ", mine)) == _words(_LAYOUT_RE.sub(" ", theirs)):
            why["bullets, numbers or link URLs only"] += 1
        elif "[image: " in mine:
            why["inline images (ours: [image: …])"] += 1
        else:
            why["other text"] += 1
    return exact, words, raised, why


def run(count: int, repeat: int) -> list[str]:
    """Every measure, as the lines of a Markdown report."""
    all_corpora = corpora(count)
    timed = timed_message_parsers()
    msg_times = {
        c.name: per_item_medians(timed, [raw for _, raw in c.messages], repeat) for c in all_corpora
    }
    lines = [f"Message parsers, per message (median of {repeat} passes; ratio to stdlib):", ""]
    lines += timing_table(msg_times, "stdlib email", "parser")
    missing = [n for n, f in timed.items() if f is None]
    lines += ["", *(f"- {n}: not installed, skipped" for n in missing)]

    lines += ["", "Agreement with ours on the fields the engine uses:", ""]
    lines += [
        "| parser | corpus | same | it raised | ours raised | both raised | fields differing "
        "| classes differing |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, parse in message_parsers().items():
        if parse is None or name.startswith("ours"):
            continue
        lines += [agreement_lines(name, c, agreement(parse, c)) for c in all_corpora]

    bodies = {c.name: html_bodies(c) for c in all_corpora}
    converters = html_converters()
    html_times = {
        f"{name} ({len(b)} HTML)": per_item_medians(converters, b, repeat)
        for name, b in bodies.items()
        if b
    }
    lines += ["", f"HTML to text, per document (median of {repeat} passes; ratio to ours):", ""]
    lines += timing_table(html_times, "ours (render_html)", "converter")
    lines += [f"- {n}: not installed, skipped" for n, f in converters.items() if f is None]
    lines += ["", "HTML agreement with ours (same text / same words / raised):", ""]
    every = [b for group in bodies.values() for b in group]
    for name, convert in converters.items():
        if convert is None or name.startswith("ours"):
            continue
        exact, words, raised, why = html_agreement(convert, every)
        reasons = ", ".join(f"{k} {v}" for k, v in why.most_common())
        lines.append(
            f"- {name}: {exact}/{len(every)} same text, {words} same words, {raised} raised"
            f" ({reasons or 'no difference'})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=2000, help="messages per corpus mix")
    parser.add_argument("--repeat", type=int, default=5, help="passes over each corpus")
    parser.add_argument("--quick", action="store_true", help="50 messages per mix, 1 pass")
    args = parser.parse_args(argv)
    count, repeat = (50, 1) if args.quick else (args.count, args.repeat)
    print("\n".join(run(count, repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
