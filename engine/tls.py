"""The one TLS client context of the engine, for every server it connects to: the mailbox
gateways (POP3 today, IMAP next) and the SMTP server that sends replies.

It lives beside them rather than in :mod:`engine.gateways` because the SMTP send
(:mod:`engine.reply`) is imported by the writer, and the writer must not depend on the
gateways. Built in one place, the two cannot drift apart again: they did on a bad ``caFile``
(POP3 said ``TLSError``, SMTP let ``ssl.SSLError`` through as a socket error).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from engine.errors import TLSError


def client_context(ca_file: Path | None, verify: bool) -> ssl.SSLContext:
    """Verified by default (the system's CAs, or only ``ca_file``), TLS 1.2 at least;
    unverified only when configured (``tlsVerify`` false).

    Raises :class:`TLSError` when ``ca_file`` cannot be read as certificates: the config
    loader checks that the file exists, not what it holds, and it may change after loading.
    """
    cafile = str(ca_file) if ca_file else None
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise TLSError(f"cannot load caFile {cafile}: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
