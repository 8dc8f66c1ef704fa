//! A persistent store in one JSON file, shared safely by several processes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::keys::{KeyDigest, KeyHasher};
use crate::keys::{KeyId, KeyRecord};
use crate::store::{KeyAdmin, KeyStore, MemoryStore, StoreError, Write, WriteError};

const FORMAT: &str = "tower-gateway-auth/keys";
const VERSION: u32 = 1;

/// A [`KeyStore`] kept in a JSON file: digests and public metadata only, never a key.
///
/// - Lookups are served from memory, as fast as [`MemoryStore`]'s.
/// - Writes take an exclusive lock on `<file>.lock`, re-read the file, apply the change
///   (compare-and-swap, see [`Write`]), write a temporary file, `fsync` it, rename it over the
///   old one and `fsync` the directory: a crash leaves the old file or the new one, and two
///   processes writing at once lose nothing.
/// - A tokio task checks the file every second (see [`FileStore::builder`]) and reloads it,
///   on tokio's blocking pool, when another process changed it, so revocations reach a
///   running gateway within seconds. A file that turns corrupt later is reported and the
///   last good content kept. The task runs on the runtime the store was opened in and ends
///   when the store is dropped or that runtime shuts down; the crate starts no thread.
/// - A missing file is created (mode 0600); an unreadable or corrupt one, or one written with
///   another pepper, makes opening fail with an error naming the file, never an empty store.
///
/// ```
/// use std::sync::Arc;
/// use tower_gateway_auth::keys::{KeyManager, NewKey};
/// use tower_gateway_auth::store::FileStore;
///
/// # let dir = std::env::temp_dir().join(format!("tga-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let store = Arc::new(FileStore::open(dir.join("keys.json")).unwrap());
/// let issued = KeyManager::new(store.clone()).issue(NewKey::named("alice")).await.unwrap();
///
/// let reopened = FileStore::open(dir.join("keys.json")).unwrap();
/// assert_eq!(reopened.len(), 1);
/// # });
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub struct FileStore {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    lock_path: PathBuf,
    uses_path: PathBuf,
    index: MemoryStore,
    /// The file as last loaded, so unchanged files are not parsed again.
    loaded: Mutex<Option<Stamp>>,
}

/// Enough of a file's metadata to notice any rewrite (a rename changes the inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Self {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0;
        Stamp {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode,
        }
    }
}

/// The file's layout.
#[derive(Serialize, Deserialize)]
struct KeyFile {
    format: String,
    version: u32,
    hasher: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pepper_check: Option<String>,
    keys: Vec<KeyRecord>,
}

const USES_FORMAT: &str = "tower-gateway-auth/last-used";

/// `<file>.last-used`: when each key was last used, in Unix seconds, by key id. Apart from
/// the key file so that writing it every minute neither rewrites the keys nor makes every
/// process reload them.
#[derive(Serialize, Deserialize)]
struct UsesFile {
    format: String,
    uses: std::collections::BTreeMap<String, u64>,
}

impl Default for UsesFile {
    fn default() -> Self {
        UsesFile {
            format: USES_FORMAT.to_owned(),
            uses: Default::default(),
        }
    }
}

/// Options for [`FileStore`].
#[derive(Debug)]
pub struct FileStoreBuilder {
    path: PathBuf,
    hasher: KeyHasher,
    reload_every: Option<Duration>,
}

impl FileStoreBuilder {
    /// Hash keys with `hasher` (e.g. peppered). A file written with another hasher or
    /// pepper fails to open.
    pub fn hasher(mut self, hasher: KeyHasher) -> Self {
        self.hasher = hasher;
        self
    }

    /// How often to check the file for changes made by other processes (default: every
    /// second); `None` never checks: call [`FileStore::reload`] yourself.
    ///
    /// Checking is a task on the tokio runtime [`open`](Self::open) is called in: opening
    /// with checks turned on outside a runtime fails with an error saying so.
    pub fn reload_every(mut self, every: Option<Duration>) -> Self {
        self.reload_every = every;
        self
    }

    /// Opens the store, creating an empty file when there is none.
    pub fn open(self) -> Result<FileStore, StoreError> {
        let lock_path = sibling(&self.path, ".lock");
        let uses_path = sibling(&self.path, ".last-used");
        let shared = Arc::new(Shared {
            path: self.path,
            lock_path,
            uses_path,
            index: MemoryStore::with_hasher(self.hasher),
            loaded: Mutex::new(None),
        });
        if !shared.path.exists() {
            let _lock = shared.lock()?;
            if !shared.path.exists() {
                shared.write_file(&[])?;
            }
        }
        shared.reload()?;
        if let Some(every) = self.reload_every {
            let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
                StoreError::new(format!(
                    "key file {}: checking it for changes needs a tokio runtime: open the store inside one, or turn checking off with reload_every(None)",
                    shared.path.display()
                ))
            })?;
            runtime.spawn(watch(Arc::downgrade(&shared), every));
        }
        Ok(FileStore { shared })
    }
}

impl FileStore {
    /// Opens (or creates) the store at `path` with plain SHA-256 and a reload every second.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        Self::builder(path).open()
    }

    /// Options for the store at `path`.
    pub fn builder(path: impl Into<PathBuf>) -> FileStoreBuilder {
        FileStoreBuilder {
            path: path.into(),
            hasher: KeyHasher::sha256(),
            reload_every: Some(Duration::from_secs(1)),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Re-reads the file if it changed since it was last read. Returns whether it did.
    pub fn reload(&self) -> Result<bool, StoreError> {
        self.shared.reload()
    }

    /// How many records the store holds.
    pub fn len(&self) -> usize {
        self.shared.index.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.shared.index.is_empty()
    }
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("path", &self.shared.path)
            .field("keys", &self.len())
            .finish()
    }
}

/// Checks the file every `every`, as a tokio task: the library's other background work (the
/// Redis invalidation listener) is a task too, it stops with its runtime instead of
/// outliving it, and the file work goes to the blocking pool the store's writes use. Ends
/// once the store is dropped.
async fn watch(shared: Weak<Shared>, every: Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        ticks.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let result = match tokio::task::spawn_blocking(move || shared.reload()).await {
            Ok(result) => result,
            Err(e) => Err(StoreError::with_source("key file reload task failed", e)),
        };
        match result {
            Ok(_) => last_error = None,
            Err(error) => {
                let text = error.to_string();
                if last_error.as_deref() != Some(&text) {
                    tracing::error!(target: "tower_gateway_auth::store", %error, "key file reload failed; keeping the keys last loaded");
                    last_error = Some(text);
                }
            }
        }
    }
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Writes `body` as JSON to a temporary file (mode 0600), syncs it, renames it over `path`
/// and syncs the directory: a crash leaves the old file or the new one.
fn replace_file(path: &Path, body: &impl Serialize) -> Result<Stamp, StoreError> {
    let temp = sibling(path, &format!(".tmp-{}", std::process::id()));
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let result = (|| {
        let file = options.open(&temp)?;
        let mut out = io::BufWriter::new(file);
        serde_json::to_writer_pretty(&mut out, body)?;
        out.write_all(b"\n")?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Stamp::of(&fs::metadata(path)?))
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&temp);
        describe(path, "cannot be written", e)
    })
}

fn describe(
    path: &Path,
    what: &str,
    error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> StoreError {
    StoreError::with_source(format!("key file {}: {what}", path.display()), error)
}

impl Shared {
    fn hasher(&self) -> &KeyHasher {
        self.index.hasher()
    }

    fn lock(&self) -> Result<File, StoreError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .map_err(|e| describe(&self.lock_path, "cannot open the lock file", e))?;
        file.lock()
            .map_err(|e| describe(&self.lock_path, "cannot lock", e))?;
        Ok(file)
    }

    /// Reads and checks the whole file.
    fn read_file(&self) -> Result<(Vec<KeyRecord>, Stamp), StoreError> {
        let path = &self.path;
        let file = File::open(path).map_err(|e| describe(path, "cannot be read", e))?;
        let meta = file
            .metadata()
            .map_err(|e| describe(path, "cannot be read", e))?;
        if !meta.is_file() {
            return Err(StoreError::new(format!(
                "key file {}: is not a regular file",
                path.display()
            )));
        }
        let stamp = Stamp::of(&meta);
        let parsed: KeyFile = serde_json::from_reader(io::BufReader::new(file))
            // Only where and what kind: serde's own text can quote a value (a digest) back.
            .map_err(|e| {
                StoreError::new(format!(
                    "key file {}: is corrupt ({:?} error at line {} column {})",
                    path.display(),
                    e.classify(),
                    e.line(),
                    e.column()
                ))
            })?;
        if parsed.format != FORMAT || parsed.version != VERSION {
            return Err(StoreError::new(format!(
                "key file {}: not a version {VERSION} {FORMAT} file",
                path.display()
            )));
        }
        if parsed.hasher != self.hasher().name()
            || parsed.pepper_check != self.hasher().pepper_check()
        {
            return Err(StoreError::new(format!(
                "key file {}: its keys were hashed with another hasher or pepper ({})",
                path.display(),
                parsed.hasher
            )));
        }
        let mut seen = std::collections::HashSet::with_capacity(parsed.keys.len());
        if let Some(dup) = parsed.keys.iter().find(|r| !seen.insert(*r.digest())) {
            return Err(StoreError::new(format!(
                "key file {}: is corrupt: two records share the digest of {}",
                path.display(),
                dup.id()
            )));
        }
        Ok((parsed.keys, stamp))
    }

    /// Writes `records` to the key file. Callers hold the lock.
    fn write_file(&self, records: &[&KeyRecord]) -> Result<Stamp, StoreError> {
        let body = KeyFileRef {
            format: FORMAT,
            version: VERSION,
            hasher: self.hasher().name(),
            pepper_check: self.hasher().pepper_check(),
            keys: records,
        };
        replace_file(&self.path, &body)
    }

    /// The last-used times beside the key file (none if it is missing).
    fn read_uses(&self) -> Result<UsesFile, StoreError> {
        let path = &self.uses_path;
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(UsesFile::default()),
            Err(e) => return Err(describe(path, "cannot be read", e)),
        };
        let parsed: UsesFile = serde_json::from_reader(io::BufReader::new(file))
            .map_err(|e| describe(path, "is corrupt", e))?;
        if parsed.format != USES_FORMAT {
            return Err(StoreError::new(format!(
                "last-used file {}: not a {USES_FORMAT} file",
                path.display()
            )));
        }
        Ok(parsed)
    }

    /// Merges `uses` into the last-used file, under the lock, keeping the later time of
    /// each key and only keys the key file still holds.
    fn note_uses(&self, uses: Vec<(KeyId, crate::clock::Timestamp)>) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        self.reload()?;
        let mut file = self.read_uses()?;
        for (id, at) in uses {
            let stored = file.uses.entry(id.to_string()).or_default();
            *stored = (*stored).max(at.as_unix_secs());
        }
        let ids: std::collections::HashSet<String> = self
            .index
            .records()
            .iter()
            .map(|r| r.id().to_string())
            .collect();
        file.uses.retain(|id, _| ids.contains(id));
        replace_file(&self.uses_path, &file).map(|_| ())
    }
    fn reload(&self) -> Result<bool, StoreError> {
        let stamp = fs::metadata(&self.path)
            .map(|m| Stamp::of(&m))
            .map_err(|e| describe(&self.path, "cannot be read", e))?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if *loaded == Some(stamp) {
            return Ok(false);
        }
        let (records, stamp) = self.read_file()?;
        let count = records.len();
        self.index.replace_all(records.into_iter().map(Arc::new));
        *loaded = Some(stamp);
        tracing::debug!(target: "tower_gateway_auth::store", keys = count, path = %self.path.display(), "key file loaded");
        Ok(true)
    }

    /// Applies `writes` to the file as it is on disk now, under the lock.
    fn apply(&self, writes: Vec<Write>) -> Result<(), WriteError> {
        let _lock = self.lock()?;
        let (records, _) = self.read_file()?;
        let scratch = MemoryStore::with_hasher(self.hasher().clone());
        scratch.replace_all(records.into_iter().map(Arc::new));
        scratch.apply_now(writes)?;
        let mut all = scratch.records();
        all.sort_by_key(|r| (r.created_at(), r.id()));
        let stamp = self.write_file(&all.iter().map(|r| &**r).collect::<Vec<_>>())?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        self.index.replace_all(all);
        *loaded = Some(stamp);
        Ok(())
    }
}

/// [`KeyFile`] for writing, borrowing the records.
#[derive(Serialize)]
struct KeyFileRef<'a> {
    format: &'a str,
    version: u32,
    hasher: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pepper_check: Option<String>,
    keys: &'a [&'a KeyRecord],
}

impl KeyStore for FileStore {
    type Lookup = <MemoryStore as KeyStore>::Lookup;

    fn lookup(&self, digest: &KeyDigest) -> Self::Lookup {
        self.shared.index.lookup(digest)
    }

    fn hasher(&self) -> &KeyHasher {
        self.shared.hasher()
    }
}

/// File work is blocking: it runs on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, WriteError> + Send + 'static,
) -> Result<T, WriteError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| WriteError::Store(StoreError::with_source("key file task failed", e)))?
}

fn store_error(e: WriteError) -> StoreError {
    match e {
        WriteError::Store(e) => e,
        WriteError::Conflict | WriteError::TooManyChildren { .. } => {
            StoreError::new("unexpected write conflict while reading")
        }
    }
}

impl KeyAdmin for FileStore {
    async fn get(&self, id: KeyId) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        let shared = self.shared.clone();
        blocking(move || {
            shared.reload()?;
            Ok(shared.index.by_id(id))
        })
        .await
        .map_err(store_error)
    }

    async fn list(&self) -> Result<Vec<Arc<KeyRecord>>, StoreError> {
        let shared = self.shared.clone();
        blocking(move || {
            shared.reload()?;
            Ok(shared.index.records())
        })
        .await
        .map_err(store_error)
    }

    async fn apply(&self, writes: Vec<Write>) -> Result<(), WriteError> {
        let shared = self.shared.clone();
        blocking(move || shared.apply(writes)).await
    }

    async fn note_uses(
        &self,
        uses: Vec<(KeyId, crate::clock::Timestamp)>,
    ) -> Result<(), StoreError> {
        let shared = self.shared.clone();
        blocking(move || Ok(shared.note_uses(uses)?))
            .await
            .map_err(store_error)
    }

    async fn last_used(
        &self,
        ids: Vec<KeyId>,
    ) -> Result<Vec<Option<crate::clock::Timestamp>>, StoreError> {
        let shared = self.shared.clone();
        blocking(move || {
            shared.reload()?;
            let file = shared.read_uses()?;
            // A key deleted since its last use was written has no last use.
            let stored: std::collections::HashSet<KeyId> =
                shared.index.records().iter().map(|r| r.id()).collect();
            Ok(ids
                .iter()
                .map(|id| {
                    let secs = file
                        .uses
                        .get(&id.to_string())
                        .filter(|_| stored.contains(id));
                    secs.map(|&secs| crate::clock::Timestamp::from_unix_secs(secs))
                })
                .collect())
        })
        .await
        .map_err(store_error)
    }
}
