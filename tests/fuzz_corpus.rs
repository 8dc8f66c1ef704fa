//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) on stable: every input the
//! fuzzer kept, crash reproducers included, goes through exactly the properties the fuzz
//! targets check (`fuzz/checks.rs`, shared with them). A missing or empty corpus fails.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "no corpus for fuzz target {target} at {}: {e}",
            dir.display()
        )
    });
    let mut files: Vec<_> = entries
        .map(|e| e.expect("a corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "the corpus of fuzz target {target} is empty"
    );
    let mut failed = Vec::new();
    for file in &files {
        let input = std::fs::read(file).expect("a readable corpus file");
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} {target} inputs break a property: {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn extract() {
    replay("extract", checks::extract);
}

#[test]
fn query_rewrite() {
    replay("query_rewrite", checks::query_rewrite);
}

#[test]
fn parse() {
    replay("parse", checks::parse);
}

#[test]
fn admin_json() {
    replay("admin_json", checks::admin_json);
}

#[test]
fn the_fixed_keys_are_well_formed() {
    let gw = tower_gateway_auth::keys::KeyFormat::new("gw").unwrap();
    for key in [checks::GOOD_KEY, checks::REVOKED_KEY] {
        assert_eq!(
            gw.check(key),
            tower_gateway_auth::keys::Checksum::Valid,
            "{key}"
        );
    }
}

#[test]
fn model_body() {
    replay("model_body", checks::model_body);
}

#[test]
fn usage_scan() {
    replay("usage_scan", checks::usage_scan);
}
