//! Issue, list and revoke keys in a key file (the `FileStore` the gateway reads).
//!
//! ```text
//! cargo run --example keygen -- --keys-file keys.json --name alice [--ttl-days N | --no-expiry]
//!                                [--scope S]... [--prefix P]
//! cargo run --example keygen -- --keys-file keys.json --name ci --rpm 60 --burst 10 \
//!                                --max-concurrent 2 --model 'gpt-4o*' --model claude-3-5-haiku-latest \
//!                                --tpm 100000 --token-budget 5000000 --budget-period month
//! cargo run --example keygen -- --keys-file keys.json --list
//! cargo run --example keygen -- --keys-file keys.json --revoke key_XXXXXXXXXXX
//! cargo run --example keygen -- --redis-url redis://127.0.0.1:6379 --name alice   # shared store
//! cargo run --example keygen -- --keys-file keys.json --pepper-env GATEWAY_KEY_PEPPER --name bob
//! cargo run --example keygen -- --keys-file keys.json --audit-file audit.jsonl --revoke key_XXXXXXXXXXX
//! ```
//!
//! Every issue and revoke is an audit event with actor `keygen`; `--audit-file` appends it
//! to the same JSON-lines file the gateway's `audit_file` names.
//!
//! With `pepper_env` in the gateway's config, give keygen the same `--pepper-env`: keys are
//! then digested under the same pepper. A store written under another pepper (or none) is
//! refused with an error saying so, on a key file and on Redis alike.
//!
//! Issuing prints only the new key on stdout (details go to stderr), so
//! `KEY=$(cargo run -q --example keygen -- ...)` works. The key is shown once: the file keeps
//! only its digest. A running gateway sees the change within a couple of seconds.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tower_gateway_auth::clock::Timestamp;
use tower_gateway_auth::keys::{
    Actor, ApiKey, AuditFile, KeyFormat, KeyHasher, KeyManager, KeyRecord, NewKey,
};
use tower_gateway_auth::limit::{Budget, BudgetPeriod, Limits, Rate};
use tower_gateway_auth::store::{FileStore, KeyAdmin, RedisStore};

const USAGE: &str = "usage: keygen (--keys-file FILE | --redis-url URL [--redis-namespace NS]) [--pepper-env VAR] [--audit-file FILE] (--name NAME [--ttl-days N | --no-expiry] [--scope S]... [--prefix P] [--rpm N [--burst N]] [--max-concurrent N] [--model PATTERN]... [--tpm N] [--token-budget N [--budget-period day|week|month|never]] | --list | --revoke ID)";

#[derive(Default)]
pub struct Args {
    keys_file: Option<String>,
    redis_url: Option<String>,
    redis_namespace: Option<String>,
    pepper_env: Option<String>,
    audit_file: Option<String>,
    name: Option<String>,
    ttl_days: Option<u64>,
    no_expiry: bool,
    scopes: Vec<String>,
    prefix: Option<String>,
    rpm: Option<u32>,
    burst: Option<u32>,
    max_concurrent: Option<u32>,
    tpm: Option<u32>,
    token_budget: Option<u64>,
    budget_period: Option<BudgetPeriod>,
    models: Vec<String>,
    list: bool,
    revoke: Option<String>,
}

/// A limit given on the command line: a whole number of at least 1.
fn count(flag: &str, value: &str) -> Result<u32, String> {
    match value.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "{flag} takes a whole number of at least 1, not `{value}`"
        )),
    }
}

pub fn parse(mut raw: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args::default();
    while let Some(flag) = raw.next() {
        let mut value = || raw.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--keys-file" => args.keys_file = Some(value()?),
            "--redis-url" => args.redis_url = Some(value()?),
            "--redis-namespace" => args.redis_namespace = Some(value()?),
            "--pepper-env" => args.pepper_env = Some(value()?),
            "--audit-file" => args.audit_file = Some(value()?),
            "--name" => args.name = Some(value()?),
            "--ttl-days" => {
                let v = value()?;
                let days = v
                    .parse()
                    .map_err(|_| format!("--ttl-days takes a whole number, not `{v}`"))?;
                if days == 0 {
                    return Err("--ttl-days must be at least 1 (use --no-expiry for keys that never expire)".into());
                }
                args.ttl_days = Some(days);
            }
            "--no-expiry" => args.no_expiry = true,
            "--scope" => args.scopes.push(value()?),
            "--prefix" => args.prefix = Some(value()?),
            "--rpm" => args.rpm = Some(count(&flag, &value()?)?),
            "--burst" => args.burst = Some(count(&flag, &value()?)?),
            "--max-concurrent" => args.max_concurrent = Some(count(&flag, &value()?)?),
            "--model" => args.models.push(value()?),
            "--tpm" => args.tpm = Some(count(&flag, &value()?)?),
            "--token-budget" => {
                let v = value()?;
                args.token_budget = Some(v.parse().map_err(|_| {
                    format!("--token-budget takes a whole number of tokens, not `{v}`")
                })?);
            }
            "--budget-period" => {
                let v = value()?;
                args.budget_period = Some(v.parse().map_err(|e| format!("--budget-period: {e}"))?);
            }
            "--list" => args.list = true,
            "--revoke" => args.revoke = Some(value()?),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    Ok(args)
}

fn describe(r: &KeyRecord, now: Timestamp) -> String {
    let state = match r.usable_at(now) {
        Ok(()) => "usable".to_owned(),
        Err(why) => format!("{why:?}").to_lowercase(),
    };
    let expires = r.expires_at().map_or("never".to_owned(), |t| {
        let left = t.as_unix_secs().saturating_sub(now.as_unix_secs());
        format!("{t} (in {}d)", left / 86_400)
    });
    let scopes: Vec<&str> = r.scopes().iter().collect();
    format!(
        "{}  {:<20} {:<12} {:<10} expires {:<30} scopes [{}]",
        r.id(),
        r.name(),
        r.hint(),
        state,
        expires,
        scopes.join(" ")
    )
}

/// The hasher the gateway uses with `pepper_env = VAR` (same rule: at least 16 bytes).
fn hasher(
    pepper_env: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<KeyHasher, String> {
    let Some(var) = pepper_env else {
        return Ok(KeyHasher::sha256());
    };
    let pepper =
        env(var).ok_or_else(|| format!("--pepper-env: environment variable `{var}` is not set"))?;
    if pepper.len() < 16 {
        return Err(format!("--pepper-env: `{var}` must hold at least 16 bytes"));
    }
    Ok(KeyHasher::with_pepper(pepper.as_bytes()))
}

/// Does what `args` say; returns the key issued, if one was (`main` prints it).
pub async fn run(
    mut args: Args,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<ApiKey>, String> {
    let hasher = hasher(args.pepper_env.as_deref(), env)?;
    match (args.keys_file.take(), args.redis_url.take()) {
        (Some(path), None) => {
            let store = FileStore::builder(&path)
                .hasher(hasher)
                .reload_every(None)
                .open()
                .map_err(|e| e.to_string())?;
            manage(Arc::new(store), args, &path).await
        }
        (None, Some(url)) => {
            let namespace = args.redis_namespace.clone().unwrap_or_else(|| "tga".into());
            let store = RedisStore::builder(url)
                .namespace(namespace)
                .hasher(hasher)
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            manage(Arc::new(store), args, "Redis").await
        }
        _ => Err(format!(
            "give exactly one of --keys-file or --redis-url\n{USAGE}"
        )),
    }
}

async fn manage<S: KeyAdmin>(
    store: Arc<S>,
    args: Args,
    place: &str,
) -> Result<Option<ApiKey>, String> {
    // What keygen does is in the audit trail as done by `keygen`: on stderr's log when a
    // subscriber is set, and in the gateway's audit file when given.
    let mut manager = KeyManager::new(store).acting_as(Actor::named("keygen"));
    if let Some(path) = &args.audit_file {
        let file = AuditFile::open(path).map_err(|e| format!("cannot open {path}: {e}"))?;
        manager = manager.audit_to(file);
    }
    if let Some(prefix) = &args.prefix {
        manager = manager.key_format(KeyFormat::new(prefix).map_err(|e| e.to_string())?);
    }
    let now = Timestamp::now();
    match (args.list, args.revoke, args.name) {
        (true, None, None) => {
            for r in manager.list().await.map_err(|e| e.to_string())? {
                println!("{}", describe(&r, now));
            }
        }
        (false, Some(id), None) => {
            let id = id.parse().map_err(|e| format!("{e}"))?;
            let r = manager.revoke(id).await.map_err(|e| e.to_string())?;
            eprintln!("revoked {}", describe(&r, now));
        }
        (false, None, Some(name)) => {
            let mut spec = NewKey::named(name).scopes(args.scopes);
            let mut limits = Limits::new();
            match (args.rpm, args.burst) {
                (Some(rpm), burst) => {
                    limits =
                        limits.with_rate(Rate::per_minute(rpm).with_burst(burst.unwrap_or(rpm)));
                }
                (None, Some(_)) => return Err("--burst needs --rpm".into()),
                (None, None) => {}
            }
            if let Some(max) = args.max_concurrent {
                limits = limits.with_max_concurrent(max);
            }
            if let Some(tpm) = args.tpm {
                limits = limits.with_tokens(Rate::per_minute(tpm));
            }
            match (args.token_budget, args.budget_period) {
                (Some(tokens), period) => {
                    limits = limits.with_budget(Budget::new(tokens, period.unwrap_or_default()));
                }
                (None, Some(_)) => return Err("--budget-period needs --token-budget".into()),
                (None, None) => {}
            }
            if !limits.is_empty() {
                spec = spec.limits(limits);
            }
            if !args.models.is_empty() {
                spec = spec.models(args.models);
            }
            if args.no_expiry {
                spec = spec.never_expires();
            } else if let Some(days) = args.ttl_days {
                spec = spec.expires_in(Duration::from_secs(days * 86_400));
            }
            let issued = manager.issue(spec).await.map_err(|e| e.to_string())?;
            eprintln!("issued {}", describe(&issued.record, now));
            eprintln!("the key below is shown once; {place} keeps only its digest");
            return Ok(Some(issued.key));
        }
        _ => {
            return Err(format!(
                "give exactly one of --name, --list or --revoke\n{USAGE}"
            ));
        }
    }
    Ok(None)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let env = |var: &str| std::env::var(var).ok();
    let result = match parse(std::env::args().skip(1)) {
        Ok(args) => run(args, &env).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(issued) => {
            if let Some(key) = issued {
                println!("{}", key.expose());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keygen: {e}");
            ExitCode::FAILURE
        }
    }
}
