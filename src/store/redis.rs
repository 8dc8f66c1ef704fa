//! A store shared by several gateway replicas, in Redis (feature `redis`).

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use redis::AsyncCommands;

use crate::redis_connection::{self, ConnectError, RedisConnection, Timeouts};

use crate::clock::Timestamp;
use crate::keys::{KeyDigest, KeyHasher};
use crate::keys::{KeyId, KeyRecord};
use crate::store::{BoxLookup, CachedStore, KeyAdmin, KeyStore, StoreError, Write, WriteError};

/// Checks every write against what is stored, then applies them all and announces each
/// changed digest on the invalidation channel, in one atomic step. `ARGV`: namespace, write
/// count, then eleven fields a write: kind, digest, id, expected JSON (of the parent, for a
/// mint), new JSON, expiry, parent id, parent digest, live-children limit, now, and the
/// record's score in its parent's set of live children (empty: not live).
///
/// A parent's live children are a sorted set scored by expiry, so a mint drops the expired
/// ones and counts the rest in O(log n), and drops from the id set the ids whose records
/// Redis has expired: no expired ephemeral id stays behind in the index.
const APPLY: &str = r"
local ns = ARGV[1]
local n = tonumber(ARGV[2])
local ops = {}
for k = 1, n do
  local i = 3 + (k - 1) * 11
  local op = {kind = ARGV[i], digest = ARGV[i + 1], id = ARGV[i + 2], old = ARGV[i + 3],
              new = ARGV[i + 4], expire = tonumber(ARGV[i + 5]), parent = ARGV[i + 6],
              pdigest = ARGV[i + 7], limit = tonumber(ARGV[i + 8]), now = tonumber(ARGV[i + 9]),
              score = ARGV[i + 10]}
  local current = redis.call('GET', ns .. ':k:' .. op.digest)
  if op.kind == 'insert' or op.kind == 'mint' then
    if current then return 0 end
  elseif current ~= op.old then
    return 0
  end
  if op.kind == 'mint' then
    if redis.call('GET', ns .. ':k:' .. op.pdigest) ~= op.old then return 0 end
    local kids = ns .. ':children:' .. op.parent
    for _, gone in ipairs(redis.call('ZRANGEBYSCORE', kids, '-inf', op.now)) do
      redis.call('ZREM', kids, gone)
      if redis.call('EXISTS', ns .. ':id:' .. gone) == 0 then
        redis.call('SREM', ns .. ':ids', gone)
      end
    end
    if redis.call('ZCARD', kids) >= op.limit then return 2 end
  end
  ops[k] = op
end
for k = 1, n do
  local op = ops[k]
  local key, idkey = ns .. ':k:' .. op.digest, ns .. ':id:' .. op.id
  if op.kind == 'remove' then
    redis.call('DEL', key, idkey)
    redis.call('SREM', ns .. ':ids', op.id)
    redis.call('HDEL', ns .. ':used', op.id)
  else
    redis.call('SET', key, op.new)
    redis.call('SET', idkey, op.digest)
    redis.call('SADD', ns .. ':ids', op.id)
    if op.expire > 0 then
      redis.call('EXPIREAT', key, op.expire)
      redis.call('EXPIREAT', idkey, op.expire)
    end
  end
  if op.parent ~= '' then
    local kids = ns .. ':children:' .. op.parent
    if op.kind ~= 'remove' and op.score ~= '' then
      redis.call('ZADD', kids, op.score, op.id)
      local last = redis.call('ZRANGE', kids, -1, -1, 'WITHSCORES')
      if last[2] and last[2] ~= 'inf' then redis.call('EXPIREAT', kids, last[2]) end
    else
      redis.call('ZREM', kids, op.id)
    end
  end
  redis.call('PUBLISH', ns .. ':invalidate', op.digest)
end
return 1
";

/// Notes last uses (`ARGV`: namespace, then id and Unix seconds pairs) in the hash
/// `KEYS[1]` (`{<ns>}:used`), keeping the later time per id, for ids that have a record.
const NOTE_USES: &str = r"
local ns = ARGV[1]
for i = 2, #ARGV, 2 do
  local id, at = ARGV[i], tonumber(ARGV[i + 1])
  if redis.call('EXISTS', ns .. ':id:' .. id) == 1 then
    local stored = tonumber(redis.call('HGET', KEYS[1], id) or '0')
    if at > stored then redis.call('HSET', KEYS[1], id, at) end
  end
end
return 1
";

/// A [`KeyStore`] in Redis or Redis Cluster, shared by every replica of a gateway.
///
/// - Records are stored as JSON under `{<namespace>}:k:<digest>`, with `{<namespace>}:id:<id>`
///   pointing to the digest and `{<namespace>}:ids` listing ids: digests and public metadata
///   only, never a key. The braces are a Cluster hash tag: every key of a namespace is in
///   one slot, so that one script can check and change several records atomically on a
///   Cluster too (a namespace's keys then live on one master; the rate limiter's keys, which
///   are many more and busier, are spread by key id).
/// - [`KeyAdmin::apply`] runs as one Lua script: the compare-and-swap checks and all the
///   writes happen atomically, and every changed digest is published on
///   `{<namespace>}:invalidate`. Ephemeral keys get a Redis TTL at their expiry.
/// - The connection reconnects by itself after Redis restarts; on a Cluster it follows the
///   slots as they move.
/// - The address is one URL, or a Cluster's seed nodes joined by commas
///   (`redis://10.0.0.1:7000,redis://10.0.0.2:7000`); one URL that leads to a Cluster node
///   is used as a Cluster.
/// - Versions before the hash tag kept keys under `<namespace>:`; connecting to a
///   standalone Redis that holds only that layout renames its keys to the new one (once, in
///   place, keeping their TTLs), so an upgrade keeps every key.
/// - Put it behind a [`CachedStore`] (see [`RedisStore::cached`]) so that requests do not
///   cost a round trip each; the cache listens to the invalidation channel, so a revocation
///   reaches every replica at once.
///
/// - `{<namespace>}:hasher` records how digests are made (`sha256`, or `hmac-sha256` and a
///   check value of the pepper): connecting with another hasher or pepper fails with an
///   error naming the namespace, instead of every key silently failing to verify.
/// - A record that cannot be read (corrupt JSON) is skipped by [`KeyAdmin::list`] with a
///   warning naming its id, so one bad value cannot stop revocations and purges.
///
#[derive(Clone)]
pub struct RedisStore {
    /// A client of each node, for the invalidation listener.
    nodes: Arc<[redis::Client]>,
    connection: RedisConnection,
    /// `{<namespace>}`: the prefix of every key.
    prefix: Arc<str>,
    namespace: Arc<str>,
    hasher: KeyHasher,
}

/// Options for a [`RedisStore`], from [`RedisStore::builder`].
///
/// ```no_run
/// # async fn doc() -> Result<(), tower_gateway_auth::store::StoreError> {
/// use tower_gateway_auth::keys::KeyHasher;
/// use tower_gateway_auth::store::RedisStore;
///
/// let store = RedisStore::builder("redis://127.0.0.1:6379")
///     .namespace("gateway-eu")
///     .hasher(KeyHasher::with_pepper(b"a pepper of at least 16 bytes"))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
pub struct RedisStoreBuilder {
    url: String,
    namespace: String,
    hasher: KeyHasher,
}

impl RedisStoreBuilder {
    /// The prefix of every Redis key the store uses (default: `tga`), so that several
    /// gateways can share one Redis.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// How presented keys are digested (default: plain SHA-256), e.g.
    /// [`KeyHasher::with_pepper`]. Connecting fails when the namespace's keys were digested
    /// with another hasher or pepper.
    pub fn hasher(mut self, hasher: KeyHasher) -> Self {
        self.hasher = hasher;
        self
    }

    /// Connects, and checks (or, on first use, records) the namespace's hasher.
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        let RedisStoreBuilder {
            url,
            namespace,
            hasher,
        } = self;
        let timeouts = Timeouts {
            connect: Duration::from_millis(500),
            response: Duration::from_secs(1),
        };
        let connected = redis_connection::connect(&url, timeouts)
            .await
            .map_err(|e| connect_error(&namespace, e))?;
        let prefix = format!("{{{namespace}}}");
        let mut connection = connected.connection.clone();
        if !connected.is_cluster() {
            migrate_layout(&mut connection, &namespace, &prefix).await?;
        }
        check_hasher(&mut connection, &namespace, &prefix, &hasher).await?;
        Ok(RedisStore {
            nodes: connected.nodes.into(),
            connection,
            prefix: prefix.into(),
            namespace: namespace.into(),
            hasher,
        })
    }
}

/// The URL is left out: it may hold a password.
impl std::fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("namespace", &self.namespace)
            .field("hasher", &self.hasher)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379`), namespace `tga`, plain SHA-256.
    /// For other settings, see [`builder`](Self::builder).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder(url).connect().await
    }

    /// Options for a store at `url` (e.g. `redis://127.0.0.1:6379`): namespace `tga`, plain
    /// SHA-256 unless told otherwise.
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            namespace: "tga".to_owned(),
            hasher: KeyHasher::sha256(),
        }
    }

    /// This store behind a [`CachedStore`] with default settings that drops entries as soon
    /// as any replica announces a change (see [`listen_for_invalidations`]). For other cache
    /// settings, build the `CachedStore` yourself, then start the listener.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), tower_gateway_auth::store::StoreError> {
    /// use std::time::Duration;
    /// use tower_gateway_auth::store::{CachedStore, RedisStore, listen_for_invalidations};
    ///
    /// let redis = RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// let cache = CachedStore::builder(redis).ttl(Duration::from_secs(60)).build();
    /// let _listener = listen_for_invalidations(&cache);
    /// # Ok(()) }
    /// ```
    pub fn cached(self) -> CachedStore<RedisStore> {
        let cache = CachedStore::new(self);
        listen_for_invalidations(&cache);
        cache
    }

    /// The channel changes are announced on.
    pub fn channel(&self) -> String {
        format!("{}:invalidate", self.prefix)
    }

    fn record_key(&self, digest: &KeyDigest) -> String {
        format!("{}:k:{}", self.prefix, digest.to_hex())
    }

    fn id_key(&self, id: KeyId) -> String {
        format!("{}:id:{id}", self.prefix)
    }

    fn ids_key(&self) -> String {
        format!("{}:ids", self.prefix)
    }

    fn used_key(&self) -> String {
        format!("{}:used", self.prefix)
    }

    fn parse(json: &str) -> Result<Arc<KeyRecord>, StoreError> {
        // Only where and what kind: serde's own text can quote a value (a digest) back.
        serde_json::from_str(json).map(Arc::new).map_err(|e| {
            StoreError::new(format!(
                "a record in Redis is corrupt ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })
    }
}

fn connect_error(namespace: &str, e: ConnectError) -> StoreError {
    StoreError::with_source(format!("{e} (key store namespace {namespace})"), e)
}

/// Moves a namespace kept in the layout without the hash tag (`<namespace>:…`, before
/// Cluster support) to `{<namespace>}:…`, when only the old layout is there.
async fn migrate_layout(
    connection: &mut RedisConnection,
    namespace: &str,
    prefix: &str,
) -> Result<(), StoreError> {
    let old_hasher = format!("{namespace}:hasher");
    let new_hasher = format!("{prefix}:hasher");
    let (old, new): (bool, bool) = redis::pipe()
        .exists(&old_hasher)
        .exists(&new_hasher)
        .query_async(connection)
        .await
        .map_err(redis_error)?;
    if !old || new {
        return Ok(());
    }
    let pattern = format!("{}:*", glob_escape(namespace));
    let mut cursor = 0u64;
    let mut moved = 0usize;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(connection)
            .await
            .map_err(redis_error)?;
        for key in keys {
            // Only this namespace's own keys: `tga:*` also matches another namespace
            // called `tga:eu`.
            let Some(rest) = key.strip_prefix(namespace).filter(|rest| {
                matches!(*rest, ":hasher" | ":ids")
                    || [":k:", ":id:", ":children:"]
                        .iter()
                        .any(|kind| rest.starts_with(kind))
            }) else {
                continue;
            };
            // Another replica moving the same namespace at once may have taken it: fine.
            let renamed: Result<(), _> = connection.rename(&key, format!("{prefix}{rest}")).await;
            moved += usize::from(renamed.is_ok());
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    tracing::info!(target: "tower_gateway_auth::store", namespace, moved, "moved the namespace's Redis keys under its hash tag");
    Ok(())
}

/// `text` as a literal in a Redis glob pattern.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Records the namespace's hasher on first use, and refuses a hasher or pepper other than
/// the one recorded.
async fn check_hasher(
    connection: &mut RedisConnection,
    namespace: &str,
    prefix: &str,
    hasher: &KeyHasher,
) -> Result<(), StoreError> {
    let label = match hasher.pepper_check() {
        Some(check) => format!("{} {check}", hasher.name()),
        None => hasher.name().to_owned(),
    };
    let key = format!("{prefix}:hasher");
    let _: bool = connection.set_nx(&key, &label).await.map_err(redis_error)?;
    let recorded: Option<String> = connection.get(&key).await.map_err(redis_error)?;
    match recorded {
        Some(recorded) if recorded != label => Err(StoreError::new(format!(
            "Redis namespace {namespace}: its keys were hashed with another hasher or pepper ({}); start with the pepper the keys were issued under",
            recorded.split(' ').next().unwrap_or_default()
        ))),
        _ => Ok(()),
    }
}

fn redis_error(e: redis::RedisError) -> StoreError {
    StoreError::with_source("Redis failed", e)
}

/// Keeps `cache` in step with the announcements on the store's channel: the caches of every
/// replica then drop a revoked or rotated key at once. The listener is a tokio task; it
/// reconnects by itself, empties the cache after each (re)subscription (announcements may
/// have been missed meanwhile), and ends when the cache is dropped.
pub fn listen_for_invalidations(cache: &CachedStore<RedisStore>) -> InvalidationListener {
    let (ready, subscribed) = tokio::sync::watch::channel(false);
    let weak = cache.downgrade();
    let nodes = cache.inner().nodes.clone();
    let channel = cache.inner().channel();
    let task = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        // A Cluster relays every PUBLISH to every node: any one node will do, and the next
        // is tried when one cannot be reached.
        for node in (0..nodes.len()).cycle() {
            match nodes[node].get_async_pubsub().await {
                Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                    Ok(()) => {
                        backoff = Duration::from_millis(100);
                        let Some(cache) = CachedStore::from_handle(&weak) else {
                            return;
                        };
                        // Announcements made while we were not listening are lost.
                        cache.invalidate_all();
                        drop(cache);
                        ready.send_replace(true);
                        let mut messages = pubsub.on_message();
                        while let Some(message) =
                            poll_fn(|cx| Pin::new(&mut messages).poll_next(cx)).await
                        {
                            let Some(cache) = CachedStore::from_handle(&weak) else {
                                return;
                            };
                            match std::str::from_utf8(message.get_payload_bytes())
                                .ok()
                                .and_then(KeyDigest::from_hex)
                            {
                                Some(digest) => cache.invalidate(&digest),
                                None => cache.invalidate_all(),
                            }
                        }
                        tracing::warn!(target: "tower_gateway_auth::store", "lost the Redis invalidation channel; reconnecting");
                    }
                    Err(error) => {
                        tracing::warn!(target: "tower_gateway_auth::store", %error, "cannot subscribe to Redis invalidations")
                    }
                },
                Err(error) => {
                    tracing::warn!(target: "tower_gateway_auth::store", %error, "cannot reach Redis for invalidations")
                }
            }
            if weak.strong_count() == 0 {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    });
    InvalidationListener { task, subscribed }
}

/// The task [`listen_for_invalidations`] started. Dropping this handle leaves it running
/// (it ends with the cache); [`abort`](Self::abort) stops it.
#[derive(Debug)]
pub struct InvalidationListener {
    task: tokio::task::JoinHandle<()>,
    subscribed: tokio::sync::watch::Receiver<bool>,
}

impl InvalidationListener {
    /// Waits until the listener has subscribed once (announcements from then on reach the
    /// cache), e.g. before a gateway starts serving.
    pub async fn subscribed(&mut self) {
        // An error means the task ended, which only happens with the cache gone.
        let _ = self.subscribed.wait_for(|s| *s).await;
    }

    /// Whether the listener has subscribed at least once, without waiting.
    pub fn is_subscribed(&self) -> bool {
        *self.subscribed.borrow()
    }

    /// A receiver that turns `true` once the listener has subscribed (and stays so through
    /// later reconnections): cloneable, for a readiness probe that outlives this handle.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), tower_gateway_auth::store::StoreError> {
    /// use tower_gateway_auth::store::{RedisStore, CachedStore, listen_for_invalidations};
    ///
    /// let cache = CachedStore::new(RedisStore::connect("redis://127.0.0.1:6379").await?);
    /// let ready = listen_for_invalidations(&cache).subscription();
    /// // In the readiness probe:
    /// let status = if *ready.borrow() { 200 } else { 503 };
    /// # let _ = status;
    /// # Ok(()) }
    /// ```
    pub fn subscription(&self) -> tokio::sync::watch::Receiver<bool> {
        self.subscribed.clone()
    }

    /// Stops listening.
    pub fn abort(&self) {
        self.task.abort();
    }
}

impl KeyStore for RedisStore {
    type Lookup = BoxLookup;

    fn lookup(&self, digest: &KeyDigest) -> BoxLookup {
        let mut connection = self.connection.clone();
        let key = self.record_key(digest);
        Box::pin(async move {
            let json: Option<String> = connection.get(&key).await.map_err(redis_error)?;
            json.as_deref().map(RedisStore::parse).transpose()
        })
    }

    fn hasher(&self) -> &KeyHasher {
        &self.hasher
    }
}

impl KeyAdmin for RedisStore {
    async fn get(&self, id: KeyId) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        let mut connection = self.connection.clone();
        let digest: Option<String> = connection.get(self.id_key(id)).await.map_err(redis_error)?;
        let Some(digest) = digest.as_deref().and_then(KeyDigest::from_hex) else {
            return Ok(None);
        };
        let json: Option<String> = connection
            .get(self.record_key(&digest))
            .await
            .map_err(redis_error)?;
        json.as_deref().map(RedisStore::parse).transpose()
    }

    async fn list(&self) -> Result<Vec<Arc<KeyRecord>>, StoreError> {
        let mut connection = self.connection.clone();
        let ids: Vec<String> = connection
            .smembers(self.ids_key())
            .await
            .map_err(redis_error)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let id_keys: Vec<String> = ids
            .iter()
            .map(|id| format!("{}:id:{id}", self.prefix))
            .collect();
        let digests: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&id_keys)
            .query_async(&mut connection)
            .await
            .map_err(redis_error)?;
        // Ids whose records expired (ephemeral keys) have no digest any more: they leave
        // the index now.
        let (live, dead): (Vec<_>, Vec<_>) = ids
            .iter()
            .zip(&digests)
            .partition(|(_, digest)| digest.is_some());
        if !dead.is_empty() {
            let dead: Vec<&String> = dead.into_iter().map(|(id, _)| id).collect();
            let _: i64 = connection
                .srem(self.ids_key(), &dead)
                .await
                .map_err(redis_error)?;
            let _: i64 = connection
                .hdel(self.used_key(), &dead)
                .await
                .map_err(redis_error)?;
        }
        let (ids, record_keys): (Vec<&String>, Vec<String>) = live
            .into_iter()
            .filter_map(|(id, digest)| {
                let digest = KeyDigest::from_hex(digest.as_deref()?)?;
                Some((id, self.record_key(&digest)))
            })
            .unzip();
        if record_keys.is_empty() {
            return Ok(Vec::new());
        }
        let records: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&record_keys)
            .query_async(&mut connection)
            .await
            .map_err(redis_error)?;
        let mut all = Vec::with_capacity(records.len());
        for (id, json) in ids.into_iter().zip(records) {
            let Some(json) = json else { continue };
            match RedisStore::parse(&json) {
                Ok(record) => all.push(record),
                // One unreadable value must not stop revoking and purging every other key.
                Err(error) => {
                    tracing::warn!(target: "tower_gateway_auth::store", key_id = %id, %error, "skipping a key record in Redis that cannot be read")
                }
            }
        }
        Ok(all)
    }

    async fn apply(&self, writes: Vec<Write>) -> Result<(), WriteError> {
        let json = |r: &KeyRecord| serde_json::to_string(r).expect("records serialize");
        static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
        let mut invocation = SCRIPT
            .get_or_init(|| redis::Script::new(APPLY))
            .prepare_invoke();
        // The one declared key routes the script to the namespace's slot on a Cluster; every
        // key it touches shares that slot's hash tag.
        invocation
            .key(self.ids_key())
            .arg(&*self.prefix)
            .arg(writes.len());
        for write in &writes {
            let record = write.record();
            let (kind, old, limit, now) = match write {
                Write::Insert(_) => ("insert", String::new(), 0, 0),
                Write::Replace { old, .. } => ("replace", json(old), 0, 0),
                Write::Remove(old) => ("remove", json(old), 0, 0),
                Write::Mint {
                    parent,
                    max_live,
                    now,
                    ..
                } => ("mint", json(parent), *max_live, now.as_unix_secs()),
            };
            // Ephemeral keys vanish from Redis by themselves at their expiry.
            let expire = match (record.parent(), record.expires_at()) {
                (Some(_), Some(at)) => at.as_unix_secs(),
                _ => 0,
            };
            let new = if kind == "remove" {
                String::new()
            } else {
                json(record)
            };
            let (parent, parent_digest) = match write {
                Write::Mint { parent, .. } => (parent.id().to_string(), parent.digest().to_hex()),
                _ => (
                    record.parent().map(|p| p.to_string()).unwrap_or_default(),
                    String::new(),
                ),
            };
            let score = if record.status() == crate::keys::KeyStatus::Revoked {
                String::new()
            } else {
                record
                    .expires_at()
                    .map_or("+inf".to_owned(), |t| t.as_unix_secs().to_string())
            };
            invocation
                .arg(kind)
                .arg(record.digest().to_hex())
                .arg(record.id().to_string())
                .arg(old)
                .arg(new)
                .arg(expire)
                .arg(parent)
                .arg(parent_digest)
                .arg(limit)
                .arg(now)
                .arg(score);
        }
        let mut connection = self.connection.clone();
        let applied: i64 = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|e| WriteError::Store(redis_error(e)))?;
        match applied {
            1 => Ok(()),
            2 => Err(WriteError::TooManyChildren {
                max_live: writes
                    .iter()
                    .find_map(|w| match w {
                        Write::Mint { max_live, .. } => Some(*max_live),
                        _ => None,
                    })
                    .unwrap_or_default(),
            }),
            _ => Err(WriteError::Conflict),
        }
    }

    async fn note_uses(&self, uses: Vec<(KeyId, Timestamp)>) -> Result<(), StoreError> {
        if uses.is_empty() {
            return Ok(());
        }
        static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
        let mut invocation = SCRIPT
            .get_or_init(|| redis::Script::new(NOTE_USES))
            .prepare_invoke();
        invocation.key(self.used_key()).arg(&*self.prefix);
        for (id, at) in &uses {
            invocation.arg(id.to_string()).arg(at.as_unix_secs());
        }
        let mut connection = self.connection.clone();
        let _: i64 = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    async fn last_used(&self, ids: Vec<KeyId>) -> Result<Vec<Option<Timestamp>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut connection = self.connection.clone();
        let fields: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
        let times: Vec<Option<u64>> = redis::cmd("HMGET")
            .arg(self.used_key())
            .arg(&fields)
            .query_async(&mut connection)
            .await
            .map_err(redis_error)?;
        Ok(times
            .into_iter()
            .map(|t| t.map(Timestamp::from_unix_secs))
            .collect())
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("namespace", &self.namespace)
            .field("hasher", &self.hasher)
            .finish_non_exhaustive()
    }
}
