"""Turn the raw bytes of one message into a :class:`~engine.model.ParsedMessage`.

Everything here is a pure function of its arguments: no I/O, no global state changed, safe to
call from several worker threads at once. :func:`parse_message` raises only
:class:`~engine.errors.LimitExceeded` or :class:`~engine.errors.ParseError`, whatever the bytes.

A parse in order, one module per concern (each holds the design notes of its concern, so
that nobody "simplifies" them away):

* :mod:`~engine.parse.limits`: what a message may cost; over most limits it is refused whole.
* :mod:`~engine.parse.mime`: the pre-scan checks the limits on the raw bytes, large bodies are
  elided, and the compat32 MIME tree is built.
* :mod:`~engine.parse.headers` (encoded words, parameters, Message-IDs, dates),
  :mod:`~engine.parse.addresses` and :mod:`~engine.parse.charsets` read the header fields.
* :mod:`~engine.parse.parts` walks the tree: what becomes the body, the HTML, an attachment,
  with :mod:`~engine.parse.bodies` (payloads, text parts, HTML to text),
  :mod:`~engine.parse.transfer` (base64, uuencode) and :mod:`~engine.parse.attachments`
  (file names, attached messages, TNEF).
* :mod:`~engine.parse.verdicts`: auto-reply, bounce and loop verdicts.

Three rules hold throughout:

* Nothing is handed over on the side: what one step needs of another (the raw bytes behind an
  elided body) travels in the :class:`~engine.parse.mime.MimeTree` that the parse call owns,
  passed as an argument; no context variable or global holds it.
* Memory stays within a few times the message (3.3 at most for 20 MB of any shape we know):
  large bodies are taken from the raw bytes instead of the parser's lines, and no step keeps
  a list of a million short strings.
* Fast paths stand in for slow or memory-hungry library code and must give exactly its
  results; each accepts only the input shapes it is known to handle and leaves the rest to
  the library, sits beside what it replaces, in the same module, and has a property test
  holding the two equal (tests/parse/).
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

from engine.errors import LimitExceeded, MessageError, ParseError
from engine.model import Attachment, ParsedMessage
from engine.parse import fingerprint
from engine.parse.addresses import read_addresses
from engine.parse.attachments import safe_filename
from engine.parse.headers import (
    decode_words,
    first_field,
    header_map,
    msgid,
    msgids,
    one_line,
    parse_date,
    received_at,
    unfold,
)
from engine.parse.limits import DEFAULT_LIMITS, ParseLimits
from engine.parse.mime import MimeTree, header_end, mend_header_block, read_mime
from engine.parse.parts import Collector
from engine.parse.verdicts import NO_BOUNCE, bounce_details, loop_verdict

__all__ = [
    "ParseLimits",
    "header_text",
    "message_summary",
    "parse_many",
    "parse_message",
    "parse_raw",
    "safe_filename",
    "with_raw",
]


def _sanitize_exc(exc: BaseException) -> str:
    """One safe line describing an exception, for a ParseError message."""
    text = f"{type(exc).__name__}: {exc}".encode("utf-8", "backslashreplace").decode("utf-8")
    return one_line(text)[:200]


def message_summary(raw: bytes) -> tuple[str | None, str]:
    """(Message-ID without brackets, sha256 hex) of raw bytes, cheaply and never failing.

    Used for the ledger when a message cannot be parsed: only the top-level header block is
    scanned (bounded to the default header limit), with the same id extraction as
    :func:`parse_message`, so both agree on the id of the same bytes.
    """
    data = bytes(raw) if isinstance(raw, bytearray | memoryview) else raw
    if not isinstance(data, bytes):
        return None, hashlib.sha256(b"").hexdigest()
    digest = hashlib.sha256(data).hexdigest()
    try:
        limit = DEFAULT_LIMITS.max_header_bytes
        end = header_end(data, limit)
        block = data[: end if end is not None else limit]
        m = _MESSAGE_ID_FIELD_RE.search(block)
        if m is None:
            return None, digest
        return msgid(unfold(m.group(1).decode("ascii", "surrogateescape"))), digest
    except Exception:  # a summary must never fail: no id is an acceptable answer
        return None, digest


_MESSAGE_ID_FIELD_RE: Final = re.compile(
    rb"^message-id[ \t]*:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)", re.M | re.I
)


def parse_message(raw: object, limits: ParseLimits = DEFAULT_LIMITS) -> ParsedMessage:
    """Parse one raw RFC 5322 message: bytes, or a bytearray or memoryview of them.

    ``raw`` is typed ``object`` because anything else is refused here, with a ParseError:
    compiled (:mod:`engine.native`), a narrower annotation would make it a TypeError.

    Raises :class:`LimitExceeded` (naming the limit, the value and the limit) when the message
    is over one of ``limits``, and :class:`ParseError` when it cannot be read; never anything
    else, whatever the bytes.
    """
    if isinstance(raw, bytearray | memoryview):
        raw = bytes(raw)
    if not isinstance(raw, bytes):
        raise ParseError(f"a message must be bytes, not {type(raw).__name__}")
    try:
        return _parse(raw, limits)
    except MessageError:
        raise
    except RecursionError as exc:
        raise LimitExceeded(
            f"the message is nested too deeply for the parser; the limit (max_depth) is "
            f"{limits.max_depth}"
        ) from exc
    except MemoryError as exc:
        raise LimitExceeded(
            f"the message ({len(raw)} bytes) needs more memory than is available"
        ) from exc
    except Exception as exc:
        raise ParseError(f"the message cannot be parsed: {_sanitize_exc(exc)}") from exc


def _parse(raw: bytes, limits: ParseLimits) -> ParsedMessage:
    if len(raw) > limits.max_bytes:
        raise LimitExceeded(
            f"the message is {len(raw)} bytes; the limit (max_bytes) is {limits.max_bytes}"
        )
    if not raw.strip():
        raise ParseError(f"the message is empty ({len(raw)} bytes, no header and no text)")
    tree = read_mime(raw, limits)
    # Mending is tried only when a field that most mail has is missing: it costs a scan of
    # the header block and a second parse.
    complete = "from" in tree.root and "subject" in tree.root
    mended = None if complete else mend_header_block(raw, limits.max_header_bytes)
    if mended is None:
        return _parse_tree(tree, limits)
    del tree
    source, count = mended
    note = (
        f"{count} header line(s) of this message were not header fields (a field continued "
        "without indentation); they were read as part of the field before them."
    )
    return _parse_tree(read_mime(source, limits), limits, original=raw, notes=[note])


# The header fields of which one at least makes a file a mail message (RFC 5322, RFC 2045).
_MAIL_FIELDS: Final = frozenset(
    {
        "from",
        "sender",
        "reply-to",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "received",
        "return-path",
        "delivered-to",
        "mime-version",
        "content-type",
    }
)


def _parse_tree(
    tree: MimeTree,
    limits: ParseLimits,
    original: bytes | None = None,
    notes: list[str] | None = None,
) -> ParsedMessage:
    """The message of ``tree``: its header fields read, its parts walked, its verdict made.

    ``original`` is the message as received when ``tree`` was read from a mended copy
    (see :func:`~engine.parse.mime.mend_header_block`)."""
    raw = tree.raw if original is None else original
    headers = header_map(tree.root)
    if _MAIL_FIELDS.isdisjoint(headers):
        raise ParseError(
            "this is not an e-mail message: it does not start with header fields "
            "(no From, To, Subject, Date, Message-ID, Received or MIME field)"
        )
    notes = list(notes or [])
    from_pairs = read_addresses(headers.get("from"), limits, "From", notes)
    to_pairs = read_addresses(headers.get("to"), limits, "To", notes)
    cc_pairs = read_addresses(headers.get("cc"), limits, "Cc", notes)
    rp_pairs = read_addresses(headers.get("return-path"), limits, "Return-Path", notes)
    from_name, from_addr = from_pairs[0] if from_pairs else ("", "")

    collector = Collector(tree, limits)
    collector.walk(tree.root)
    body, html = collector.body_and_html()
    notes += collector.notes
    senders = [from_addr, *(addr for _, addr in rp_pairs or [])]
    evidence = collector.evidence()
    verdict = loop_verdict(headers, collector.bounce, senders, body, evidence)
    bounce = bounce_details(headers, body, evidence, senders) if verdict.is_bounce else NO_BOUNCE

    subject = one_line(decode_words(first_field(headers, "subject") or ""))
    return ParsedMessage(
        raw=raw,
        sha256=hashlib.sha256(raw).hexdigest(),
        message_id=msgid(first_field(headers, "message-id")),
        subject=subject,
        from_name=from_name,
        from_addr=from_addr,
        to=tuple(addr for _, addr in to_pairs or []),
        date=parse_date(first_field(headers, "date")),
        in_reply_to=msgid(first_field(headers, "in-reply-to")),
        references=msgids(first_field(headers, "references")),
        body=body,
        html=html,
        attachments=with_digests(collector.attachments.items),
        auto_submitted=verdict.auto_submitted,
        auto_reason=verdict.reason,
        is_bounce=verdict.is_bounce,
        notes=tuple(notes),
        cc=tuple(addr for _, addr in cc_pairs or []),
        headers=kept_headers(headers),
        bounce_status=bounce.status,
        bounce_recipients=bounce.recipients,
        bounce_message_id=bounce.message_id,
        fingerprint=fingerprint.fingerprint(subject, body),
        received_at=received_at(raw),
    )


def with_digests(items: list[Attachment]) -> tuple[Attachment, ...]:
    """The attachments, each with its sha256 (:attr:`Attachment.sha256`) set: hashed here,
    in the parse stage beside the writer, rather than by the writer's event loop (which
    hashed every attachment under 1 MiB itself before storing it)."""
    for att in items:
        # Set once on a new object, before anyone else sees it; init=False keeps it out of
        # dataclasses.replace(), so that a copy with other data never carries it.
        object.__setattr__(att, "sha256", hashlib.sha256(att.data).hexdigest())
    return tuple(items)


MAX_KEPT_HEADERS: Final = 200
"""How many top-level header fields a ParsedMessage keeps (the first ones), each cut to
:data:`MAX_KEPT_HEADER_CHARS`: rules read them, and a message with 10,000 fields must not
cost 10,000 copies."""
MAX_KEPT_HEADER_CHARS: Final = 8_000

# One object per common field name, shared by every message: pickle writes a name once per
# window of a parsing process (then a memo reference) rather than once per message, and the
# event loop unpickles it once (3 % of the instructions of unpickling a realistic window;
# the messages waiting for the writer share the names too). A fixed table rather than
# sys.intern: the names are the sender's, and none of them may grow a process-wide table.
_COMMON_NAMES: Final = {
    name: name
    for name in (  # noqa: SIM905 (a list of words reads better than 70 lines)
        "arc-authentication-results arc-message-signature arc-seal authentication-results "
        "auto-submitted bcc cc content-class content-disposition content-id content-language "
        "content-transfer-encoding content-type date delivered-to disposition-notification-to "
        "dkim-signature errors-to from importance in-reply-to list-help list-id list-post "
        "list-subscribe list-unsubscribe list-unsubscribe-post message-id mime-version "
        "organization precedence priority received received-spf references reply-to "
        "resent-date resent-from resent-message-id resent-to return-path sender subject "
        "thread-index thread-topic to user-agent x-auto-response-suppress x-autoreply "
        "x-autorespond x-failed-recipients x-forwarded-for x-forwarded-to "
        "x-google-dkim-signature x-gm-message-state x-google-smtp-source x-mailer x-mimeole "
        "x-ms-exchange-organization-authas x-ms-has-attach x-ms-tnef-correlator "
        "x-msmail-priority x-originating-ip x-original-to x-priority x-received x-spam-flag "
        "x-spam-score x-spam-status x-virus-scanned"
    ).split()
}


def kept_headers(headers: dict[str, list[str]]) -> tuple[tuple[str, str], ...]:
    """The header fields a ParsedMessage keeps, as received (bounded): decoding them all
    cost a sixth of the parse of a small message, and only rules read them (through
    :func:`header_text`)."""
    out: list[tuple[str, str]] = []
    for name, values in headers.items():
        name = _COMMON_NAMES.get(name, name)
        for value in values:
            if len(out) >= MAX_KEPT_HEADERS:
                return tuple(out)
            out.append((name, value[:MAX_KEPT_HEADER_CHARS]))
    return tuple(out)


def header_text(value: str) -> str:
    """A kept header value as text: unfolded, encoded words decoded, one line."""
    return one_line(decode_words(unfold(value)))


def parse_raw(raw: bytes, max_bytes: int) -> ParsedMessage | MessageError:
    """``parse_message`` with the size limit checked first; a refusal is returned, not raised
    (it crosses a process boundary as a value)."""
    try:
        if len(raw) > max_bytes:
            raise LimitExceeded(
                f"the message is {len(raw)} bytes, over maxMessageBytes ({max_bytes})"
            )
        return parse_message(raw, ParseLimits(max_bytes=max_bytes))
    except MessageError as exc:
        return exc


def parse_many(raws: list[bytes], max_bytes: int) -> list[ParsedMessage | MessageError]:
    """A window of messages in one call: what a parsing worker process runs.

    The results come back without ``raw``: the caller has it already, and sending it back
    through the pipe doubled what crossed it (see :func:`with_raw`)."""
    out: list[ParsedMessage | MessageError] = []
    for raw in raws:
        result = parse_raw(raw, max_bytes)
        out.append(_copy_with_raw(result, b"") if isinstance(result, ParsedMessage) else result)
    return out


def with_raw(result: ParsedMessage | MessageError, raw: bytes) -> ParsedMessage | MessageError:
    """A result of :func:`parse_many` with its message's bytes put back."""
    return _copy_with_raw(result, raw) if isinstance(result, ParsedMessage) else result


def _copy_with_raw(msg: ParsedMessage, raw: bytes) -> ParsedMessage:
    """``dataclasses.replace(msg, raw=raw)``, 8 times cheaper: a copy of the instance's
    fields with ``raw`` swapped, without the generated ``__init__`` (one frozen
    ``object.__setattr__`` per field) or the walk over ``fields()``. It ran twice per
    message: in the parsing process to drop ``raw`` and on the event loop, the engine's
    serial stage, to put it back (py-spy: 9 us of the loop's ~25 us per message received).

    Equal to ``replace`` because ParsedMessage has no ``__post_init__`` and no
    ``init=False`` field (tests/test_parse_stage.py holds both, and the two equal)."""
    copy = object.__new__(ParsedMessage)
    fields = copy.__dict__
    fields.update(msg.__dict__)
    fields["raw"] = raw
    return copy
