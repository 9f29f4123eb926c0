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
    # 7: issue 20. Watchers (To/Cc addresses kept on a request); addresses a permanent
    # bounce marked undeliverable (no automatic reply goes to them); and where each mail
    # request came from (mailbox, sender, content fingerprint, Message-ID), which the flood
    # limit and the several-mailboxes policy read inside the writer's transaction. The
    # engine's keys: 'reference', the HMAC key of the reference tokens (engine.parse.tokens),
    # one per store so every replica and the console agree; made here from SQLite's
    # randomness (PostgreSQL: gen_random_uuid's), never logged. Idempotent: it filled a slot
    # that was a no-op, and a store that recorded 7 then runs it at open (CATCH_UP).
    """
    CREATE TABLE IF NOT EXISTS watchers (
        request_number INTEGER NOT NULL REFERENCES requests(number),
        address TEXT NOT NULL COLLATE NOCASE,
        user_id INTEGER REFERENCES users(id),
        added_at TEXT NOT NULL,
        PRIMARY KEY (request_number, address)
    );
    CREATE TABLE IF NOT EXISTS undeliverable (
        address TEXT PRIMARY KEY COLLATE NOCASE,
        status TEXT NOT NULL,
        reason TEXT NOT NULL,
        request_number INTEGER,
        since TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS request_origins (
        request_number INTEGER PRIMARY KEY REFERENCES requests(number),
        mailbox TEXT NOT NULL,
        team_id INTEGER NOT NULL,
        sender TEXT NOT NULL COLLATE NOCASE,
        fingerprint TEXT NOT NULL,
        message_id TEXT,
        created_at TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS request_origins_sender
        ON request_origins(mailbox, sender, created_at);
    CREATE INDEX IF NOT EXISTS request_origins_fingerprint
        ON request_origins(mailbox, fingerprint, created_at);
    CREATE INDEX IF NOT EXISTS request_origins_message_id ON request_origins(message_id)
        WHERE message_id IS NOT NULL;
    CREATE TABLE IF NOT EXISTS engine_keys (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    INSERT OR IGNORE INTO engine_keys(name, value) VALUES ('reference', lower(hex(randomblob(32))));
    """,
    # 8: small attachments as rows, by content (sha256), as the PostgreSQL store keeps every
    # attachment: the commit that cites them makes them durable, with no file, file fsync
    # and folder fsync each (half the engine's busy time on attachment-heavy mail, issue 18).
    # Larger ones stay files (engine/store/sqlite.py, BLOB_MAX). IF NOT EXISTS: a database
    # of a development build recorded 8 as a no-op.
    """
    CREATE TABLE IF NOT EXISTS attachment_blobs (
        sha256 TEXT PRIMARY KEY,
        data BLOB NOT NULL
    );
    """,
    # 9: roles of directory users (the web console's "replay" role: engine/console).
    # A table of its own, so that a user may hold several and a role is added without
    # changing the users table.
    """
    CREATE TABLE IF NOT EXISTS user_roles (
        user_id INTEGER NOT NULL REFERENCES users(id),
        role TEXT NOT NULL,
        PRIMARY KEY (user_id, role)
    );
    """,
    # 10: when each message reached the mail server (IMAP's INTERNALDATE, else the top
    # Received field), beside processed_at: the console's lag. NULL: not known (rows of
    # before, mail without either).
    """
    ALTER TABLE ledger ADD COLUMN arrived_at TEXT;
    """,
    # 11: nothing to do here: what several replicas on one PostgreSQL need (its 11). SQLite
    # has one engine per data directory, behind its lock.
    "SELECT 1;",
    # 12: the outbox by Message-ID. A reply or bounce that names one of our auto-replies
    # finds its request there (request_by_message_id, and the writer's read-ahead of every
    # batch's threads and bounces): without an index each batch scanned the whole outbox,
    # which keeps every reply sent. One index entry per reply queued, which is rare.
    """
    CREATE INDEX IF NOT EXISTS outbox_message_id ON outbox(message_id);
    """,
)

CATCH_UP: dict[int, str] = {7: "engine_keys"}
"""Migrations that filled a slot other branches' builds recorded as a no-op: a store that
recorded the version but lacks its table (the value) runs its script (idempotent) at open."""

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


# The same versions in PostgreSQL's dialect. One list of versions for both stores: a
# version number means the same schema in each (tests/test_postgres.py holds the keys
# equal). Differences, and why:
# - ids and request numbers are ``bigserial``/``bigint``: sequences, unique across replicas;
# - SQLite's ``COLLATE NOCASE`` is a unique index on ``lower(name)`` (no citext extension);
# - migration 3's Python step (accounts with a port) is SQLite's only: no PostgreSQL store
#   existed before the accounts changed form;
# - 11 adds what several replicas need (see its comment); SQLite, with one engine per data
#   directory behind its lock, has nothing to do for it.
# Every version up to 12 is filled now; gaps are allowed (the version table
# lists the versions applied, so one merged later is applied later).
POSTGRES_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE groups (id bigserial PRIMARY KEY, name text NOT NULL);
    CREATE UNIQUE INDEX groups_name ON groups (lower(name));
    CREATE TABLE sites (id bigserial PRIMARY KEY, name text NOT NULL);
    CREATE UNIQUE INDEX sites_name ON sites (lower(name));
    CREATE TABLE sources (id bigserial PRIMARY KEY, name text NOT NULL);
    CREATE UNIQUE INDEX sources_name ON sources (lower(name));
    CREATE TABLE teams (
        id bigserial PRIMARY KEY,
        number bigint NOT NULL UNIQUE,
        name text NOT NULL,
        default_group_id bigint REFERENCES groups(id)
    );
    CREATE UNIQUE INDEX teams_name ON teams (lower(name));
    CREATE TABLE users (
        id bigserial PRIMARY KEY,
        login text NOT NULL,
        email text,
        name text NOT NULL,
        site_id bigint REFERENCES sites(id),
        password_hash text
    );
    CREATE UNIQUE INDEX users_login ON users (lower(login));
    CREATE INDEX users_email ON users (lower(email));
    CREATE TABLE requests (
        number bigserial PRIMARY KEY,
        team_id bigint NOT NULL REFERENCES teams(id),
        type text NOT NULL CHECK (type IN ('incident', 'event')),
        status text NOT NULL,
        kind text NOT NULL DEFAULT 'mail'
            CHECK (kind IN ('mail', 'message-failure', 'outage')),
        subject text NOT NULL,
        description text NOT NULL,
        html text,
        requester_id bigint REFERENCES users(id),
        user_id bigint REFERENCES users(id),
        site_id bigint REFERENCES sites(id),
        group_id bigint REFERENCES groups(id),
        assignee_id bigint REFERENCES users(id),
        source_id bigint REFERENCES sources(id),
        mailbox text,
        cause text,
        message_id text,
        sha256 text,
        created_at text NOT NULL,
        created_by text NOT NULL
    );
    CREATE INDEX requests_failure ON requests (kind, message_id, sha256);
    CREATE INDEX requests_outage ON requests (kind, mailbox, cause, status);
    CREATE TABLE activities (
        id bigserial PRIMARY KEY,
        request_number bigint NOT NULL REFERENCES requests(number),
        author text NOT NULL,
        email text NOT NULL,
        date text NOT NULL,
        body text NOT NULL,
        automatic integer NOT NULL DEFAULT 0,
        message_id text,
        created_at text NOT NULL
    );
    CREATE INDEX activities_request ON activities (request_number);
    CREATE TABLE attachments (
        id bigserial PRIMARY KEY,
        request_number bigint NOT NULL REFERENCES requests(number),
        activity_id bigint REFERENCES activities(id),
        name text NOT NULL,
        content_type text NOT NULL,
        size bigint NOT NULL,
        sha256 text NOT NULL
    );
    CREATE INDEX attachments_request ON attachments (request_number);
    CREATE INDEX attachments_sha ON attachments (sha256);
    CREATE TABLE history (
        id bigserial PRIMARY KEY,
        request_number bigint NOT NULL REFERENCES requests(number),
        at text NOT NULL,
        by text NOT NULL,
        text text NOT NULL
    );
    CREATE TABLE ledger (
        id bigserial PRIMARY KEY,
        account text NOT NULL,
        uidl text NOT NULL,
        mailbox text NOT NULL,
        message_id text,
        sha256 text NOT NULL,
        outcome text NOT NULL,
        request_number bigint REFERENCES requests(number),
        processed_at text NOT NULL,
        UNIQUE (account, uidl)
    );
    CREATE INDEX ledger_message ON ledger (message_id);
    CREATE TABLE outbox (
        id bigserial PRIMARY KEY,
        mailbox text NOT NULL,
        request_number bigint REFERENCES requests(number),
        recipient text NOT NULL,
        message_id text NOT NULL,
        message bytea NOT NULL,
        created_at text NOT NULL,
        sent_at text,
        error text
    );
    CREATE INDEX outbox_pending ON outbox (sent_at);
    CREATE INDEX outbox_recipient ON outbox (lower(recipient), created_at);
    """,
    2: MIGRATIONS[1],
    3: MIGRATIONS[2],
    4: MIGRATIONS[3].replace("instr(recipient, '@')", "strpos(recipient, '@')"),
    5: MIGRATIONS[4],  # IMAP: the ledger by content hash within an account (an index)
    # 6: correlation, service requests, priority, rules, foreign numbers (SQLite's comment);
    # PostgreSQL changes a CHECK in place: no rebuild.
    6: """
    CREATE TABLE priorities (id bigserial PRIMARY KEY, name text NOT NULL);
    CREATE UNIQUE INDEX priorities_name ON priorities (lower(name));
    CREATE TABLE categories (id bigserial PRIMARY KEY, name text NOT NULL);
    CREATE UNIQUE INDEX categories_name ON categories (lower(name));
    ALTER TABLE requests DROP CONSTRAINT requests_type_check;
    ALTER TABLE requests ADD CONSTRAINT requests_type_check
        CHECK (type IN ('incident', 'event', 'service request'));
    ALTER TABLE requests ADD COLUMN priority_id bigint REFERENCES priorities(id);
    ALTER TABLE requests ADD COLUMN correlation_key text;
    ALTER TABLE requests ADD COLUMN alert_state text;
    ALTER TABLE requests ADD COLUMN form text;
    ALTER TABLE requests ADD COLUMN closed_at text;
    CREATE INDEX requests_correlation ON requests (correlation_key, number)
        WHERE correlation_key IS NOT NULL;
    CREATE TABLE request_fields (
        id bigserial PRIMARY KEY,
        request_number bigint NOT NULL REFERENCES requests(number),
        name text NOT NULL,
        value text NOT NULL
    );
    CREATE INDEX request_fields_request ON request_fields (request_number);
    CREATE TABLE request_tags (
        request_number bigint NOT NULL REFERENCES requests(number),
        tag text NOT NULL,
        PRIMARY KEY (request_number, tag)
    );
    CREATE TABLE foreign_numbers (
        id bigserial PRIMARY KEY,
        ref text NOT NULL,
        request_number bigint NOT NULL REFERENCES requests(number),
        UNIQUE (ref, request_number)
    );
    """,
    # 7: watchers, undeliverable addresses, request origins (SQLite's comment).
    7: """
    CREATE TABLE IF NOT EXISTS watchers (
        request_number bigint NOT NULL REFERENCES requests(number),
        address text NOT NULL,
        user_id bigint REFERENCES users(id),
        added_at text NOT NULL,
        PRIMARY KEY (request_number, address)
    );
    CREATE TABLE IF NOT EXISTS undeliverable (
        address text PRIMARY KEY,
        status text NOT NULL,
        reason text NOT NULL,
        request_number bigint,
        since text NOT NULL
    );
    CREATE TABLE IF NOT EXISTS request_origins (
        request_number bigint PRIMARY KEY REFERENCES requests(number),
        mailbox text NOT NULL,
        team_id bigint NOT NULL,
        sender text NOT NULL,
        fingerprint text NOT NULL,
        message_id text,
        created_at text NOT NULL
    );
    CREATE INDEX IF NOT EXISTS request_origins_sender
        ON request_origins (mailbox, sender, created_at);
    CREATE INDEX IF NOT EXISTS request_origins_fingerprint
        ON request_origins (mailbox, fingerprint, created_at);
    CREATE INDEX IF NOT EXISTS request_origins_message_id ON request_origins (message_id)
        WHERE message_id IS NOT NULL;
    CREATE TABLE IF NOT EXISTS engine_keys (name text PRIMARY KEY, value text NOT NULL);
    INSERT INTO engine_keys (name, value) VALUES ('reference',
        replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''))
        ON CONFLICT (name) DO NOTHING;
    """,
    # 8: nothing to do here: PostgreSQL keeps every attachment as a row since 11.
    8: "SELECT 1",
    # 9: roles of directory users (SQLite's comment).
    9: """
    CREATE TABLE IF NOT EXISTS user_roles (
        user_id bigint NOT NULL REFERENCES users(id),
        role text NOT NULL,
        PRIMARY KEY (user_id, role)
    );
    """,
    # 10: the arrival of each message (SQLite's comment).
    10: "ALTER TABLE ledger ADD COLUMN IF NOT EXISTS arrived_at text",
    # 11: several replicas on one database.
    # - attachment_blobs: attachments by content (sha256), so no replica needs a shared disk;
    #   one row per content whatever cites it.
    # - leases: which replica polls which mailbox, until when, and the fencing epoch a
    #   committing transaction checks (engine/store/leases.py).
    # - replicas: who is alive (a heartbeat), for the balance of leases.
    # - at most one open outage event per mailbox and cause, whichever replica opens it.
    # - directory_version: bumped by each directory import, so that a replica may keep its
    #   directory lookups from one transaction to the next until another one imports.
    11: """
    CREATE SEQUENCE directory_version;
    CREATE TABLE attachment_blobs (
        sha256 text PRIMARY KEY,
        data bytea NOT NULL
    );
    CREATE TABLE leases (
        mailbox text PRIMARY KEY,
        owner text,
        expires_at timestamptz NOT NULL DEFAULT now(),
        epoch bigint NOT NULL DEFAULT 0
    );
    CREATE INDEX leases_owner ON leases (owner);
    CREATE TABLE replicas (
        id text PRIMARY KEY,
        seen_at timestamptz NOT NULL,
        started_at timestamptz NOT NULL
    );
    CREATE UNIQUE INDEX requests_one_open_outage ON requests (mailbox, cause)
        WHERE kind = 'outage' AND status NOT IN ('processed', 'closed');
    """,
    # 12: the outbox by Message-ID (SQLite's comment).
    12: "CREATE INDEX IF NOT EXISTS outbox_message_id ON outbox (message_id)",
}
