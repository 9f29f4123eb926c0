"""Numbered migrations of the SQLite store. A migration is never edited once released:
add a new one. ``PRAGMA user_version`` records how far a database has come."""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: directory, requests, ledger.
    """
    CREATE TABLE groups (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE COLLATE NOCASE
    );
    CREATE TABLE sites (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE COLLATE NOCASE
    );
    CREATE TABLE sources (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE COLLATE NOCASE
    );
    CREATE TABLE teams (
        id INTEGER PRIMARY KEY,
        number INTEGER NOT NULL UNIQUE,
        name TEXT NOT NULL UNIQUE COLLATE NOCASE,
        default_group_id INTEGER REFERENCES groups(id)
    );
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        login TEXT NOT NULL UNIQUE COLLATE NOCASE,
        email TEXT COLLATE NOCASE,
        name TEXT NOT NULL,
        site_id INTEGER REFERENCES sites(id),
        password_hash TEXT
    );
    CREATE INDEX users_email ON users(email);
    CREATE TABLE requests (
        number INTEGER PRIMARY KEY AUTOINCREMENT,
        team_id INTEGER NOT NULL REFERENCES teams(id),
        type TEXT NOT NULL CHECK (type IN ('incident', 'event')),
        status TEXT NOT NULL,
        kind TEXT NOT NULL DEFAULT 'mail'
            CHECK (kind IN ('mail', 'message-failure', 'outage')),
        subject TEXT NOT NULL,
        description TEXT NOT NULL,
        html TEXT,
        requester_id INTEGER REFERENCES users(id),
        user_id INTEGER REFERENCES users(id),
        site_id INTEGER REFERENCES sites(id),
        group_id INTEGER REFERENCES groups(id),
        assignee_id INTEGER REFERENCES users(id),
        source_id INTEGER REFERENCES sources(id),
        mailbox TEXT,
        cause TEXT,
        message_id TEXT,
        sha256 TEXT,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL
    );
    CREATE INDEX requests_failure ON requests(kind, message_id, sha256);
    CREATE INDEX requests_outage ON requests(kind, mailbox, cause, status);
    CREATE TABLE activities (
        id INTEGER PRIMARY KEY,
        request_number INTEGER NOT NULL REFERENCES requests(number),
        author TEXT NOT NULL,
        email TEXT NOT NULL,
        date TEXT NOT NULL,
        body TEXT NOT NULL,
        automatic INTEGER NOT NULL DEFAULT 0,
        message_id TEXT,
        created_at TEXT NOT NULL
    );
    CREATE INDEX activities_request ON activities(request_number);
    CREATE TABLE attachments (
        id INTEGER PRIMARY KEY,
        request_number INTEGER NOT NULL REFERENCES requests(number),
        activity_id INTEGER REFERENCES activities(id),
        name TEXT NOT NULL,
        content_type TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL
    );
    CREATE INDEX attachments_request ON attachments(request_number);
    CREATE INDEX attachments_sha ON attachments(sha256);
    CREATE TABLE history (
        id INTEGER PRIMARY KEY,
        request_number INTEGER NOT NULL REFERENCES requests(number),
        at TEXT NOT NULL,
        by TEXT NOT NULL,
        text TEXT NOT NULL
    );
    CREATE TABLE ledger (
        id INTEGER PRIMARY KEY,
        account TEXT NOT NULL,
        uidl TEXT NOT NULL,
        mailbox TEXT NOT NULL,
        message_id TEXT,
        sha256 TEXT NOT NULL,
        outcome TEXT NOT NULL,
        request_number INTEGER REFERENCES requests(number),
        processed_at TEXT NOT NULL,
        UNIQUE (account, uidl)
    );
    CREATE INDEX ledger_message ON ledger(message_id);
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        mailbox TEXT NOT NULL,
        request_number INTEGER REFERENCES requests(number),
        recipient TEXT NOT NULL COLLATE NOCASE,
        message_id TEXT NOT NULL,
        message BLOB NOT NULL,
        created_at TEXT NOT NULL,
        sent_at TEXT,
        error TEXT
    );
    CREATE INDEX outbox_pending ON outbox(sent_at);
    CREATE INDEX outbox_recipient ON outbox(recipient, created_at);
    """,
    # 2: per-mailbox run status for `status` and /healthz after a restart.
    """
    CREATE TABLE mailbox_status (
        mailbox TEXT PRIMARY KEY,
        last_success TEXT,
        last_error TEXT,
        last_error_at TEXT,
        fetched INTEGER NOT NULL DEFAULT 0,
        processed INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0
    );
    """,
    # 3: what a known UIDL is checked against before it is deleted again (the LIST size),
    # messages left on the server (``needed``: the bytes one needs to be taken whole), the
    # server's acknowledged deletions (``deleted_at``), and the account each mailbox used.
    # Accounts are rewritten to the form without port (see ACCOUNTS below).
    """
    ALTER TABLE ledger ADD COLUMN size INTEGER;
    ALTER TABLE ledger ADD COLUMN needed INTEGER;
    ALTER TABLE ledger ADD COLUMN deleted_at TEXT;
    ALTER TABLE mailbox_status ADD COLUMN kept_deleted INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE mailbox_account (
        mailbox TEXT PRIMARY KEY,
        account TEXT NOT NULL,
        user_name TEXT NOT NULL
    );
    """,
    # 4: the outbox as a queue: sends are retried with a backoff until sent or failed for
    # good, and replies are counted per normalized address, per domain and per mailbox
    # (one indexed query each). Rows an older engine left failed keep that verdict.
    """
    ALTER TABLE outbox ADD COLUMN rcpt_key TEXT;
    ALTER TABLE outbox ADD COLUMN rcpt_domain TEXT;
    ALTER TABLE outbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE outbox ADD COLUMN next_attempt_at TEXT;
    ALTER TABLE outbox ADD COLUMN failed_at TEXT;
    UPDATE outbox SET rcpt_key = lower(recipient),
        rcpt_domain = lower(substr(recipient, instr(recipient, '@') + 1)),
        next_attempt_at = created_at;
    UPDATE outbox SET failed_at = created_at WHERE sent_at IS NULL AND error IS NOT NULL;
    CREATE INDEX outbox_key ON outbox(rcpt_key, created_at);
    CREATE INDEX outbox_domain ON outbox(rcpt_domain, created_at);
    CREATE INDEX outbox_mailbox ON outbox(mailbox, created_at);
    CREATE INDEX outbox_due ON outbox(mailbox, next_attempt_at)
        WHERE sent_at IS NULL AND failed_at IS NULL;
    """,
    # 5: IMAP. A folder whose UIDVALIDITY changed gives its messages new keys; the ledger
    # then finds them by content hash within the account (engine.writer, Writer.plan).
    # IF NOT EXISTS: a database made while 5 was a reserved no-op gets nothing here (the
    # index only speeds that look-up up, which works without it).
    """
    CREATE INDEX IF NOT EXISTS ledger_sha256 ON ledger(account, sha256);
    """,
    # 6: correlation, service requests (categories), priority, routing rules, foreign
    # ticket numbers.
    # The requests table is rebuilt (SQLite cannot change a CHECK): type 'service request';
    # an event's correlation key and alert state; the priority; the SR's form; when it was
    # last closed (the flapping window). AUTOINCREMENT's counter is carried over, so no
    # number is ever given twice. Runs with foreign keys off (see REBUILDS).
    """
    CREATE TABLE priorities (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE COLLATE NOCASE
    );
    CREATE TABLE categories (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE COLLATE NOCASE
    );
    CREATE TABLE requests_new (
        number INTEGER PRIMARY KEY AUTOINCREMENT,
        team_id INTEGER NOT NULL REFERENCES teams(id),
        type TEXT NOT NULL CHECK (type IN ('incident', 'event', 'service request')),
        status TEXT NOT NULL,
        kind TEXT NOT NULL DEFAULT 'mail'
            CHECK (kind IN ('mail', 'message-failure', 'outage')),
        subject TEXT NOT NULL,
        description TEXT NOT NULL,
        html TEXT,
        requester_id INTEGER REFERENCES users(id),
        user_id INTEGER REFERENCES users(id),
        site_id INTEGER REFERENCES sites(id),
        group_id INTEGER REFERENCES groups(id),
        assignee_id INTEGER REFERENCES users(id),
        source_id INTEGER REFERENCES sources(id),
        mailbox TEXT,
        cause TEXT,
        message_id TEXT,
        sha256 TEXT,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        priority_id INTEGER REFERENCES priorities(id),
        correlation_key TEXT,
        alert_state TEXT,
        form TEXT,
        closed_at TEXT
    );
    INSERT INTO requests_new(number, team_id, type, status, kind, subject, description, html,
        requester_id, user_id, site_id, group_id, assignee_id, source_id, mailbox, cause,
        message_id, sha256, created_at, created_by)
    SELECT number, team_id, type, status, kind, subject, description, html,
        requester_id, user_id, site_id, group_id, assignee_id, source_id, mailbox, cause,
        message_id, sha256, created_at, created_by FROM requests;
    DELETE FROM sqlite_sequence WHERE name = 'requests_new';
    INSERT INTO sqlite_sequence(name, seq)
        SELECT 'requests_new', seq FROM sqlite_sequence WHERE name = 'requests';
    DROP TABLE requests;
    ALTER TABLE requests_new RENAME TO requests;
    CREATE INDEX requests_failure ON requests(kind, message_id, sha256);
    CREATE INDEX requests_outage ON requests(kind, mailbox, cause, status);
    CREATE INDEX requests_correlation ON requests(correlation_key, number)
        WHERE correlation_key IS NOT NULL;
    CREATE TABLE request_fields (
        id INTEGER PRIMARY KEY,
        request_number INTEGER NOT NULL REFERENCES requests(number),
        name TEXT NOT NULL,
        value TEXT NOT NULL
    );
    CREATE INDEX request_fields_request ON request_fields(request_number);
    CREATE TABLE request_tags (
        request_number INTEGER NOT NULL REFERENCES requests(number),
        tag TEXT NOT NULL,
        PRIMARY KEY (request_number, tag)
    );
    CREATE TABLE foreign_numbers (
        id INTEGER PRIMARY KEY,
        ref TEXT NOT NULL,
        request_number INTEGER NOT NULL REFERENCES requests(number),
        UNIQUE (ref, request_number)
    );
    """,
)

REBUILDS = frozenset({6})
"""Migrations that rebuild a table: run with ``foreign_keys`` off (it cannot change inside a
transaction), then checked with ``PRAGMA foreign_key_check`` before they commit."""

ACCOUNTS = 3
"""The migration after whose script the ledger's accounts move from ``user@host:port`` to
the normalized form of engine.keys (done in Python: IDNA and IP literals)."""


def normalized_account(old: str) -> str:
    """``user@host:port`` (before migration 3) as engine.keys.account_key makes it now; a
    user may contain "@", a host ":" (IPv6). Anything else is left as it is."""
    from engine.keys import account_key

    rest, colon, port = old.rpartition(":")
    user, at, host = rest.rpartition("@")
    if not (colon and at and port.isdigit() and user and host):
        return old
    return account_key(user, host)
