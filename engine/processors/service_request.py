"""The service-request processor (``…EndUserNewSRMailMessageProcessor``).

A new message becomes a request of type ``service request``. Its subject is the mail's
subject. The text between two lines holding only the ``NewSRBodyEnclosingToken`` marker
(``CreateSR`` by default, any case) is the form: ``Field: value`` lines, a value going on
over the following indented lines. The form is named by its ``Form`` field (the
``serviceRequestFormField``), else by the mailbox's ``serviceRequestForm``. The text outside
the markers is the description.

The fields the directory must resolve are resolved as the sender is: ``Requester`` (an
address or a login; without it, the sender, else the fallback user), ``Site`` and
``Category``. Anything the processor cannot make whole (an unknown requester, site or
category, a form that is not closed, a line that is no field, no form) raises a
:class:`BadServiceRequest`: the message becomes a failure event and no request is made.
"""

from __future__ import annotations

import re
from typing import Final

from engine.errors import MessageError
from engine.model import DirectoryView, ParsedMessage, User
from engine.processors import Context, Decision, NewRequest
from engine.processors.common import (
    foreign_numbers,
    kept_attachments,
    with_notes,
)
from engine.processors.incident import before_new_request, requester

MAX_FIELDS: Final = 200
MAX_VALUE: Final = 10_000


class BadServiceRequest(MessageError):
    cause = "bad-service-request"
    hint = (
        "The service request's form could not be read, or names what the directory does not "
        "hold. Fix the sender's form (or import the missing entry), then replay the attached "
        "message with 'mailintegration ingest'."
    )


_FIELD: Final = re.compile(r"^([^\s:][^:]{0,80}?)\s*:\s?(.*)$")


def split_form(body: str, token: str) -> tuple[str | None, str]:
    """(the text between the two marker lines, the text outside them). No marker: (None,
    body). One marker alone is an error: half a form is never taken for a whole one."""
    lines = body.splitlines()
    marks = [i for i, line in enumerate(lines) if line.strip().casefold() == token.casefold()]
    if not marks:
        return None, body.strip()
    if len(marks) < 2:
        raise BadServiceRequest(f"the form has an opening {token} marker but no closing one")
    first, last = marks[0], marks[1]
    outside = "\n".join([*lines[:first], *lines[last + 1 :]]).strip()
    return "\n".join(lines[first + 1 : last]), outside


def read_fields(form: str) -> list[tuple[str, str]]:
    """``Field: value`` lines; an indented line continues the value before it."""
    fields: list[tuple[str, str]] = []
    for number, line in enumerate(form.splitlines(), 1):
        if not line.strip():
            continue
        if line[:1] in (" ", "\t"):
            if not fields:
                raise BadServiceRequest(f"line {number} of the form continues no field")
            name, value = fields[-1]
            fields[-1] = (name, (value + "\n" + line.strip())[:MAX_VALUE])
            continue
        m = _FIELD.match(line)
        if m is None:
            raise BadServiceRequest(
                f"line {number} of the form is not a 'Field: value' line: {line[:80]!r}"
            )
        if len(fields) >= MAX_FIELDS:
            raise BadServiceRequest(f"the form has more than {MAX_FIELDS} fields")
        fields.append((m.group(1).strip(), m.group(2).strip()[:MAX_VALUE]))
    return fields


def _take(fields: list[tuple[str, str]], name: str) -> str | None:
    """The value of field ``name`` (any case), removed from ``fields``."""
    for i, (key, value) in enumerate(fields):
        if key.casefold() == name.casefold():
            del fields[i]
            return value or None
    return None


async def decide(msg: ParsedMessage, ctx: Context, directory: DirectoryView) -> Decision:
    if (early := await before_new_request(msg, ctx, directory)) is not None:
        return early
    settings = ctx.mailbox.processing.service_requests
    form_text, description = split_form(msg.body, settings.token)
    fields = read_fields(form_text) if form_text is not None else []
    form = _take(fields, settings.form_field) or settings.default_form
    if form is None:
        raise BadServiceRequest(
            f"the mail names no form (a {settings.form_field!r} field) and the mailbox has no "
            "serviceRequestForm"
        )
    user = await _requester(msg, ctx, directory, _take(fields, "Requester"))
    site = await _named(directory, "sites", "site", _take(fields, "Site"))
    category = await _named(directory, "categories", "category", _take(fields, "Category"))
    if category is not None:
        fields.append(("Category", category))
    attachments, notes = kept_attachments(msg, ctx)
    return NewRequest(
        type="service request",
        subject=msg.subject or "(no subject)",
        description=with_notes(description, (*msg.notes, *notes)),
        html=None,
        requester=user,
        site=site or user.site or ctx.mailbox.fallback_site,
        group=ctx.mailbox.group or ctx.team.default_group,
        assignee=await directory.user_by_login(ctx.mailbox.assignee)
        if ctx.mailbox.assignee
        else None,
        source=ctx.mailbox.source,
        attachments=attachments,
        notes=notes,
        priority=ctx.mailbox.processing.priority,
        form=form,
        fields=tuple(fields),
        foreign_numbers=foreign_numbers(msg, ctx),
    )


async def _requester(
    msg: ParsedMessage, ctx: Context, directory: DirectoryView, named: str | None
) -> User:
    """The ``Requester`` field as an address or a login; without it, the sender."""
    if named is None:
        return await requester(msg, ctx, directory)
    user = await directory.user_by_email(named) if "@" in named else None
    user = user or await directory.user_by_login(named)
    if user is None:
        raise BadServiceRequest(f"the requester {named[:200]!r} is not a user of the directory")
    return user


async def _named(directory: DirectoryView, table: str, what: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not await directory.has_name(table, value):
        raise BadServiceRequest(f"the {what} {value[:200]!r} is not in the directory")
    return value
