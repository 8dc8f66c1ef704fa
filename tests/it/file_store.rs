//! The file store over real files and real processes: persistence across restarts, no key
//! at rest, changes from another process seen within seconds, concurrent writers losing
//! nothing, and a corrupt file failing loudly.

use crate::support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::TempDir;
use tower_gateway_auth::keys::{ApiKey, KeyHasher, KeyManager, KeyStatus, NewKey};
use tower_gateway_auth::store::{FileStore, KeyAdmin, KeyStore};

async fn status_of<K>(store: K, key: &ApiKey) -> StatusCode
where
    K: KeyStore,
{
    support::key_status(store, key.expose()).await
}

fn open(path: &Path) -> Arc<FileStore> {
    Arc::new(
        FileStore::builder(path)
            .reload_every(Some(Duration::from_millis(100)))
            .open()
            .unwrap(),
    )
}

#[tokio::test]
async fn keys_survive_a_restart() {
    let dir = TempDir::new("restart");
    let (key, id) = {
        let store = open(&dir.file());
        let issued = KeyManager::new(store.clone())
            .issue(NewKey::named("alice").scopes(["chat"]))
            .await
            .unwrap();
        (issued.key, issued.record.id())
    };
    let store = open(&dir.file());
    assert_eq!(store.len(), 1);
    assert_eq!(status_of(store.clone(), &key).await, StatusCode::OK);
    let manager = KeyManager::new(store.clone());
    manager.revoke(id).await.unwrap();
    drop(manager);
    drop(store);
    let store = open(&dir.file());
    assert_eq!(
        status_of(store, &key).await,
        StatusCode::UNAUTHORIZED,
        "revocation persisted"
    );
}

#[tokio::test]
async fn the_file_never_holds_a_key() {
    let dir = TempDir::new("at-rest");
    let store = open(&dir.file());
    let manager = KeyManager::new(store.clone());
    let mut keys = Vec::new();
    for i in 0..5 {
        keys.push(manager.issue(NewKey::named(format!("k{i}"))).await.unwrap());
    }
    let parent = keys[0].record.id();
    let rotated = manager
        .rotate(parent, Duration::from_secs(60))
        .await
        .unwrap();
    let imported = ApiKey::new("imported-legacy-key-abcdefghijklmnop");
    manager
        .import(&imported, NewKey::named("legacy"))
        .await
        .unwrap();
    let text = std::fs::read_to_string(dir.file()).unwrap();
    for key in keys.iter().map(|k| &k.key).chain([&rotated.key, &imported]) {
        let secret = key.expose();
        assert!(!text.contains(secret), "the key file holds a key");
        // Not even the random part without its prefix.
        let random = secret.split_once('_').map_or(secret, |(_, r)| r);
        assert!(
            !text.contains(&random[4..]),
            "the key file holds most of a key"
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.file()).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "the key file is readable by others: {mode:o}"
        );
    }
}

#[test]
fn a_corrupt_or_foreign_file_fails_to_open_with_a_clear_error() {
    let dir = TempDir::new("corrupt");
    let path = dir.file();
    std::fs::write(
        &path,
        b"{\"format\": \"tower-gateway-auth/keys\", \"keys\": [",
    )
    .unwrap();
    let error = FileStore::open(&path).unwrap_err().to_string();
    assert!(
        error.contains(&path.display().to_string()) && error.contains("corrupt"),
        "{error}"
    );

    std::fs::write(&path, b"").unwrap();
    assert!(
        FileStore::open(&path)
            .unwrap_err()
            .to_string()
            .contains("corrupt")
    );

    std::fs::write(
        &path,
        br#"{"format":"something-else","version":1,"hasher":"sha256","keys":[]}"#,
    )
    .unwrap();
    assert!(
        FileStore::open(&path)
            .unwrap_err()
            .to_string()
            .contains("not a version 1")
    );

    // A good file, but no runtime for the task that checks it for changes: said so.
    std::fs::write(
        &path,
        br#"{"format":"tower-gateway-auth/keys","version":1,"hasher":"sha256","keys":[]}"#,
    )
    .unwrap();
    let error = FileStore::open(&path).unwrap_err().to_string();
    assert!(error.contains("tokio runtime"), "{error}");
    assert!(FileStore::builder(&path).reload_every(None).open().is_ok());

    // A directory where the file should be is unreadable, not empty.
    let as_dir = dir.0.join("dir.json");
    std::fs::create_dir(&as_dir).unwrap();
    assert!(
        FileStore::open(&as_dir)
            .unwrap_err()
            .to_string()
            .contains("not a regular file")
    );
}

#[tokio::test]
async fn a_file_written_with_another_pepper_is_refused() {
    let dir = TempDir::new("pepper");
    let peppered = |p: &[u8]| {
        FileStore::builder(dir.file())
            .hasher(KeyHasher::with_pepper(p))
            .open()
    };
    let store = Arc::new(peppered(b"first pepper").unwrap());
    KeyManager::new(store)
        .issue(NewKey::named("a"))
        .await
        .unwrap();
    assert!(
        peppered(b"other pepper")
            .unwrap_err()
            .to_string()
            .contains("another hasher or pepper")
    );
    assert!(FileStore::open(dir.file()).is_err(), "no pepper at all");
    assert!(peppered(b"first pepper").is_ok());
}

#[tokio::test]
async fn a_file_corrupted_at_run_time_keeps_the_last_good_keys() {
    let dir = TempDir::new("runtime-corrupt");
    let store = open(&dir.file());
    let issued = KeyManager::new(store.clone())
        .issue(NewKey::named("a"))
        .await
        .unwrap();
    std::fs::write(dir.file(), b"garbage").unwrap();
    assert!(store.reload().is_err());
    assert_eq!(status_of(store.clone(), &issued.key).await, StatusCode::OK);
    // Writes refuse to build on a corrupt file rather than replace it with a partial one.
    let err = KeyManager::new(store.clone())
        .issue(NewKey::named("b"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
}

/// Runs this test binary again as a child process executing `helper_child_writer`.
fn child(file: &Path, action: &str, count: usize) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "file_store::helper_child_writer",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("TGA_CHILD_FILE", file)
    .env("TGA_CHILD_ACTION", action)
    .env("TGA_CHILD_COUNT", count.to_string())
    .stdout(std::process::Stdio::null());
    cmd
}

/// Not a test of its own: the entry point of the child processes the tests below start.
#[tokio::test]
#[ignore = "run as a child process by the multi-process tests"]
async fn helper_child_writer() {
    let file = std::env::var("TGA_CHILD_FILE").expect("run by a parent test");
    let action = std::env::var("TGA_CHILD_ACTION").unwrap();
    let count: usize = std::env::var("TGA_CHILD_COUNT").unwrap().parse().unwrap();
    let store = Arc::new(FileStore::builder(&file).reload_every(None).open().unwrap());
    let manager = KeyManager::new(store);
    match action.split_once(':') {
        Some(("issue", tag)) => {
            for i in 0..count {
                manager
                    .issue(NewKey::named(format!("{tag}-{i}")))
                    .await
                    .unwrap();
            }
        }
        Some(("revoke", id)) => {
            manager.revoke(id.parse().unwrap()).await.unwrap();
        }
        _ => panic!("unknown action {action}"),
    }
}

#[tokio::test]
async fn another_process_adding_and_revoking_is_seen_within_seconds() {
    let dir = TempDir::new("watch");
    let store = open(&dir.file());
    let manager = KeyManager::new(store.clone());
    let victim = manager.issue(NewKey::named("victim")).await.unwrap();
    assert_eq!(status_of(store.clone(), &victim.key).await, StatusCode::OK);

    let out = child(&dir.file(), &format!("revoke:{}", victim.record.id()), 0)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = child(&dir.file(), "issue:other", 3).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The store reloads by itself (every 100 ms here); allow a generous margin for a loaded CI.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.len() < 4 || status_of(store.clone(), &victim.key).await == StatusCode::OK {
        assert!(
            Instant::now() < deadline,
            "changes made by another process were not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status_of(store.clone(), &victim.key).await,
        StatusCode::UNAUTHORIZED
    );
    let revoked = KeyAdmin::get(&*store, victim.record.id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.status(), KeyStatus::Revoked);
}

#[tokio::test]
async fn two_processes_adding_keys_at_once_lose_nothing() {
    let dir = TempDir::new("concurrent");
    let store = open(&dir.file());
    KeyManager::new(store.clone())
        .issue(NewKey::named("seed"))
        .await
        .unwrap();
    let mut a = child(&dir.file(), "issue:a", 40).spawn().unwrap();
    let mut b = child(&dir.file(), "issue:b", 40).spawn().unwrap();
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let reopened = FileStore::open(dir.file()).unwrap();
    assert_eq!(reopened.len(), 81);
    let names: std::collections::BTreeSet<String> = KeyAdmin::list(&reopened)
        .await
        .unwrap()
        .iter()
        .map(|r| r.name().to_owned())
        .collect();
    for i in 0..40 {
        assert!(
            names.contains(&format!("a-{i}")) && names.contains(&format!("b-{i}")),
            "lost key {i}"
        );
    }
}
