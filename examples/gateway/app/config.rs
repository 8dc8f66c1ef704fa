//! The gateway's TOML configuration, checked field by field: a mistake stops start-up with
//! a message that names the field.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;
use tower_gateway_auth::cors::CorsLayer;
use tower_gateway_auth::inbound::KeySource;
use tower_gateway_auth::jwt::{Accept, Algorithm, JwtVerifier};
use tower_gateway_auth::keys::{KeyFormat, KeyHasher};
use tower_gateway_auth::limit::{self, ModelList, Rate};
use tower_gateway_auth::rejection::ErrorFormat;
use tower_gateway_auth::upstream::Provider;
use tower_gateway_auth::upstream::{ClientAuth, ClientCredentials, Credential};

use super::serve::Limits;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The file store written by the keygen example; without it (or `redis_url`), an
    /// in-memory store holds one fresh key printed at start-up.
    pub keys_file: Option<PathBuf>,
    /// A Redis shared by several gateway replicas, in place of `keys_file`: one URL, or a
    /// Redis Cluster's seed nodes (a list, or one string joined by commas).
    #[serde(default, deserialize_with = "addresses")]
    pub redis_url: Option<String>,
    /// The key prefix in Redis (several gateways on one Redis).
    #[serde(default = "default_redis_namespace")]
    pub redis_namespace: String,
    #[serde(default = "default_sources")]
    pub sources: Vec<String>,
    #[serde(default = "default_error_format")]
    pub error_format: String,
    /// Mounts the management API at /admin/keys, for keys with this scope.
    pub admin_scope: Option<String>,
    /// An environment variable holding a server-side pepper for key digests.
    pub pepper_env: Option<String>,
    /// The prefix of generated keys; a key with it and a bad checksum is rejected unread.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// How often the keys file is checked for changes by other processes.
    #[serde(default = "default_reload_ms")]
    pub reload_ms: u64,
    /// How many live ephemeral keys one key may have at a time (`POST /admin/ephemeral`).
    #[serde(default = "default_max_ephemeral_per_key")]
    pub max_ephemeral_per_key: usize,
    /// A JSON-lines file the key-management audit trail is appended to (besides the log).
    #[serde(default)]
    pub audit_file: Option<PathBuf>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Keeps a client's well-formed `x-request-id` (1 to 128 of `[A-Za-z0-9._:-]`), so that
    /// one id follows a request through the client's logs, ours and the provider's; `false`
    /// always makes a fresh one. A malformed id is replaced either way.
    #[serde(default = "default_keep_client_request_id")]
    pub keep_client_request_id: bool,
    /// Worker threads. `1` runs the whole gateway on one thread (tokio's current-thread
    /// runtime, like nginx's `worker_processes 1`); unset, one per CPU.
    pub workers: Option<usize>,
    /// Serves Prometheus metrics at `GET /metrics` on this address (a listener of its own);
    /// unset, no metrics listener.
    pub metrics_listen: Option<String>,
    /// Also counts requests by key id, for at most this many keys a route (later ones as
    /// `key="other"`); unset, no per-key series.
    pub metrics_key_labels: Option<usize>,
    /// `text` (default) or `json`: the format of every log line, the access log's included.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// Limits on client connections.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where per-key limits are counted.
    #[serde(default)]
    pub limiter: LimiterConfig,
    /// User tokens (JWTs) accepted beside API keys.
    pub jwt: Option<JwtConfig>,
    /// Sends the caller's id (a key's id, or a token user's) upstream in this header
    /// (e.g. `x-consumer-id`); a client's own copy is removed first.
    pub identity_header: Option<String>,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
}

/// `[server]`: what one client connection may take (see `serve.rs`). Every limit is on by
/// default; there is no "off".
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// From a request's first byte to the end of its head.
    pub header_read_timeout_secs: u64,
    /// A keep-alive connection with no request in progress and no byte of the next one.
    pub idle_timeout_secs: u64,
    /// No request-body bytes for this long while the gateway waits for them: 408, closed.
    pub body_timeout_secs: u64,
    /// A response write to the client that makes no progress for this long: closed.
    pub send_timeout_secs: u64,
    /// Open client connections; more wait in the listen backlog.
    pub max_connections: usize,
    /// The request line and headers together, in bytes; more is answered 431.
    pub max_header_bytes: usize,
    /// Header fields in a request; more is answered 431.
    pub max_headers: usize,
    /// After SIGTERM or SIGINT, how long requests in progress (streams too) may take to
    /// finish before their connections are closed.
    pub shutdown_grace_secs: u64,
}

/// `[jwt]`: user tokens, verified against the issuer's keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub issuer: String,
    /// One audience or several.
    #[serde(default, deserialize_with = "strings")]
    pub audience: Vec<String>,
    /// The key set; without it, found through OIDC discovery from `issuer`.
    pub jwks_url: Option<String>,
    /// Default `["RS256"]`.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    pub scope_claim: Option<String>,
    pub name_claim: Option<String>,
    #[serde(default)]
    pub metadata_claims: Vec<String>,
    #[serde(default)]
    pub required_claims: Vec<String>,
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into()]
}

fn default_leeway() -> u64 {
    30
}

/// A string or a list of strings, as a list.
fn strings<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

impl JwtConfig {
    fn plan(self) -> Result<JwtVerifier, ConfigError> {
        let mut builder = JwtVerifier::builder()
            .issuer(&self.issuer)
            .leeway(Duration::from_secs(self.leeway_secs))
            .metadata_claims(self.metadata_claims)
            .required_claims(self.required_claims);
        for audience in self.audience {
            builder = builder.audience(audience);
        }
        let mut algorithms = Vec::new();
        for name in &self.algorithms {
            let alg: Algorithm = name
                .parse()
                .map_err(|_| bad("jwt.algorithms", format!("`{name}` is not a JWS algorithm")))?;
            algorithms.push(alg);
        }
        builder = builder.algorithms(algorithms);
        builder = match &self.jwks_url {
            Some(url) => builder.jwks_url(url),
            None => builder.discover(),
        };
        if let Some(claim) = self.scope_claim {
            builder = builder.scope_claim(claim);
        }
        if let Some(claim) = self.name_claim {
            builder = builder.name_claim(claim);
        }
        builder.build().map_err(|e| bad("jwt", e))
    }
}

/// `credential = { oauth2 = { … } }` on a route: tokens from an OAuth2 token endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    pub token_url: String,
    pub client_id_env: String,
    pub client_secret_env: String,
    pub scope: Option<String>,
    pub audience: Option<String>,
    /// `basic` (default) or `body`.
    pub auth: Option<String>,
}

/// A route's `credential` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    pub oauth2: OAuth2Config,
}

/// `[limiter]`: where the request rates and requests in flight of `[route.limits]` and of
/// the keys' own limits are counted.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimiterConfig {
    /// `memory` (this replica alone) or `redis` (every replica on `redis_url` together);
    /// default `redis` when `redis_url` is set, else `memory`.
    pub backend: Option<String>,
    /// While Redis cannot be reached: `refuse` (503, the default), `allow` (unlimited) or
    /// `local` (each replica counts alone).
    pub on_redis_error: limit::WhenUnavailable,
    /// How long a decision may wait on Redis before it counts as down (default 250).
    pub timeout_ms: Option<u64>,
    /// How long a concurrency slot of a replica that died stays taken (default 600).
    pub permit_lease_secs: Option<u64>,
}

/// Where the limiter counts.
#[derive(Debug, Clone)]
pub enum LimiterPlan {
    Memory,
    Redis {
        url: String,
        namespace: String,
        on_error: limit::WhenUnavailable,
        timeout: Duration,
        lease: Duration,
    },
}

/// `redis_url` as one string (addresses joined by commas) from a string or a list.
fn addresses<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(Option::<OneOrMany>::deserialize(d)?.map(|a| match a {
        OneOrMany::One(url) => url,
        OneOrMany::Many(urls) => urls.join(","),
    }))
}

impl Default for ServerConfig {
    fn default() -> Self {
        let limits = Limits::default();
        ServerConfig {
            header_read_timeout_secs: limits.header_read_timeout.as_secs(),
            idle_timeout_secs: limits.idle_timeout.as_secs(),
            body_timeout_secs: limits.body_timeout.as_secs(),
            send_timeout_secs: limits.send_timeout.as_secs(),
            max_connections: limits.max_connections,
            max_header_bytes: limits.max_header_bytes,
            max_headers: limits.max_headers,
            shutdown_grace_secs: limits.shutdown_grace.as_secs(),
        }
    }
}

impl ServerConfig {
    fn plan(&self) -> Result<Limits, ConfigError> {
        let within = |name: &str, value: u64, min: u64, max: u64| {
            if (min..=max).contains(&value) {
                Ok(value)
            } else {
                Err(bad(
                    format!("server.{name}"),
                    format!("{value} is not between {min} and {max}"),
                ))
            }
        };
        let secs =
            |name: &str, value: u64, max: u64| within(name, value, 1, max).map(Duration::from_secs);
        Ok(Limits {
            header_read_timeout: secs(
                "header_read_timeout_secs",
                self.header_read_timeout_secs,
                300,
            )?,
            idle_timeout: secs("idle_timeout_secs", self.idle_timeout_secs, 3600)?,
            body_timeout: secs("body_timeout_secs", self.body_timeout_secs, 3600)?,
            send_timeout: secs("send_timeout_secs", self.send_timeout_secs, 3600)?,
            max_connections: within("max_connections", self.max_connections as u64, 1, 1_000_000)?
                as usize,
            // hyper needs room for a request line and a few headers.
            max_header_bytes: within(
                "max_header_bytes",
                self.max_header_bytes as u64,
                1024,
                1 << 20,
            )? as usize,
            max_headers: within("max_headers", self.max_headers as u64, 8, 10_000)? as usize,
            // 0 is allowed: close everything at once.
            shutdown_grace: Duration::from_secs(within(
                "shutdown_grace_secs",
                self.shutdown_grace_secs,
                0,
                3600,
            )?),
        })
    }
}

/// One `[[route]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub prefix: String,
    /// An http(s) URL, or `echo` for the built-in echo upstream.
    pub upstream: String,
    pub provider: String,
    pub credential_env: Option<String>,
    /// In place of `credential_env`: `{ oauth2 = { … } }`.
    pub credential: Option<CredentialConfig>,
    pub scope: Option<String>,
    pub error_format: Option<String>,
    /// `keys`, `tokens` or `both` (the default when `[jwt]` is set).
    pub accept: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Azure OpenAI's `api-version` query parameter.
    pub api_version: Option<String>,
    pub connect_timeout_secs: Option<u64>,
    pub timeout_secs: Option<u64>,
    /// `[route.limits]`: what keys whose record sets none may do on this route.
    #[serde(default)]
    pub limits: RouteLimits,
    /// The key sources of this route, in place of the top-level `sources` (e.g. a realtime
    /// route that also takes `subprotocol` for browsers).
    pub sources: Option<Vec<String>>,
    /// `cors = { origins = ["https://app.example"] }`: pages on these origins may call the
    /// route from a browser; preflights are answered by the gateway.
    pub cors: Option<CorsConfig>,
    /// `[route.websocket]`: limits of the WebSockets relayed on this route.
    #[serde(default)]
    pub websocket: SocketConfig,
}

/// A route's `cors` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Exact origins (`https://app.example`), or `["*"]` (never with `credentials`).
    pub origins: Vec<String>,
    /// Default GET, POST, PUT, PATCH, DELETE.
    pub methods: Option<Vec<String>>,
    /// Request headers allowed besides the defaults (the credential headers, the
    /// providers' and their SDKs' headers).
    #[serde(default)]
    pub headers: Vec<String>,
    /// Response headers a page may read besides the defaults (request id, rate limits).
    #[serde(default)]
    pub expose: Vec<String>,
    /// How long a browser may cache a preflight (default 600).
    pub max_age_secs: Option<u64>,
    /// Cookies and HTTP authentication allowed (default false; a key header needs none).
    #[serde(default)]
    pub credentials: bool,
}

/// `[route.websocket]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocketConfig {
    /// No message either way for this long: closed with 1001.
    pub idle_timeout_secs: u64,
    /// Open this long: closed with 1001.
    pub max_lifetime_secs: u64,
    /// A larger message either way: closed with 1009.
    pub max_message_bytes: usize,
    /// How often the key of an open socket is checked again (revoked, expired: closed
    /// with 1008).
    pub recheck_ms: u64,
}

impl Default for SocketConfig {
    fn default() -> Self {
        SocketConfig {
            idle_timeout_secs: 300,
            max_lifetime_secs: 3600,
            max_message_bytes: 16 << 20,
            recheck_ms: 10_000,
        }
    }
}

/// A route's WebSocket limits, checked.
#[derive(Debug, Clone, Copy)]
pub struct SocketPlan {
    pub idle: Duration,
    pub lifetime: Duration,
    pub max_message: usize,
    pub recheck: Duration,
}

/// `[route.limits]`, each field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteLimits {
    pub requests_per_minute: Option<u32>,
    /// Requests a key may send at once after a quiet spell (default: `requests_per_minute`).
    pub burst: Option<u32>,
    pub max_concurrent: Option<u32>,
    /// Exact names and `*` globs.
    pub models: Option<Vec<String>>,
    /// Tokens (prompt and completion) a key may use a minute.
    pub tokens_per_minute: Option<u32>,
    /// Tokens a key may use a `budget_period`.
    pub token_budget: Option<u64>,
    /// `day`, `week`, `month` (the default) or `never`, on UTC calendar boundaries.
    pub budget_period: Option<String>,
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_sources() -> Vec<String> {
    vec!["header:x-api-key".into(), "bearer".into()]
}
fn default_error_format() -> String {
    "openai".into()
}
fn default_log_format() -> String {
    "text".into()
}

fn default_redis_namespace() -> String {
    "tga".into()
}
fn default_key_prefix() -> String {
    "gw".into()
}
fn default_reload_ms() -> u64 {
    1000
}
fn default_max_ephemeral_per_key() -> usize {
    tower_gateway_auth::keys::DEFAULT_MAX_LIVE_EPHEMERAL
}
fn default_keep_client_request_id() -> bool {
    true
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_timeout() -> u64 {
    300
}

/// A configuration mistake, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn bad(field: impl Into<String>, message: impl fmt::Display) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.to_string(),
    }
}

/// The configuration, checked and turned into the crate's types.
pub struct Plan {
    pub listen: SocketAddr,
    pub keys: Keys,
    pub sources: Vec<KeySource>,
    pub error_format: ErrorFormat,
    pub admin_scope: Option<String>,
    pub hasher: KeyHasher,
    pub key_format: KeyFormat,
    pub reload: Duration,
    pub max_ephemeral_per_key: usize,
    pub audit_file: Option<PathBuf>,
    pub keep_client_request_id: bool,
    pub limits: Limits,
    pub limiter: LimiterPlan,
    /// The user-token verifier, when `[jwt]` is set.
    pub jwt: Option<JwtVerifier>,
    pub identity_header: Option<HeaderName>,
    pub routes: Vec<RoutePlan>,
    pub metrics_listen: Option<SocketAddr>,
    pub metrics_key_labels: Option<usize>,
}

/// `log_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

/// Where client keys live.
pub enum Keys {
    /// An in-memory store with one fresh key.
    Memory,
    File(PathBuf),
    Redis {
        url: String,
        namespace: String,
    },
}

/// Where a route's upstream credential comes from.
pub enum RouteCredential {
    Static(Credential),
    OAuth2(Box<ClientCredentials>),
}

/// Where an upstream is.
pub enum Upstream {
    Url(String),
    Echo,
}

pub struct RoutePlan {
    pub prefix: String,
    pub upstream: Upstream,
    pub provider: Provider,
    pub credential: RouteCredential,
    pub scope: Option<String>,
    /// Which credentials clients may present.
    pub accept: Accept,
    /// Whether the route said (it needs `[jwt]` then).
    pub accept_set: bool,
    pub error_format: ErrorFormat,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// Defaults for keys whose record sets no limits, and no models.
    pub limits: limit::Limits,
    pub models: Option<ModelList>,
    /// The route's key sources (its own, or the top-level ones).
    pub sources: Vec<KeySource>,
    pub cors: Option<CorsLayer>,
    pub socket: SocketPlan,
}

impl Config {
    /// Parses TOML; syntax and type errors name the line and the key.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let message = e.message().to_owned();
            let at = e
                .span()
                .map(|span| {
                    let line = text[..span.start].matches('\n').count() + 1;
                    format!("line {line}")
                })
                .unwrap_or_else(|| "config".into());
            bad(at, message)
        })
    }

    /// What `cargo run --example gateway` does with no arguments: `/openai` and `/anthropic`
    /// in front of the built-in echo upstream.
    pub fn demo() -> Self {
        let route = |prefix: &str, provider: &str| RouteConfig {
            prefix: prefix.into(),
            upstream: "echo".into(),
            provider: provider.into(),
            credential_env: None,
            credential: None,
            accept: None,
            scope: None,
            error_format: Some(provider.into()),
            headers: BTreeMap::new(),
            api_version: None,
            connect_timeout_secs: None,
            timeout_secs: None,
            limits: RouteLimits::default(),
            sources: None,
            cors: None,
            websocket: SocketConfig::default(),
        };
        // The browser-client demo: a realtime route whose echo upstream speaks WebSocket,
        // open to the page of `cargo run --example realtime` (on port 8000).
        let realtime = RouteConfig {
            sources: Some(vec![
                "header:x-api-key".into(),
                "bearer".into(),
                "subprotocol".into(),
            ]),
            cors: Some(CorsConfig {
                origins: vec![
                    "http://127.0.0.1:8000".into(),
                    "http://localhost:8000".into(),
                ],
                methods: None,
                headers: Vec::new(),
                expose: Vec::new(),
                max_age_secs: None,
                credentials: false,
            }),
            error_format: Some("openai".into()),
            ..route("/realtime", "openai")
        };
        Config {
            listen: default_listen(),
            keys_file: None,
            redis_url: None,
            redis_namespace: default_redis_namespace(),
            sources: default_sources(),
            error_format: default_error_format(),
            admin_scope: Some("admin".into()),
            pepper_env: None,
            key_prefix: default_key_prefix(),
            reload_ms: default_reload_ms(),
            max_ephemeral_per_key: default_max_ephemeral_per_key(),
            audit_file: None,
            connect_timeout_secs: default_connect_timeout(),
            timeout_secs: default_timeout(),
            keep_client_request_id: default_keep_client_request_id(),
            workers: None,
            metrics_listen: None,
            metrics_key_labels: None,
            log_format: default_log_format(),
            server: ServerConfig::default(),
            limiter: LimiterConfig::default(),
            jwt: None,
            identity_header: None,
            routes: vec![
                route("/openai", "openai"),
                route("/anthropic", "anthropic"),
                realtime,
            ],
        }
    }

    /// The log format `log_format` names; read before the rest of the plan, as logging
    /// starts first.
    pub fn log_format(&self) -> Result<LogFormat, ConfigError> {
        match self.log_format.as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(bad(
                "log_format",
                format!("`{other}`: expected text or json"),
            )),
        }
    }

    /// The runtime the gateway runs on, as `workers` asks.
    pub fn runtime(&self) -> Result<tokio::runtime::Runtime, ConfigError> {
        let mut builder = match self.workers {
            Some(0) | Some(1025..) => {
                return Err(bad("workers", "must be between 1 and 1024"));
            }
            Some(1) => tokio::runtime::Builder::new_current_thread(),
            Some(n) => {
                let mut builder = tokio::runtime::Builder::new_multi_thread();
                builder.worker_threads(n);
                builder
            }
            None => tokio::runtime::Builder::new_multi_thread(),
        };
        builder
            .enable_all()
            .build()
            .map_err(|e| bad("workers", format!("cannot start the runtime: {e}")))
    }

    /// Checks every field; `env` reads environment variables (so tests need not touch the
    /// process environment).
    pub fn plan(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Plan, ConfigError> {
        let listen = self
            .listen
            .parse()
            .map_err(|e| bad("listen", format!("`{}`: {e}", self.listen)))?;
        if self.sources.is_empty() {
            return Err(bad("sources", "name at least one key source"));
        }
        let sources = self
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse::<KeySource>()
                    .map_err(|e| bad(format!("sources[{i}]"), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let error_format: ErrorFormat = self
            .error_format
            .parse()
            .map_err(|e| bad("error_format", e))?;
        let hasher = match &self.pepper_env {
            None => KeyHasher::sha256(),
            Some(var) => {
                let pepper = env(var).ok_or_else(|| {
                    bad(
                        "pepper_env",
                        format!("environment variable `{var}` is not set"),
                    )
                })?;
                if pepper.len() < 16 {
                    return Err(bad(
                        "pepper_env",
                        format!("`{var}` must hold at least 16 bytes"),
                    ));
                }
                KeyHasher::with_pepper(pepper.as_bytes())
            }
        };
        let key_format = KeyFormat::new(&self.key_prefix).map_err(|e| bad("key_prefix", e))?;
        let limits = self.server.plan()?;
        self.log_format()?;
        let metrics_listen = self
            .metrics_listen
            .as_deref()
            .map(|addr| {
                addr.parse()
                    .map_err(|e| bad("metrics_listen", format!("`{addr}`: {e}")))
            })
            .transpose()?;
        if self.metrics_key_labels.is_some() && metrics_listen.is_none() {
            return Err(bad(
                "metrics_key_labels",
                "needs metrics_listen: without it no metric is exported",
            ));
        }
        if self.routes.is_empty() {
            return Err(bad("route", "add at least one [[route]]"));
        }
        let mut routes = Vec::new();
        for (i, route) in self.routes.into_iter().enumerate() {
            let plan = route.plan(
                i,
                &error_format,
                &sources,
                self.connect_timeout_secs,
                self.timeout_secs,
                env,
            )?;
            if routes.iter().any(|r: &RoutePlan| r.prefix == plan.prefix) {
                return Err(bad(
                    format!("route[{i}].prefix"),
                    format!("`{}` is used twice", plan.prefix),
                ));
            }
            routes.push(plan);
        }
        if self.reload_ms == 0 {
            return Err(bad("reload_ms", "must be at least 1"));
        }
        if self.max_ephemeral_per_key == 0 {
            return Err(bad(
                "max_ephemeral_per_key",
                "must be at least 1 (without an admin_scope nobody mints anyway)",
            ));
        }
        let keys = match (self.keys_file, &self.redis_url) {
            (Some(_), Some(_)) => {
                return Err(bad("redis_url", "give keys_file or redis_url, not both"));
            }
            (Some(path), None) => Keys::File(path),
            (None, Some(url)) => {
                for (i, one) in url.split(',').map(str::trim).enumerate() {
                    if !one.starts_with("redis://")
                        && !one.starts_with("rediss://")
                        && !one.starts_with("unix://")
                    {
                        // The address itself is not quoted: it may hold a password.
                        return Err(bad(
                            "redis_url",
                            format!("address {} is not a redis:// URL", i + 1),
                        ));
                    }
                }
                Keys::Redis {
                    url: url.clone(),
                    namespace: self.redis_namespace.clone(),
                }
            }
            (None, None) => Keys::Memory,
        };
        let jwt = self.jwt.map(JwtConfig::plan).transpose()?;
        let identity_header = self
            .identity_header
            .map(|name| HeaderName::try_from(name.as_str()).map_err(|e| bad("identity_header", e)))
            .transpose()?;
        if jwt.is_none()
            && let Some(i) = routes.iter().position(|r: &RoutePlan| r.accept_set)
        {
            return Err(bad(format!("route[{i}].accept"), "needs a [jwt] table"));
        }
        let limiter = self.limiter;
        let limiter = match (limiter.backend.as_deref(), &self.redis_url) {
            (Some("memory"), _) | (None, None) => LimiterPlan::Memory,
            (Some("redis") | None, Some(url)) => LimiterPlan::Redis {
                url: url.clone(),
                namespace: self.redis_namespace,
                on_error: limiter.on_redis_error,
                timeout: Duration::from_millis(limiter.timeout_ms.unwrap_or(250).max(1)),
                lease: Duration::from_secs(limiter.permit_lease_secs.unwrap_or(600).max(1)),
            },
            (Some("redis"), None) => {
                return Err(bad("limiter.backend", "`redis` needs redis_url"));
            }
            (Some(other), _) => {
                return Err(bad(
                    "limiter.backend",
                    format!("`{other}` is not memory or redis"),
                ));
            }
        };
        if let LimiterPlan::Redis { lease, .. } = &limiter
            && let Some(i) = routes.iter().position(|r: &RoutePlan| {
                r.limits.max_concurrent().is_some() && r.socket.lifetime > *lease
            })
        {
            return Err(bad(
                format!("route[{i}].websocket.max_lifetime_secs"),
                format!(
                    "longer than limiter.permit_lease_secs ({}): a socket older than the lease \
                     would stop counting as in flight",
                    lease.as_secs()
                ),
            ));
        }
        Ok(Plan {
            listen,
            keys,
            sources,
            error_format,
            admin_scope: self.admin_scope,
            hasher,
            key_format,
            reload: Duration::from_millis(self.reload_ms),
            max_ephemeral_per_key: self.max_ephemeral_per_key,
            audit_file: self.audit_file,
            keep_client_request_id: self.keep_client_request_id,
            limits,
            limiter,
            jwt,
            identity_header,
            routes,
            metrics_listen,
            metrics_key_labels: self.metrics_key_labels,
        })
    }
}

impl CorsConfig {
    fn plan(&self) -> Result<CorsLayer, String> {
        let mut builder = CorsLayer::builder()
            .allow_origins(self.origins.iter().cloned())
            .allow_credentials(self.credentials)
            .also_allow_headers(self.headers.iter().cloned());
        if !self.expose.is_empty() {
            let expose = tower_gateway_auth::cors::DEFAULT_EXPOSED_HEADERS
                .iter()
                .map(|&h| h.to_owned())
                .chain(self.expose.iter().cloned());
            builder = builder.expose_headers(expose);
        }
        if let Some(methods) = &self.methods {
            let methods = methods
                .iter()
                .map(|m| {
                    http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .map_err(|_| format!("`{m}` is not a method"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            builder = builder.allow_methods(methods);
        }
        if let Some(secs) = self.max_age_secs {
            builder = builder.max_age(Duration::from_secs(secs));
        }
        builder.build().map_err(|e| e.to_string())
    }
}

impl SocketConfig {
    fn plan(&self, field: &dyn Fn(&str) -> String) -> Result<SocketPlan, ConfigError> {
        let at_least = |value: u64, min: u64, name: &str| {
            if value < min {
                Err(bad(
                    field(&format!("websocket.{name}")),
                    format!("must be at least {min}"),
                ))
            } else {
                Ok(value)
            }
        };
        Ok(SocketPlan {
            idle: Duration::from_secs(at_least(self.idle_timeout_secs, 1, "idle_timeout_secs")?),
            lifetime: Duration::from_secs(at_least(
                self.max_lifetime_secs,
                1,
                "max_lifetime_secs",
            )?),
            max_message: at_least(self.max_message_bytes as u64, 1024, "max_message_bytes")?
                as usize,
            recheck: Duration::from_millis(at_least(self.recheck_ms, 10, "recheck_ms")?),
        })
    }
}

/// Demo credentials for the echo upstream: not secrets, so that a newcomer sees them rewritten.
const ECHO_CREDENTIAL: &str = "sk-echo-upstream-credential";

impl RouteConfig {
    fn plan(
        self,
        i: usize,
        default_format: &ErrorFormat,
        default_sources: &[KeySource],
        connect_timeout: u64,
        timeout: u64,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<RoutePlan, ConfigError> {
        let field = |name: &str| format!("route[{i}].{name}");
        let prefix = self.prefix.trim_end_matches('/').to_owned();
        if !prefix.starts_with('/')
            || prefix.len() < 2
            || prefix.contains(['{', '}', '*', '?', '#'])
        {
            return Err(bad(
                field("prefix"),
                format!("`{}` must look like /name (no wildcards)", self.prefix),
            ));
        }
        if prefix == "/admin" {
            return Err(bad(field("prefix"), "/admin is the management API's"));
        }
        if [super::probes::HEALTHZ, super::probes::READYZ].contains(&prefix.as_str()) {
            return Err(bad(
                field("prefix"),
                format!("{prefix} is a health probe's"),
            ));
        }
        let upstream = if self.upstream == "echo" {
            Upstream::Echo
        } else {
            tower_gateway_auth::proxy::Forward::builder(&self.upstream)
                .map_err(|e| bad(field("upstream"), e))?;
            Upstream::Url(self.upstream)
        };
        let mut provider: Provider = self
            .provider
            .parse()
            .map_err(|e| bad(field("provider"), e))?;
        if let Some(version) = &self.api_version {
            provider = provider.api_version(version);
        }
        let credential = match (&self.credential_env, &upstream, self.credential) {
            (Some(_), _, Some(_)) => {
                return Err(bad(
                    field("credential"),
                    "give credential_env or credential, not both",
                ));
            }
            (None, _, Some(CredentialConfig { oauth2 })) => {
                let read = |var: &str, name: &str| {
                    env(var).map(|v| v.trim().to_owned()).ok_or_else(|| {
                        bad(
                            field(&format!("credential.oauth2.{name}")),
                            format!("environment variable `{var}` is not set"),
                        )
                    })
                };
                let id = read(&oauth2.client_id_env, "client_id_env")?;
                let secret = read(&oauth2.client_secret_env, "client_secret_env")?;
                let mut builder = ClientCredentials::builder(&oauth2.token_url, id, secret);
                if let Some(scope) = oauth2.scope {
                    builder = builder.scope(scope);
                }
                if let Some(audience) = oauth2.audience {
                    builder = builder.audience(audience);
                }
                builder = match oauth2.auth.as_deref() {
                    None | Some("basic") => builder.auth(ClientAuth::Basic),
                    Some("body") => builder.auth(ClientAuth::Body),
                    Some(other) => {
                        return Err(bad(
                            field("credential.oauth2.auth"),
                            format!("`{other}` is not basic or body"),
                        ));
                    }
                };
                RouteCredential::OAuth2(Box::new(
                    builder
                        .build()
                        .map_err(|e| bad(field("credential.oauth2.token_url"), e))?,
                ))
            }
            (Some(var), _, None) => {
                let value = env(var).ok_or_else(|| {
                    bad(
                        field("credential_env"),
                        format!("environment variable `{var}` is not set"),
                    )
                })?;
                RouteCredential::Static(
                    Credential::new(value.trim())
                        .map_err(|e| bad(field("credential_env"), format!("`{var}`: {e}")))?,
                )
            }
            (None, Upstream::Echo, None) => RouteCredential::Static(
                Credential::new(ECHO_CREDENTIAL).expect("a valid demo credential"),
            ),
            (None, Upstream::Url(_), None) => {
                return Err(bad(field("credential_env"), "required for a real upstream"));
            }
        };
        let accept_set = self.accept.is_some();
        let accept = match self.accept.as_deref() {
            None | Some("both") => Accept::Both,
            Some("keys") => Accept::Keys,
            Some("tokens") => Accept::Tokens,
            Some(other) => {
                return Err(bad(
                    field("accept"),
                    format!("`{other}` is not keys, tokens or both"),
                ));
            }
        };
        let error_format = match &self.error_format {
            Some(f) => f.parse().map_err(|e| bad(field("error_format"), e))?,
            None => default_format.clone(),
        };
        let headers = self
            .headers
            .iter()
            .map(|(name, value)| {
                let name = HeaderName::try_from(name.as_str())
                    .map_err(|e| bad(field(&format!("headers.{name}")), e))?;
                let value = HeaderValue::try_from(value.as_str())
                    .map_err(|e| bad(field(&format!("headers.{name}")), e))?;
                Ok((name, value))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let seconds = |v: Option<u64>, default: u64, name: &str| match v.unwrap_or(default) {
            0 => Err(bad(field(name), "must be at least 1 second")),
            s => Ok(Duration::from_secs(s)),
        };
        let limits = &self.limits;
        let mut defaults = limit::Limits::new();
        match (limits.requests_per_minute, limits.burst) {
            (Some(0), _) => {
                return Err(bad(
                    field("limits.requests_per_minute"),
                    "must be at least 1",
                ));
            }
            (None, Some(_)) => {
                return Err(bad(field("limits.burst"), "needs requests_per_minute"));
            }
            (_, Some(0)) => return Err(bad(field("limits.burst"), "must be at least 1")),
            (Some(rpm), burst) => {
                defaults =
                    defaults.with_rate(Rate::per_minute(rpm).with_burst(burst.unwrap_or(rpm)));
            }
            (None, None) => {}
        }
        match limits.max_concurrent {
            Some(0) => return Err(bad(field("limits.max_concurrent"), "must be at least 1")),
            Some(max) => defaults = defaults.with_max_concurrent(max),
            None => {}
        }
        match limits.tokens_per_minute {
            Some(0) => {
                return Err(bad(field("limits.tokens_per_minute"), "must be at least 1"));
            }
            Some(tpm) => defaults = defaults.with_tokens(Rate::per_minute(tpm)),
            None => {}
        }
        let period = match &limits.budget_period {
            None => limit::BudgetPeriod::default(),
            Some(text) => text
                .parse()
                .map_err(|e| bad(field("limits.budget_period"), e))?,
        };
        match (limits.token_budget, &limits.budget_period) {
            (Some(tokens), _) => {
                defaults = defaults.with_budget(limit::Budget::new(tokens, period))
            }
            (None, Some(_)) => {
                return Err(bad(field("limits.budget_period"), "needs token_budget"));
            }
            (None, None) => {}
        }
        let models = limits
            .models
            .as_ref()
            .map(|m| ModelList::new(m.iter().map(String::as_str)));
        let sources = match &self.sources {
            None => default_sources.to_vec(),
            Some(list) if list.is_empty() => {
                return Err(bad(field("sources"), "name at least one key source"));
            }
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(j, s)| {
                    s.parse::<KeySource>()
                        .map_err(|e| bad(field(&format!("sources[{j}]")), e))
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let cors = self
            .cors
            .as_ref()
            .map(|c| c.plan().map_err(|e| bad(field("cors"), e)))
            .transpose()?;
        let socket = self.websocket.plan(&field)?;
        Ok(RoutePlan {
            sources,
            cors,
            socket,
            limits: defaults,
            models,
            prefix,
            upstream,
            provider,
            credential,
            accept,
            accept_set,
            scope: self.scope,
            error_format,
            headers,
            connect_timeout: seconds(
                self.connect_timeout_secs,
                connect_timeout,
                "connect_timeout_secs",
            )?,
            timeout: seconds(self.timeout_secs, timeout, "timeout_secs")?,
        })
    }
}
