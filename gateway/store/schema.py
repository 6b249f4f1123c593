"""Schema and migrations, applied in order by PRAGMA user_version; connection settings for every opener."""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "connect", "migrate", "used_pages_bytes"]

# Each entry moves the schema from version i to i+1. Never edit a released entry: append a new one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta(key, value) VALUES ('registry_version', '0');

    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        site TEXT NOT NULL,
        room TEXT NOT NULL,
        type TEXT NOT NULL,
        name TEXT,
        disabled INTEGER NOT NULL DEFAULT 0,
        online INTEGER NOT NULL DEFAULT 0,
        online_changed_at REAL,
        last_seen REAL,
        battery REAL,
        signal REAL,
        firmware TEXT,
        status_json TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX devices_place ON devices(site, room);

    -- one row per MQTT account: kind 'device' (username = device id) or 'integration'
    CREATE TABLE credentials (
        username TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('device', 'integration')),
        secret_hash TEXT NOT NULL,
        read_patterns TEXT NOT NULL DEFAULT '[]',
        write_patterns TEXT NOT NULL DEFAULT '[]',
        created_at REAL NOT NULL
    );

    CREATE TABLE users (
        username TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('admin', 'installer', 'crew')),
        password_hash TEXT NOT NULL,
        disabled INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );

    CREATE TABLE api_tokens (
        token_hash TEXT PRIMARY KEY,
        username TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
        label TEXT,
        created_at REAL NOT NULL,
        last_used_at REAL,
        revoked INTEGER NOT NULL DEFAULT 0
    );

    CREATE TABLE measurements (
        id INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL,
        metric TEXT NOT NULL,
        ts REAL NOT NULL,
        value REAL
    );
    CREATE INDEX measurements_device_metric_ts ON measurements(device_id, metric, ts);

    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        device_id TEXT,
        type TEXT NOT NULL,
        ts REAL NOT NULL,
        received_at REAL NOT NULL,
        sequence_id INTEGER,
        payload TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_type_ts ON events(type, ts);
    CREATE INDEX events_ts ON events(ts);
    -- a press is stored once per (device, sequence_id), whatever the retransmissions (DESIGN: press)
    CREATE UNIQUE INDEX events_dedup ON events(device_id, type, sequence_id) WHERE sequence_id IS NOT NULL;

    CREATE TABLE traffic (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        direction TEXT NOT NULL,
        client_id TEXT,
        topic TEXT NOT NULL,
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL DEFAULT 0,
        size INTEGER NOT NULL,
        payload BLOB,
        error TEXT
    );
    CREATE INDEX traffic_topic ON traffic(topic);

    CREATE TABLE commands (
        command_id TEXT PRIMARY KEY,
        device_id TEXT NOT NULL,
        name TEXT NOT NULL,
        args TEXT NOT NULL DEFAULT '{}',
        status TEXT NOT NULL,
        detail TEXT,
        created_at REAL NOT NULL,
        sent_at REAL,
        acked_at REAL,
        created_by TEXT
    );
    CREATE INDEX commands_device ON commands(device_id, created_at);

    CREATE TABLE audit_log (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT,
        detail TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX audit_ts ON audit_log(ts);

    -- transactional outbox: rows for HQ, appended in the same transaction as the record they carry
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        lane TEXT NOT NULL,
        kind TEXT NOT NULL,
        device_id TEXT,
        created_at REAL NOT NULL,
        body BLOB NOT NULL
    );
    CREATE INDEX outbox_lane ON outbox(lane, seq);

    -- any change to the registry bumps a counter the running gateway polls (the CLI writes while it runs)
    CREATE TRIGGER devices_ins AFTER INSERT ON devices BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'registry_version'; END;
    CREATE TRIGGER devices_upd AFTER UPDATE OF site, room, type, disabled ON devices BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'registry_version'; END;
    CREATE TRIGGER devices_del AFTER DELETE ON devices BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'registry_version'; END;
    CREATE TRIGGER cred_ins AFTER INSERT ON credentials BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'registry_version'; END;
    CREATE TRIGGER cred_upd AFTER UPDATE ON credentials BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'registry_version'; END;
    CREATE TRIGGER cred_del AFTER DELETE ON credentials BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'registry_version'; END;
    """,
]

MIGRATIONS.append(
    """
    -- MQTT sessions with clean session 0 (MQTT 3.1.1 section 3.1.2.4): they survive a gateway restart
    CREATE TABLE mqtt_sessions (client_id TEXT PRIMARY KEY, username TEXT, created_at REAL NOT NULL);
    CREATE TABLE mqtt_subscriptions (
        client_id TEXT NOT NULL REFERENCES mqtt_sessions(client_id) ON DELETE CASCADE,
        filter TEXT NOT NULL,
        qos INTEGER NOT NULL,
        PRIMARY KEY (client_id, filter)
    );
    -- QoS 1/2 messages queued or in flight to a persistent session; pid 0 = not sent yet
    CREATE TABLE mqtt_messages (
        client_id TEXT NOT NULL REFERENCES mqtt_sessions(client_id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL,
        pid INTEGER NOT NULL DEFAULT 0,
        released INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (client_id, seq)
    );
    CREATE TABLE mqtt_retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL);
    """
)

MIGRATIONS.append(
    """
    -- crew calls (DESIGN: domain): a guest's press opens a call; watches are notified, escalate, accept, complete
    ALTER TABLE devices ADD COLUMN call_priority TEXT;
    CREATE TABLE rooms (
        site TEXT NOT NULL,
        room TEXT NOT NULL,
        name TEXT,
        zone TEXT,
        dnd INTEGER NOT NULL DEFAULT 0,
        dnd_changed_at REAL,
        dnd_changed_by TEXT,
        PRIMARY KEY (site, room)
    );
    -- watch -> zone labels (JSON list): "*", a zone, a room or a site
    CREATE TABLE duty (watch_id TEXT PRIMARY KEY, zones TEXT NOT NULL);
    CREATE TABLE calls (
        id INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL,
        site TEXT NOT NULL,
        room TEXT NOT NULL,
        priority TEXT NOT NULL CHECK (priority IN ('normal', 'urgent', 'emergency')),
        press_type TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('open', 'accepted', 'completed', 'cancelled')),
        created_at REAL NOT NULL,
        presses INTEGER NOT NULL DEFAULT 1,
        last_press_at REAL NOT NULL,
        dnd INTEGER NOT NULL DEFAULT 0,
        escalation INTEGER NOT NULL DEFAULT 0,
        escalated_at REAL,
        accepted_at REAL,
        accepted_by TEXT,
        completed_at REAL,
        completed_by TEXT,
        cancelled_at REAL,
        cancelled_by TEXT,
        cancel_reason TEXT
    );
    CREATE INDEX calls_state ON calls(state, created_at);
    CREATE INDEX calls_room ON calls(site, room, state);
    CREATE INDEX calls_created ON calls(created_at);
    CREATE TABLE call_timeline (
        id INTEGER PRIMARY KEY,
        call_id INTEGER NOT NULL REFERENCES calls(id),
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        actor TEXT,
        detail TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX call_timeline_call ON call_timeline(call_id, id);
    -- every cmd/notify sent for a call (also a row in commands): to a watch or to the button that called
    CREATE TABLE call_notifies (
        command_id TEXT PRIMARY KEY,
        call_id INTEGER NOT NULL REFERENCES calls(id),
        device_id TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('watch', 'button')),
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        sent_at REAL,
        status TEXT,
        received_at REAL,
        answered_at REAL
    );
    CREATE INDEX call_notifies_call ON call_notifies(call_id, device_id);
    CREATE INDEX call_notifies_unsent ON call_notifies(sent_at) WHERE sent_at IS NULL;
    """
)

MIGRATIONS.append(
    """
    -- a call keeps the zone its room had when it was made (stats by zone; rooms may be re-zoned later)
    ALTER TABLE calls ADD COLUMN zone TEXT;
    -- web UI sign-ins: the cookie carries a random token, only its hash is stored; csrf is the form token
    CREATE TABLE web_sessions (
        token_hash TEXT PRIMARY KEY,
        username TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
        csrf TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        address TEXT
    );
    CREATE INDEX web_sessions_user ON web_sessions(username);
    """
)

MIGRATIONS.append(
    """
    -- uplink (DESIGN: uplink): one durable cursor per lane, the highest sequence HQ confirmed it stored.
    -- priority and state lanes are outbox seqs (acked rows are deleted); telemetry is measurements.id
    -- (measurements are not copied into the outbox: at 20k rows/s that would double the write load)
    CREATE TABLE uplink_lanes (
        lane TEXT PRIMARY KEY,
        acked INTEGER NOT NULL DEFAULT 0,
        sent_records INTEGER NOT NULL DEFAULT 0,
        sent_bytes INTEGER NOT NULL DEFAULT 0,
        lost INTEGER NOT NULL DEFAULT 0,
        acked_at REAL
    );
    INSERT INTO uplink_lanes(lane) VALUES ('priority'), ('state'), ('telemetry');
    """
)

MIGRATIONS.append(
    """
    -- discovery, provisioning and device security (DESIGN: provisioning): single-use tokens stored hashed,
    -- scoped to site/room/type and optionally bound to one pending device; token_id is their public name
    CREATE TABLE provisioning_tokens (
        token_hash TEXT PRIMARY KEY,
        token_id TEXT NOT NULL UNIQUE,
        site TEXT NOT NULL,
        room TEXT NOT NULL,
        type TEXT NOT NULL,
        device_id TEXT,
        profile TEXT,
        created_by TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        used_at REAL,
        used_by TEXT
    );
    -- every certificate the local CA issued to a device; the broker accepts only these, unrevoked
    CREATE TABLE device_certificates (
        serial TEXT PRIMARY KEY,
        device_id TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        issued_at REAL NOT NULL,
        not_after REAL NOT NULL,
        revoked_at REAL
    );
    CREATE INDEX device_certificates_device ON device_certificates(device_id);
    -- revoked devices: their password is deleted and their certificates refused from then on
    CREATE TABLE revocations (
        device_id TEXT PRIMARY KEY,
        revoked_at REAL NOT NULL,
        revoked_by TEXT NOT NULL,
        reason TEXT
    );
    -- seed 004's MQTTSecurityProfile: named limits per device type, assigned to devices
    CREATE TABLE security_profiles (
        name TEXT PRIMARY KEY,
        device_type TEXT,
        actions TEXT NOT NULL DEFAULT '[]',
        max_qos INTEGER NOT NULL DEFAULT 2,
        retain INTEGER NOT NULL DEFAULT 1,
        max_connections INTEGER NOT NULL DEFAULT 1,
        description TEXT
    );
    ALTER TABLE devices ADD COLUMN profile TEXT;
    CREATE TRIGGER devices_profile_upd AFTER UPDATE OF profile ON devices BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'registry_version'; END;
    CREATE TRIGGER certs_ins AFTER INSERT ON device_certificates BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'registry_version'; END;
    CREATE TRIGGER certs_upd AFTER UPDATE ON device_certificates BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'registry_version'; END;
    CREATE TRIGGER profiles_ins AFTER INSERT ON security_profiles BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'registry_version'; END;
    CREATE TRIGGER profiles_upd AFTER UPDATE ON security_profiles BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'registry_version'; END;
    CREATE TRIGGER profiles_del AFTER DELETE ON security_profiles BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'registry_version'; END;
    """
)

MIGRATIONS.append(
    """
    -- seed 004's MQTTSecurityProfile.client_cert_required: a device with this profile may not log in by password
    ALTER TABLE security_profiles ADD COLUMN client_cert_required INTEGER NOT NULL DEFAULT 0;
    """
)

MIGRATIONS.append(
    """
    -- uplink: this database's epoch, sent in every batch; HQ refuses a gateway id whose database was replaced
    -- (its sequences start again at 1 and would otherwise be taken for records HQ already has)
    INSERT OR IGNORE INTO meta(key, value) VALUES ('uplink_epoch', lower(hex(randomblob(8))));
    """
)

MIGRATIONS.append(
    """
    -- cheaper bulk inserts (measured: about half the COMMIT time per row at 10,000 msg/s): an insert into an index
    -- dirties the leaf page its key lands on, and each dirty page costs a whole page of WAL at every COMMIT.
    -- One run per device instead of one per (device, metric) puts a message's metrics on the same leaf; the
    -- traffic log (capped, newest first) is read by id, and a search by topic scans it instead.
    DROP INDEX IF EXISTS measurements_device_metric_ts;
    CREATE INDEX IF NOT EXISTS measurements_device_ts ON measurements(device_id, ts);
    DROP INDEX IF EXISTS traffic_topic;
    """
)

# The per-device index migration 10 creates is dropped by store.mindex once its own file has caught up (on the
# acknowledgement path it cost about one index page per message): until then it answers device queries.
LEGACY_INDEX = "measurements_device_ts"

SCHEMA_VERSION = len(MIGRATIONS)


# Page size of a new gateway database (an existing file keeps its own). Every COMMIT writes whole pages to the WAL,
# and a group of the bulk writer fills about one or two: a 1 KB page writes a quarter of a 4 KB one. Measured while
# the per-device index was still in the database (one dirty leaf per message, now in store.mindex's file): five
# alternating pairs of make bench runs at 10,000 msg/s FULL, PUBACK p99 36, 68, 57, 78, 147 ms with 1 KB pages
# against 96, 74, 78, 100, 196 ms with 4 KB.
PAGE_SIZE = 1024


def connect(
    path: Path,
    *,
    readonly: bool = False,
    synchronous: str = "NORMAL",
    autocheckpoint: bool = True,
    page_size: int = PAGE_SIZE,
) -> sqlite3.Connection:
    """Open the database with the settings every connection needs (WAL, busy timeout, foreign keys).
    `page_size` applies only when this creates the file."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    else:
        conn.execute(f"PRAGMA page_size = {int(page_size)}")  # before WAL mode writes the file's first page
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        # a WAL that grew far past store.writer's restart point (64 MB) is cut back to this when it restarts
        conn.execute("PRAGMA journal_size_limit = 268435456")
        if not autocheckpoint:
            # the gateway's writers leave checkpoints to a thread of their own (store.writer): a checkpoint in
            # the committing connection stalls every acknowledgement waiting for that commit
            conn.execute("PRAGMA wal_autocheckpoint = 0")
    return conn


def used_pages_bytes(conn: sqlite3.Connection, schema: str = "main") -> int:
    """Bytes in the pages in use of one attached database (free pages are reused, so they do not count)."""
    pages = conn.execute(f"PRAGMA {schema}.page_count").fetchone()[0]
    free = conn.execute(f"PRAGMA {schema}.freelist_count").fetchone()[0]
    size = conn.execute(f"PRAGMA {schema}.page_size").fetchone()[0]
    return int((pages - free) * size)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply every migration newer than the file's user_version, each in its own transaction."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        from gateway.errors import StoreError

        raise StoreError(f"database schema {version} is newer than this Bosun ({SCHEMA_VERSION}): upgrade Bosun")
    for index in range(version, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # re-read inside the lock: another process may have migrated meanwhile
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current > index:
                conn.execute("COMMIT")
                continue
            for statement in _statements(MIGRATIONS[index]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {index + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION


def _statements(script: str) -> list[str]:
    """Split a migration into statements (executescript would commit our transaction)."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out
