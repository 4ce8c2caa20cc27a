//! SQLite state: tenants, hashed tokens and quotas, sandboxes, their snapshots, templates
//! and the audit log.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::model::{
    AllowedIsolation, Isolation, NetworkInfo, Sandbox, SandboxState, Snapshot, Template,
};

/// Per-tenant limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Sandboxes alive at once.
    pub max_sandboxes: u32,
    /// Sum of their vCPUs.
    pub max_vcpus: u32,
    /// Sum of their memory, MiB.
    pub max_memory_mib: u64,
}

impl Default for Quota {
    fn default() -> Self {
        Quota {
            max_sandboxes: 64,
            max_vcpus: 128,
            max_memory_mib: 64 * 1024,
        }
    }
}

/// A tenant and its quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// Tenant name.
    pub name: String,
    /// Its limits.
    pub quota: Quota,
    /// May register and replace templates, which every tenant's sandboxes are made from.
    pub admin: bool,
    /// The tiers its sandboxes may use, within the daemon's (`None`: the daemon's).
    pub allowed_isolation: Option<AllowedIsolation>,
}

/// A sandbox as stored, with the host-side facts the API does not show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRow {
    /// What the API shows.
    pub sandbox: Sandbox,
    /// Allocation slot: gives the jail uid and the network addresses.
    pub slot: u32,
    /// Pid of the `mvm-jailer` process (0 before it started).
    pub pid: u32,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// Unix time (s).
    pub at: i64,
    /// Tenant of the caller (`-` when unauthenticated).
    pub tenant: String,
    /// `METHOD /path`.
    pub action: String,
    /// Sandbox id or other target.
    pub target: String,
    /// HTTP status of the answer.
    pub status: u16,
}

/// What a tenant currently uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Sandboxes.
    pub sandboxes: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
}

/// The state database. All access is serialized through one connection.
#[derive(Debug)]
pub struct Db {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    max_sandboxes INTEGER NOT NULL,
    max_vcpus INTEGER NOT NULL,
    max_memory_mib INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0,
    allowed_isolation TEXT
);
CREATE TABLE IF NOT EXISTS tokens (
    sha256 TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    state TEXT NOT NULL,
    isolation TEXT NOT NULL,
    template TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    timeout_s INTEGER NOT NULL,
    expires_at INTEGER,
    created_at INTEGER NOT NULL,
    env TEXT NOT NULL,
    network TEXT NOT NULL,
    metadata TEXT NOT NULL,
    slot INTEGER NOT NULL UNIQUE,
    pid INTEGER NOT NULL DEFAULT 0,
    image TEXT,
    lifecycle TEXT,
    resuming INTEGER NOT NULL DEFAULT 0,
    snapshot TEXT
);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT,
    source TEXT NOT NULL,
    template TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    ready INTEGER NOT NULL DEFAULT 0,
    UNIQUE (tenant, name)
);
CREATE TABLE IF NOT EXISTS templates (
    name TEXT PRIMARY KEY,
    kernel TEXT NOT NULL,
    rootfs TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    status INTEGER NOT NULL,
    detail TEXT NOT NULL
);
";

/// Current Unix time in seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// SHA-256 hex digest of a token: only this is stored.
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `n` random bytes from the kernel, as lowercase hex.
pub fn random_hex(n: usize) -> Result<String> {
    Ok(random_bytes(n)?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// `n` bytes from the host's RNG.
pub fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .map_err(|e| Error::host("reading /dev/urandom", e))?;
    Ok(buf)
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serializes")
}

fn row_to_sandbox(r: &rusqlite::Row<'_>) -> rusqlite::Result<SandboxRow> {
    let text = |i: usize| r.get::<_, String>(i);
    let bad = |i: usize, what: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, what.into())
    };
    let state = SandboxState::parse(&text(2)?).ok_or_else(|| bad(2, "unknown state".into()))?;
    let isolation: Isolation = text(3)?.parse().map_err(|e| bad(3, e))?;
    let network: NetworkInfo =
        serde_json::from_str(&text(10)?).map_err(|e| bad(10, e.to_string()))?;
    Ok(SandboxRow {
        sandbox: Sandbox {
            id: text(0)?,
            tenant: text(1)?,
            state,
            isolation,
            template: text(4)?,
            vcpus: r.get(5)?,
            memory_mib: r.get::<_, i64>(6)? as u64,
            timeout_s: r.get::<_, i64>(7)? as u64,
            expires_at: r.get(8)?,
            created_at: r.get(9)?,
            env: serde_json::from_str(&text(11)?).map_err(|e| bad(11, e.to_string()))?,
            network,
            metadata: serde_json::from_str(&text(12)?).map_err(|e| bad(12, e.to_string()))?,
            image: r
                .get::<_, Option<String>>(15)?
                .map(|j| serde_json::from_str(&j).map_err(|e| bad(15, e.to_string())))
                .transpose()?,
            // A row from before lifecycles has the default one.
            lifecycle: r
                .get::<_, Option<String>>(16)?
                .map(|j| serde_json::from_str(&j).map_err(|e| bad(16, e.to_string())))
                .transpose()?
                .unwrap_or_default(),
            snapshot: r.get(17)?,
        },
        slot: r.get(13)?,
        pid: r.get(14)?,
    })
}

const TENANT_COLUMNS: &str =
    "t.name, t.max_sandboxes, t.max_vcpus, t.max_memory_mib, t.admin, t.allowed_isolation";

fn row_to_tenant(r: &rusqlite::Row<'_>) -> rusqlite::Result<Tenant> {
    Ok(Tenant {
        name: r.get(0)?,
        quota: Quota {
            max_sandboxes: r.get(1)?,
            max_vcpus: r.get(2)?,
            max_memory_mib: r.get::<_, i64>(3)? as u64,
        },
        admin: r.get(4)?,
        allowed_isolation: r
            .get::<_, Option<String>>(5)?
            .map(|s| {
                s.parse().map_err(|e: String| {
                    rusqlite::Error::FromSqlConversionFailure(
                        5,
                        rusqlite::types::Type::Text,
                        e.into(),
                    )
                })
            })
            .transpose()?,
    })
}

/// How long a statement waits for another connection's lock.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Switches the database to write-ahead logging. While other processes open a new database
/// at the same time (concurrent daemonless `mvm`s) they hold it in rollback mode for a moment,
/// and SQLite answers the switch with SQLITE_BUSY at once instead of calling the busy handler:
/// retried for as long as [`BUSY_TIMEOUT`].
fn set_wal(conn: &Connection) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            done => return done,
        }
    }
}

/// Columns added since the first release (table, column), and how an older database gets
/// each. Databases from before the `admin` column get it set for tenant `default`: the tenant
/// whose token mvmd writes to its state directory, which registered templates then.
const MIGRATIONS: [(&str, &str, &str); 6] = [
    (
        "tenants",
        "admin",
        "ALTER TABLE tenants ADD COLUMN admin INTEGER NOT NULL DEFAULT 0;
         UPDATE tenants SET admin = 1 WHERE name = 'default';",
    ),
    (
        "tenants",
        "allowed_isolation",
        "ALTER TABLE tenants ADD COLUMN allowed_isolation TEXT;",
    ),
    (
        "sandboxes",
        "image",
        "ALTER TABLE sandboxes ADD COLUMN image TEXT;",
    ),
    (
        "sandboxes",
        "lifecycle",
        "ALTER TABLE sandboxes ADD COLUMN lifecycle TEXT;",
    ),
    (
        "sandboxes",
        "resuming",
        "ALTER TABLE sandboxes ADD COLUMN resuming INTEGER NOT NULL DEFAULT 0;",
    ),
    (
        "sandboxes",
        "snapshot",
        "ALTER TABLE sandboxes ADD COLUMN snapshot TEXT;",
    ),
];

/// Brings a database made by an older mvm up to [`SCHEMA`] ([`MIGRATIONS`]).
fn migrate(conn: &Connection) -> Result<()> {
    let missing = |c: &Connection| -> rusqlite::Result<Vec<&'static str>> {
        let mut out = Vec::new();
        for (table, column, sql) in MIGRATIONS {
            if !c
                .prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
                .exists([table, column])?
            {
                out.push(sql);
            }
        }
        Ok(out)
    };
    if missing(conn)?.is_empty() {
        return Ok(());
    }
    // Another process opening the same database may be migrating it too: check again
    // under the write lock.
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
    for sql in missing(&tx)? {
        tx.execute_batch(sql)?;
    }
    tx.commit()?;
    Ok(())
}

const SNAPSHOT_COLUMNS: &str = "id, name, source, template, vcpus, memory_mib, created_at";

fn row_to_snapshot(r: &rusqlite::Row<'_>) -> rusqlite::Result<Snapshot> {
    Ok(Snapshot {
        id: r.get(0)?,
        name: r.get(1)?,
        source: r.get(2)?,
        template: r.get(3)?,
        vcpus: r.get(4)?,
        memory_mib: r.get::<_, i64>(5)? as u64,
        created_at: r.get(6)?,
    })
}

const SANDBOX_COLUMNS: &str = "id, tenant, state, isolation, template, vcpus, memory_mib, \
    timeout_s, expires_at, created_at, network, env, metadata, slot, pid, image, lifecycle, snapshot";

impl Db {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Db> {
        let conn = Connection::open(path).map_err(|e| {
            Error::host(format!("opening the state database {}", path.display()), e)
        })?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        set_wal(&conn)?;
        // Every sandbox's env and the audit log: the owner's alone.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| Error::host(format!("chmod {}", path.display()), e))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        Ok(Db {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll back).
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates tenant `name` (or updates its quota) and returns a new bearer token for it.
    pub fn create_tenant(&self, name: &str, quota: Quota) -> Result<String> {
        validate_name("tenant", name)?;
        let token = format!("mvm_{}", random_hex(24)?);
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO tenants (name, max_sandboxes, max_vcpus, max_memory_mib, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(name) DO UPDATE SET max_sandboxes = ?2, max_vcpus = ?3, max_memory_mib = ?4",
            params![name, quota.max_sandboxes, quota.max_vcpus, quota.max_memory_mib as i64, now()],
        )?;
        tx.execute(
            "INSERT INTO tokens (sha256, tenant, created_at) VALUES (?1, ?2, ?3)",
            params![hash_token(&token), name, now()],
        )?;
        tx.commit()?;
        Ok(token)
    }

    /// Makes sure tenant `name` exists (default quota); returns whether it was created.
    pub fn ensure_tenant(&self, name: &str) -> Result<bool> {
        let q = Quota::default();
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO tenants (name, max_sandboxes, max_vcpus, max_memory_mib, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, q.max_sandboxes, q.max_vcpus, q.max_memory_mib as i64, now()],
        )?;
        Ok(n == 1)
    }

    /// The tenant a bearer token belongs to.
    pub fn tenant_for_token(&self, token: &str) -> Result<Option<Tenant>> {
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {TENANT_COLUMNS} FROM tokens k JOIN tenants t ON t.name = k.tenant
                     WHERE k.sha256 = ?1"
                ),
                params![hash_token(token)],
                row_to_tenant,
            )
            .optional()?)
    }

    /// Tenant `name`.
    pub fn tenant(&self, name: &str) -> Result<Option<Tenant>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {TENANT_COLUMNS} FROM tenants t WHERE t.name = ?1"),
                params![name],
                row_to_tenant,
            )
            .optional()?)
    }

    /// Sets the tiers tenant `name`'s sandboxes may use (`None`: whatever the daemon allows).
    pub fn set_allowed_isolation(
        &self,
        name: &str,
        allowed: Option<AllowedIsolation>,
    ) -> Result<()> {
        let n = self.conn().execute(
            "UPDATE tenants SET allowed_isolation = ?2 WHERE name = ?1",
            params![name, allowed.map(|a| a.to_string())],
        )?;
        if n == 0 {
            return Err(Error::NotFound(format!("no tenant {name:?}")));
        }
        Ok(())
    }

    /// Grants (`true`) or revokes tenant `name`'s right to register and replace templates.
    pub fn set_admin(&self, name: &str, admin: bool) -> Result<()> {
        let n = self.conn().execute(
            "UPDATE tenants SET admin = ?2 WHERE name = ?1",
            params![name, admin],
        )?;
        if n == 0 {
            return Err(Error::NotFound(format!("no tenant {name:?}")));
        }
        Ok(())
    }

    /// Inserts a new sandbox row in state `creating` with the lowest free slot, after checking
    /// the tenant's quota in the same transaction. Returns the slot.
    pub fn insert_sandbox(&self, s: &Sandbox, quota: &Quota) -> Result<u32> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let used = usage(&tx, &s.tenant, "")?;
        check_quota(&s.tenant, quota, &used, s)?;
        check_ports_free(&tx, s)?;
        let slot = {
            let mut stmt = tx.prepare("SELECT slot FROM sandboxes ORDER BY slot")?;
            let taken = stmt
                .query_map([], |r| r.get::<_, u32>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            lowest_free(&taken)
        };
        if slot >= crate::manager::MAX_SLOTS {
            return Err(Error::Quota(format!(
                "this host runs its maximum of {} sandboxes; destroy some first",
                crate::manager::MAX_SLOTS
            )));
        }
        tx.execute(
            &format!("INSERT INTO sandboxes ({SANDBOX_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 0, ?15, ?16, ?17)"),
            params![
                s.id,
                s.tenant,
                s.state.as_str(),
                s.isolation.as_str(),
                s.template,
                s.vcpus,
                s.memory_mib as i64,
                s.timeout_s as i64,
                s.expires_at,
                s.created_at,
                json(&s.network),
                json(&s.env),
                json(&s.metadata),
                slot,
                s.image.as_ref().map(json),
                json(&s.lifecycle),
                s.snapshot,
            ],
        )?;
        tx.commit()?;
        Ok(slot)
    }

    /// Makes sandbox `id` of tenant `from` (a warm pool entry) `s.tenant`'s, in state
    /// `Creating` with `s`'s timeout, environment, metadata and network request, after checking
    /// in the same transaction that it fits the tenant's `quota` and that its ports are free.
    /// Returns the adopted row; a sandbox `from` no longer has is not found.
    pub fn adopt_pooled(
        &self,
        id: &str,
        from: &str,
        s: &Sandbox,
        quota: &Quota,
    ) -> Result<SandboxRow> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let used = usage(&tx, &s.tenant, "")?;
        check_quota(&s.tenant, quota, &used, s)?;
        check_ports_free(&tx, s)?;
        let adopted = tx.execute(
            "UPDATE sandboxes SET tenant = ?3, state = ?4, timeout_s = ?5, expires_at = ?6,
                 created_at = ?7, network = ?8, env = ?9, metadata = ?10, lifecycle = ?11,
                 snapshot = ?12
             WHERE id = ?1 AND tenant = ?2",
            params![
                id,
                from,
                s.tenant,
                SandboxState::Creating.as_str(),
                s.timeout_s as i64,
                s.expires_at,
                s.created_at,
                json(&s.network),
                json(&s.env),
                json(&s.metadata),
                json(&s.lifecycle),
                s.snapshot,
            ],
        )?;
        if adopted == 0 {
            return Err(Error::NotFound(format!("sandbox {id} is not {from}'s")));
        }
        let row = tx.query_row(
            &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1"),
            params![id],
            row_to_sandbox,
        )?;
        tx.commit()?;
        Ok(row)
    }

    /// Updates state, pid, network, timeout and expiry of a sandbox. A new state ends a
    /// resume's claim (see [`claim_resume`](Self::claim_resume)).
    pub fn update_sandbox(&self, row: &SandboxRow) -> Result<()> {
        write_row(&self.conn(), row)
    }

    /// Stores sandbox `row`, whose VM was just saved to disk, in state `saved`, after checking
    /// in the same transaction that its memory fits next to the guest memory its tenant keeps
    /// on the host's disk: its snapshots and saved sandboxes hold at most `quota`'s memory
    /// together (the memory quota bounds what runs; this, what waits on the disk).
    pub fn mark_saved(&self, row: &SandboxRow, quota: &Quota) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        check_save_room(&tx, &row.sandbox, quota)?;
        let mut saved = row.clone();
        saved.sandbox.state = SandboxState::Saved;
        write_row(&tx, &saved)?;
        tx.commit()?;
        Ok(())
    }

    /// Refuses the save of sandbox `s` now if its memory would not fit on the disk next to
    /// its tenant's snapshots and saved sandboxes (see [`mark_saved`](Self::mark_saved),
    /// which checks again when the save is done): a save that cannot be kept is not made.
    pub fn check_save(&self, s: &Sandbox, quota: &Quota) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        check_save_room(&tx, s, quota)
    }

    /// Claims again, for the resume of saved sandbox `s`, the vCPUs and memory that its
    /// tenant's quota stopped counting while it was saved (it held neither), after checking
    /// in the same transaction that they fit next to the tenant's other sandboxes. The claim
    /// holds until the row's state changes or [`end_resume`](Self::end_resume).
    pub fn claim_resume(&self, s: &Sandbox, quota: &Quota) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let others = usage(&tx, &s.tenant, &s.id)?;
        check_resources(&s.tenant, quota, &others, s).map_err(|e| match e {
            Error::Quota(why) => Error::Quota(format!(
                "sandbox {} cannot be resumed: {why} (destroy or save another of the tenant's \
                 sandboxes, or raise its quota)",
                s.id
            )),
            other => other,
        })?;
        let claimed = tx.execute(
            "UPDATE sandboxes SET resuming = 1 WHERE id = ?1 AND state = ?2",
            params![s.id, SandboxState::Saved.as_str()],
        )?;
        if claimed == 0 {
            return Err(Error::Conflict(format!(
                "sandbox {} is no longer saved",
                s.id
            )));
        }
        tx.commit()?;
        Ok(())
    }

    /// Gives back the claim of a saved sandbox's resume that did not happen (see
    /// [`claim_resume`](Self::claim_resume)).
    pub fn end_resume(&self, id: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE sandboxes SET resuming = 0 WHERE id = ?1",
            params![id],
        )?;
        Ok(())
    }

    /// Stores a sandbox's new vCPUs and memory. With `quota`, first checks in the same
    /// transaction that they fit next to the tenant's other sandboxes.
    pub fn resize_sandbox(&self, s: &Sandbox, quota: Option<&Quota>) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if let Some(quota) = quota {
            let others = usage(&tx, &s.tenant, &s.id)?;
            check_quota(&s.tenant, quota, &others, s)?;
        }
        tx.execute(
            "UPDATE sandboxes SET vcpus = ?2, memory_mib = ?3 WHERE id = ?1",
            params![s.id, s.vcpus, s.memory_mib as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Removes a sandbox row.
    pub fn delete_sandbox(&self, id: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM sandboxes WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// One sandbox.
    pub fn sandbox(&self, id: &str) -> Result<Option<SandboxRow>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1"),
                params![id],
                row_to_sandbox,
            )
            .optional()?)
    }

    /// Sandboxes of `tenant`, or of everyone with `None`, oldest first.
    pub fn sandboxes(&self, tenant: Option<&str>) -> Result<Vec<SandboxRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE ?1 IS NULL OR tenant = ?1
             ORDER BY created_at, id"
        ))?;
        let rows = stmt
            .query_map(params![tenant], row_to_sandbox)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Records snapshot `s` of `tenant` while it is being taken: until
    /// [`commit_snapshot`](Self::commit_snapshot) no call finds it, and the next start of
    /// mvmd removes it if it never became ready. Refused when the tenant keeps as many
    /// snapshots as `quota` has sandboxes, or when the guest memory it keeps on the host's
    /// disk (its snapshots' and saved sandboxes': each holds a memory file) and `s`'s would
    /// pass its memory.
    pub fn insert_snapshot(&self, tenant: &str, s: &Snapshot, quota: &Quota) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let held = OnDisk::of(&tx, tenant)?;
        let (kept, max) = (held.snapshots, quota.max_sandboxes);
        if kept >= max {
            return Err(Error::Quota(format!(
                "tenant '{tenant}' keeps {kept} snapshots, as many as its sandboxes may be \
                 ({max}); delete one, or name the new one after one it replaces"
            )));
        }
        held.check_room(tenant, quota, s.memory_mib, "this snapshot")?;
        tx.execute(
            "INSERT INTO snapshots (id, tenant, source, template, vcpus, memory_mib, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                s.id,
                tenant,
                s.source,
                s.template,
                s.vcpus,
                s.memory_mib as i64,
                s.created_at
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Makes snapshot `id` of `tenant` ready, with its name; the tenant's snapshot that had
    /// the name loses its row, and its id is returned (its files are the caller's to remove).
    pub fn commit_snapshot(
        &self,
        tenant: &str,
        id: &str,
        name: Option<&str>,
    ) -> Result<Option<String>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let replaced: Option<String> = match name {
            Some(name) => tx
                .query_row(
                    "DELETE FROM snapshots WHERE tenant = ?1 AND name = ?2 RETURNING id",
                    params![tenant, name],
                    |r| r.get(0),
                )
                .optional()?,
            None => None,
        };
        tx.execute(
            "UPDATE snapshots SET ready = 1, name = ?2 WHERE id = ?1",
            params![id, name],
        )?;
        tx.commit()?;
        Ok(replaced)
    }

    /// The ready snapshot of `tenant` whose id or name is `key`.
    pub fn snapshot(&self, tenant: &str, key: &str) -> Result<Option<Snapshot>> {
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {SNAPSHOT_COLUMNS} FROM snapshots
                     WHERE tenant = ?1 AND ready = 1 AND (id = ?2 OR name = ?2)"
                ),
                params![tenant, key],
                row_to_snapshot,
            )
            .optional()?)
    }

    /// The ready snapshots of `tenant`, oldest first.
    pub fn snapshots(&self, tenant: &str) -> Result<Vec<Snapshot>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE tenant = ?1 AND ready = 1
             ORDER BY created_at, id"
        ))?;
        let rows = stmt
            .query_map(params![tenant], row_to_snapshot)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// The ids of every snapshot, ready (`true`) or being taken.
    pub fn snapshot_ids(&self) -> Result<Vec<(String, bool)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, ready FROM snapshots")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Removes a snapshot's row.
    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM snapshots WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// Registers (or replaces) a template. Only for callers that checked who may do so and
    /// where its files lie (see `server::templates`): it is shared by every tenant.
    pub fn put_template(&self, t: &Template) -> Result<()> {
        self.conn().execute(
            "INSERT INTO templates (name, kernel, rootfs, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name) DO UPDATE SET kernel = ?2, rootfs = ?3",
            params![t.name, t.kernel, t.rootfs, now()],
        )?;
        Ok(())
    }

    /// All templates by name.
    pub fn templates(&self) -> Result<Vec<Template>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, kernel, rootfs FROM templates ORDER BY name")?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Template {
                    name: r.get(0)?,
                    kernel: r.get(1)?,
                    rootfs: r.get(2)?,
                    snapshot: None,
                    other_snapshots: Vec::new(),
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Appends to the audit log.
    pub fn audit(
        &self,
        tenant: &str,
        action: &str,
        target: &str,
        status: u16,
        detail: &str,
    ) -> Result<()> {
        self.conn().execute(
            "INSERT INTO audit (at, tenant, action, target, status, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![now(), tenant, action, target, status, detail],
        )?;
        Ok(())
    }

    /// The last `n` audit entries, newest last.
    pub fn audit_tail(&self, n: u32) -> Result<Vec<AuditEntry>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT at, tenant, action, target, status FROM
             (SELECT * FROM audit ORDER BY seq DESC LIMIT ?1) ORDER BY seq",
        )?;
        let rows = stmt
            .query_map(params![n], |r| {
                Ok(AuditEntry {
                    at: r.get(0)?,
                    tenant: r.get(1)?,
                    action: r.get(2)?,
                    target: r.get(3)?,
                    status: r.get(4)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }
}

/// The lowest number missing from the sorted list `taken`.
fn lowest_free(taken: &[u32]) -> u32 {
    let mut slot = 0;
    for &t in taken {
        if t != slot {
            break;
        }
        slot += 1;
    }
    slot
}

/// What the sandboxes of `tenant` but `except_id` use. A saved sandbox holds no vCPUs and no
/// memory (no process runs it) but is one of the tenant's sandboxes (its slot, network and
/// files stay), until a resume claims them again.
fn usage(tx: &rusqlite::Transaction<'_>, tenant: &str, except_id: &str) -> Result<Usage> {
    Ok(tx.query_row(
        "SELECT COUNT(*),
             COALESCE(SUM(CASE WHEN state != ?3 OR resuming != 0 THEN vcpus ELSE 0 END), 0),
             COALESCE(SUM(CASE WHEN state != ?3 OR resuming != 0 THEN memory_mib ELSE 0 END), 0)
         FROM sandboxes WHERE tenant = ?1 AND id != ?2",
        params![tenant, except_id, SandboxState::Saved.as_str()],
        |r| {
            Ok(Usage {
                sandboxes: r.get(0)?,
                vcpus: r.get(1)?,
                memory_mib: r.get::<_, i64>(2)? as u64,
            })
        },
    )?)
}

/// Writes the state, process, network and timeout of sandbox `row`.
fn write_row(conn: &rusqlite::Connection, row: &SandboxRow) -> Result<()> {
    conn.execute(
        "UPDATE sandboxes SET state = ?2, pid = ?3, network = ?4, timeout_s = ?5,
             expires_at = ?6, resuming = CASE WHEN state = ?2 THEN resuming ELSE 0 END
         WHERE id = ?1",
        params![
            row.sandbox.id,
            row.sandbox.state.as_str(),
            row.pid,
            json(&row.sandbox.network),
            row.sandbox.timeout_s as i64,
            row.sandbox.expires_at
        ],
    )?;
    Ok(())
}

/// Refuses the save of sandbox `s` past `quota`'s memory on the host's disk (see
/// [`OnDisk`]).
fn check_save_room(tx: &rusqlite::Transaction<'_>, s: &Sandbox, quota: &Quota) -> Result<()> {
    OnDisk::of(tx, &s.tenant)?.check_room(
        &s.tenant,
        quota,
        s.memory_mib,
        &format!("saving sandbox {}", s.id),
    )
}

/// What a tenant keeps on the host's disk: snapshots and saved sandboxes, each with a file
/// of its guest memory.
struct OnDisk {
    /// Its snapshots.
    snapshots: u32,
    /// Their guest memory.
    snapshot_mib: u64,
    /// Its saved sandboxes' guest memory.
    saved_mib: u64,
}

impl OnDisk {
    fn of(tx: &rusqlite::Transaction<'_>, tenant: &str) -> Result<OnDisk> {
        let (snapshots, snapshot_mib): (u32, i64) = tx.query_row(
            "SELECT COUNT(*), COALESCE(SUM(memory_mib), 0) FROM snapshots WHERE tenant = ?1",
            params![tenant],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let saved_mib: i64 = tx.query_row(
            "SELECT COALESCE(SUM(memory_mib), 0) FROM sandboxes WHERE tenant = ?1 AND state = ?2",
            params![tenant, SandboxState::Saved.as_str()],
            |r| r.get(0),
        )?;
        Ok(OnDisk {
            snapshots,
            snapshot_mib: snapshot_mib as u64,
            saved_mib: saved_mib as u64,
        })
    }

    /// Refuses `memory_mib` more (for `what`) past `quota`'s memory.
    fn check_room(&self, tenant: &str, quota: &Quota, memory_mib: u64, what: &str) -> Result<()> {
        let held = self.snapshot_mib + self.saved_mib;
        if held + memory_mib <= quota.max_memory_mib {
            return Ok(());
        }
        Err(Error::Quota(format!(
            "tenant '{tenant}' keeps {held} MiB of guest memory on the host's disk ({} MiB in \
             snapshots, {} MiB in saved sandboxes), of its {} MiB; {what} needs {memory_mib} \
             MiB more: delete a snapshot, or resume or destroy a saved sandbox",
            self.snapshot_mib, self.saved_mib, quota.max_memory_mib
        )))
    }
}

/// Refuses host ports of `s` that another sandbox publishes (checked in the insert's
/// transaction, so two creates cannot both take a port).
fn check_ports_free(tx: &rusqlite::Transaction<'_>, s: &Sandbox) -> Result<()> {
    if s.network.ports.is_empty() {
        return Ok(());
    }
    let mut stmt = tx.prepare("SELECT network FROM sandboxes")?;
    let networks = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    for other in networks
        .iter()
        .filter_map(|n| serde_json::from_str::<NetworkInfo>(n).ok())
    {
        if let Some(p) = s.network.ports.iter().find(|p| {
            other
                .ports
                .iter()
                .any(|o| crate::manager::net::ports_overlap(o, p))
        }) {
            return Err(Error::Conflict(format!(
                "ports: host port {}:{}/{} is already published by another sandbox; choose \
                 another host_port",
                p.host_ip,
                p.host_port,
                p.protocol.as_str()
            )));
        }
    }
    Ok(())
}

fn check_quota(tenant: &str, q: &Quota, used: &Usage, s: &Sandbox) -> Result<()> {
    if used.sandboxes + 1 > q.max_sandboxes {
        return Err(Error::Quota(format!(
            "tenant '{tenant}' has {} of its {} sandboxes; destroy one or raise the quota",
            used.sandboxes, q.max_sandboxes
        )));
    }
    check_resources(tenant, q, used, s)
}

/// Refuses sandbox `s` if its vCPUs or memory do not fit in quota `q` next to `used`.
fn check_resources(tenant: &str, q: &Quota, used: &Usage, s: &Sandbox) -> Result<()> {
    if used.vcpus + s.vcpus > q.max_vcpus {
        return Err(Error::Quota(format!(
            "tenant '{tenant}' uses {} of its {} vCPUs; this sandbox needs {} more",
            used.vcpus, q.max_vcpus, s.vcpus
        )));
    }
    if used.memory_mib + s.memory_mib > q.max_memory_mib {
        return Err(Error::Quota(format!(
            "tenant '{tenant}' uses {} of its {} MiB of memory; this sandbox needs {} MiB more",
            used.memory_mib, q.max_memory_mib, s.memory_mib
        )));
    }
    Ok(())
}

/// Checks a tenant or template name: 1-64 of `a-z A-Z 0-9 - _ .`, not starting with '.'.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{what} name {name:?} is invalid: use 1-64 letters, digits, '-', '_' or '.'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_slot() {
        assert_eq!(lowest_free(&[]), 0);
        assert_eq!(lowest_free(&[0, 1, 2]), 3);
        assert_eq!(lowest_free(&[0, 2, 3]), 1);
        assert_eq!(lowest_free(&[1, 2]), 0);
    }

    #[test]
    fn token_hash_is_stable_and_not_the_token() {
        let h = hash_token("mvm_abc");
        assert_eq!(h.len(), 64);
        assert_eq!(h, hash_token("mvm_abc"));
        assert!(!h.contains("abc"));
    }

    #[test]
    fn admin_flag_defaults_off_and_is_set_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("mvm.db")).unwrap();
        let token = db.create_tenant("team", Quota::default()).unwrap();
        assert!(!db.tenant_for_token(&token).unwrap().unwrap().admin);
        db.set_admin("team", true).unwrap();
        assert!(db.tenant_for_token(&token).unwrap().unwrap().admin);
        // A new token (quota update) keeps the flag.
        db.create_tenant("team", Quota::default()).unwrap();
        assert!(db.tenant("team").unwrap().unwrap().admin);
        db.set_admin("team", false).unwrap();
        assert!(!db.tenant("team").unwrap().unwrap().admin);
        assert!(matches!(
            db.set_admin("nobody", true),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn allowed_isolation_is_set_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("mvm.db")).unwrap();
        db.create_tenant("team", Quota::default()).unwrap();
        assert_eq!(db.tenant("team").unwrap().unwrap().allowed_isolation, None);
        let vm_only = AllowedIsolation {
            vm: true,
            jail: false,
        };
        db.set_allowed_isolation("team", Some(vm_only)).unwrap();
        assert_eq!(
            db.tenant("team").unwrap().unwrap().allowed_isolation,
            Some(vm_only)
        );
        db.set_allowed_isolation("team", None).unwrap();
        assert_eq!(db.tenant("team").unwrap().unwrap().allowed_isolation, None);
        assert!(db.set_allowed_isolation("nobody", None).is_err());
    }

    #[test]
    fn databases_without_the_admin_column_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mvm.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE tenants (name TEXT PRIMARY KEY, max_sandboxes INTEGER NOT NULL,
                    max_vcpus INTEGER NOT NULL, max_memory_mib INTEGER NOT NULL,
                    created_at INTEGER NOT NULL);
                 INSERT INTO tenants VALUES ('default', 1, 1, 1, 0), ('other', 1, 1, 1, 0);",
            )
            .unwrap();
        }
        for _ in 0..2 {
            let db = Db::open(&path).unwrap();
            assert!(db.tenant("default").unwrap().unwrap().admin);
            assert!(!db.tenant("other").unwrap().unwrap().admin);
            assert_eq!(db.tenant("other").unwrap().unwrap().allowed_isolation, None);
        }
    }

    #[test]
    fn concurrent_opens_of_a_new_database_all_succeed() {
        // Concurrent daemonless `mvm` processes open the state database at once.
        for round in 0..30 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("mvm.db");
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(6));
            let opens: Vec<_> = (0..6)
                .map(|_| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        Db::open(&path).map(|db| db.ensure_tenant("default"))
                    })
                })
                .collect();
            for open in opens {
                let opened = open.join().unwrap();
                assert!(
                    matches!(opened, Ok(Ok(_))),
                    "round {round}: {:?}",
                    opened
                        .map(|r| r.map_err(|e| e.to_string()))
                        .map_err(|e| e.to_string())
                );
            }
        }
    }

    /// A warm pool's sandbox becomes a tenant's only within its quota and only once; the
    /// pool's tenant is no name a tenant can have.
    #[test]
    fn a_pooled_sandbox_is_adopted_within_the_quota_and_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("mvm.db")).unwrap();
        let pool = crate::manager::POOL_TENANT;
        assert!(validate_name("tenant", pool).is_err());
        let unlimited = Quota::default();
        db.insert_sandbox(&sandbox("p1", pool), &unlimited).unwrap();
        db.insert_sandbox(&sandbox("t1", "team"), &unlimited)
            .unwrap();
        let one = Quota {
            max_sandboxes: 1,
            ..Quota::default()
        };
        let mut wanted = sandbox("ignored", "team");
        wanted.timeout_s = 60;
        wanted.env.insert("K".into(), "v".into());
        let refused = db.adopt_pooled("p1", pool, &wanted, &one).unwrap_err();
        assert!(matches!(refused, Error::Quota(_)), "{refused}");
        assert_eq!(db.sandbox("p1").unwrap().unwrap().sandbox.tenant, pool);
        let row = db.adopt_pooled("p1", pool, &wanted, &unlimited).unwrap();
        assert_eq!(
            (row.sandbox.id.as_str(), row.sandbox.tenant.as_str()),
            ("p1", "team")
        );
        assert_eq!(row.sandbox.state, SandboxState::Creating);
        assert_eq!((row.sandbox.timeout_s, row.sandbox.env.len()), (60, 1));
        let again = db
            .adopt_pooled("p1", pool, &wanted, &unlimited)
            .unwrap_err();
        assert!(matches!(again, Error::NotFound(_)), "{again}");
    }

    /// A running vm-tier sandbox `id` of `tenant` with 1 vCPU and 256 MiB.
    fn sandbox(id: &str, tenant: &str) -> Sandbox {
        Sandbox {
            id: id.into(),
            tenant: tenant.into(),
            state: SandboxState::Running,
            isolation: Isolation::Vm,
            template: "default".into(),
            vcpus: 1,
            memory_mib: 256,
            timeout_s: 0,
            expires_at: None,
            created_at: now(),
            env: Default::default(),
            network: Default::default(),
            metadata: Default::default(),
            image: None,
            lifecycle: Default::default(),
            snapshot: None,
        }
    }

    /// The snapshot a sandbox was made from is kept with its row, and a database from before
    /// the column gains it (its sandboxes made from none).
    #[test]
    fn a_sandboxs_snapshot_is_kept_and_old_databases_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mvm.db");
        let unlimited = Quota {
            max_sandboxes: 8,
            max_vcpus: 8,
            max_memory_mib: 4096,
        };
        {
            let db = Db::open(&path).unwrap();
            db.insert_sandbox(&sandbox("old", "a"), &unlimited).unwrap();
        }
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("ALTER TABLE sandboxes DROP COLUMN snapshot;")
                .unwrap();
        }
        let db = Db::open(&path).unwrap();
        assert_eq!(db.sandbox("old").unwrap().unwrap().sandbox.snapshot, None);
        let made = Sandbox {
            snapshot: Some("snap-0123456789abcdef".into()),
            ..sandbox("new", "a")
        };
        db.insert_sandbox(&made, &unlimited).unwrap();
        let row = db.sandbox("new").unwrap().expect("its row");
        assert_eq!(
            row.sandbox.snapshot.as_deref(),
            Some("snap-0123456789abcdef")
        );
    }

    /// A tenant's saved sandboxes and snapshots hold at most its memory quota on the host's
    /// disk together (besides what runs): a save past it is refused and leaves the row as it
    /// was, a snapshot past it too; another tenant's count for nothing; a deleted snapshot
    /// makes room.
    #[test]
    fn saved_sandboxes_and_snapshots_share_a_bound_on_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("mvm.db")).unwrap();
        let quota = Quota {
            max_sandboxes: 8,
            max_vcpus: 8,
            max_memory_mib: 512,
        };
        for (id, tenant) in [("s1", "a"), ("s2", "a"), ("s3", "b")] {
            db.insert_sandbox(&sandbox(id, tenant), &quota).unwrap();
        }
        let row = |id: &str| db.sandbox(id).unwrap().expect("its row");
        db.mark_saved(&row("s1"), &quota).unwrap();
        assert_eq!(row("s1").sandbox.state, SandboxState::Saved);
        db.insert_snapshot("a", &snapshot("snap-1", "s2"), &quota)
            .unwrap();
        match db.mark_saved(&row("s2"), &quota) {
            Err(Error::Quota(why)) => assert!(
                why.contains(
                    "512 MiB of guest memory on the host's disk (256 MiB in snapshots, \
                              256 MiB in saved sandboxes)"
                ),
                "{why}"
            ),
            other => panic!("a save past the bound must be refused: {other:?}"),
        }
        assert_eq!(row("s2").sandbox.state, SandboxState::Running);
        assert!(
            matches!(
                db.check_save(&row("s2").sandbox, &quota),
                Err(Error::Quota(_))
            ),
            "refused before it is made, too"
        );
        db.mark_saved(&row("s3"), &quota).unwrap();
        db.delete_snapshot("snap-1").unwrap();
        db.check_save(&row("s2").sandbox, &quota).unwrap();
        db.mark_saved(&row("s2"), &quota).unwrap();
        match db.insert_snapshot("a", &snapshot("snap-2", "s2"), &quota) {
            Err(Error::Quota(why)) => assert!(why.contains("in saved sandboxes"), "{why}"),
            other => panic!("a snapshot past the bound must be refused: {other:?}"),
        }
    }

    /// A snapshot of sandbox `source` with id `id`.
    fn snapshot(id: &str, source: &str) -> Snapshot {
        Snapshot {
            id: id.into(),
            name: None,
            source: source.into(),
            template: "default".into(),
            vcpus: 1,
            memory_mib: 256,
            created_at: now(),
        }
    }

    /// A snapshot being taken is found by nothing; a ready one by its id and its name, by
    /// its tenant alone; a tenant keeps at most as many as its quota's sandboxes, of at most
    /// its memory; a later snapshot given a name takes it over, and the one that had it loses
    /// its row.
    #[test]
    fn snapshots_are_their_tenants_bounded_and_a_name_names_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("mvm.db")).unwrap();
        let quota = Quota {
            max_sandboxes: 2,
            max_vcpus: 2,
            max_memory_mib: 768,
        };
        db.insert_snapshot("a", &snapshot("snap-1", "s1"), &quota)
            .unwrap();
        assert_eq!(db.snapshot("a", "snap-1").unwrap(), None, "not ready yet");
        assert!(db.snapshots("a").unwrap().is_empty());
        assert_eq!(
            db.commit_snapshot("a", "snap-1", Some("kept")).unwrap(),
            None
        );
        let first = db.snapshot("a", "snap-1").unwrap().expect("ready");
        assert_eq!(first.name.as_deref(), Some("kept"));
        assert_eq!(db.snapshot("a", "kept").unwrap(), Some(first.clone()));
        assert_eq!(
            db.snapshot("b", "snap-1").unwrap(),
            None,
            "another tenant's"
        );
        assert_eq!(db.snapshot("b", "kept").unwrap(), None, "another tenant's");
        let big = Snapshot {
            memory_mib: 600,
            ..snapshot("snap-9", "s9")
        };
        match db.insert_snapshot("a", &big, &quota) {
            Err(Error::Quota(why)) => assert!(why.contains("256 MiB of guest memory"), "{why}"),
            other => panic!("snapshots beyond the memory quota must be refused: {other:?}"),
        }
        db.insert_snapshot("a", &snapshot("snap-2", "s2"), &quota)
            .unwrap();
        match db.insert_snapshot("a", &snapshot("snap-3", "s2"), &quota) {
            Err(Error::Quota(why)) => assert!(why.contains("2 snapshots"), "{why}"),
            other => panic!("a third snapshot must be refused: {other:?}"),
        }
        db.insert_snapshot("b", &snapshot("snap-4", "s4"), &quota)
            .unwrap();
        db.commit_snapshot("b", "snap-4", Some("kept")).unwrap();
        // Another tenant's name is its own; this tenant's moves to its newer snapshot.
        assert_eq!(
            db.commit_snapshot("a", "snap-2", Some("kept")).unwrap(),
            Some("snap-1".to_owned())
        );
        assert_eq!(
            db.snapshot("a", "kept").unwrap().expect("kept").id,
            "snap-2"
        );
        assert_eq!(db.snapshot("a", "snap-1").unwrap(), None, "replaced");
        assert_eq!(db.snapshot("b", "kept").unwrap().expect("b's").id, "snap-4");
        let ids: Vec<String> = db
            .snapshots("a")
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, ["snap-2"]);
        db.insert_snapshot("a", &snapshot("snap-5", "s2"), &quota)
            .unwrap();
        let mut all = db.snapshot_ids().unwrap();
        all.sort();
        assert_eq!(
            all,
            [
                ("snap-2".to_owned(), true),
                ("snap-4".to_owned(), true),
                ("snap-5".to_owned(), false)
            ]
        );
        db.delete_snapshot("snap-2").unwrap();
        assert_eq!(db.snapshot("a", "kept").unwrap(), None);
    }

    /// A saved sandbox is one of its tenant's sandboxes but holds none of its vCPUs or
    /// memory; its resume claims them within the quota, and the claim counts at once, until
    /// the row's next state or its end.
    #[test]
    fn a_saved_sandbox_holds_no_resources_until_its_resume_claims_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("mvm.db")).unwrap();
        let quota = Quota {
            max_sandboxes: 3,
            max_vcpus: 8,
            max_memory_mib: 512,
        };
        let set_state = |id: &str, state: SandboxState| {
            let mut row = db.sandbox(id).unwrap().unwrap();
            row.sandbox.state = state;
            db.update_sandbox(&row).unwrap();
            row.sandbox
        };
        let fits = |id: &str| {
            let inserted = db.insert_sandbox(&sandbox(id, "team"), &quota);
            if inserted.is_ok() {
                db.delete_sandbox(id).unwrap();
            }
            inserted.map(drop)
        };
        db.insert_sandbox(&sandbox("a", "team"), &quota).unwrap();
        db.insert_sandbox(&sandbox("b", "team"), &quota).unwrap();
        assert!(matches!(fits("c"), Err(Error::Quota(_))), "512 MiB used");
        let saved = set_state("a", SandboxState::Saved);
        fits("c").expect("a saved sandbox holds no memory");
        db.insert_sandbox(&sandbox("c", "team"), &quota).unwrap();
        let refused = db.claim_resume(&saved, &quota).unwrap_err();
        assert!(
            matches!(&refused, Error::Quota(why) if why.contains("sandbox a cannot be resumed")),
            "{refused}"
        );
        // Refused, nothing is claimed: another sandbox fits in what it would have taken...
        assert!(matches!(fits("d"), Err(Error::Quota(why)) if why.contains("3 of its 3")));
        db.delete_sandbox("c").unwrap();
        fits("c").unwrap();
        // ...and a claim counts before the resume is done.
        db.claim_resume(&saved, &quota).unwrap();
        assert!(matches!(fits("c"), Err(Error::Quota(_))), "claimed for a");
        db.end_resume("a").unwrap();
        fits("c").expect("a resume that failed gives its claim back");
        db.claim_resume(&saved, &quota).unwrap();
        set_state("a", SandboxState::Running);
        assert!(matches!(fits("c"), Err(Error::Quota(_))), "a runs");
        // Saved again, it holds nothing: the earlier claim ended with its state.
        set_state("a", SandboxState::Saved);
        fits("c").unwrap();
        let running = set_state("a", SandboxState::Running);
        let not_saved = db.claim_resume(&running, &quota).unwrap_err();
        assert!(matches!(not_saved, Error::Conflict(_)), "{not_saved}");
    }

    #[test]
    fn names() {
        validate_name("t", "team-a_1.x").unwrap();
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_name("t", bad).is_err(), "{bad:?}");
        }
    }
}
