//! Instructions per request of the stacks `benches/overhead.rs` times, for callgrind:
//! `scripts/instructions.sh` runs `instructions MODE N` for each mode and subtracts `bare`.
//! Instruction counts are the same run after run whatever else the machine does, so two
//! versions can be compared where criterion's times are too noisy to tell them apart.
//!
//! Modes: `bare` (the inner service alone), `floor` (the overhead bench's floor, over a
//! `HashMap` of the same 10,000 digests), `inbound`, `full` (inbound, upstream, inject),
//! `full-no-echo` (the same without echoing the request id, as 5e8137a's stack did) and
//! `route` (`full` inside the gateway's `RejectionLayer`), over 10,000 keys.

use http::{HeaderMap, Request, Response, Uri};
use tower::{Layer, Service};
use tower_gateway_auth::keys::{KeyFormat, KeyHasher, KeyId, KeyRecord};
use tower_gateway_auth::store::MemoryStore;
use tower_gateway_auth::{InboundApiKeyLayer, RejectionLayer};

mod support;
use support::{
    Bare, FloorMap, bearer_request, floor_check, full_stack, full_stack_echoing, next, serve,
};

fn run<S, B>(mut svc: S, requests: &[(Uri, HeaderMap)], n: usize)
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    let mut i = 0;
    for _ in 0..n {
        let req = next(requests, &mut i);
        assert_eq!(serve(&mut svc, req), 200);
    }
}
fn main() {
    // `cargo bench` and `cargo test --benches` run this with their own flags: nothing to do.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, n) = match args.as_slice() {
        [mode, n] if !mode.starts_with('-') => (mode.clone(), n.parse::<usize>().expect("N")),
        _ => {
            eprintln!(
                "usage: instructions bare|floor|inbound|full|route N (see scripts/instructions.sh)"
            );
            return;
        }
    };
    let format = KeyFormat::new("gw").unwrap();
    let store = std::sync::Arc::new(MemoryStore::new());
    let hasher = KeyHasher::sha256();
    let requests: Vec<(Uri, HeaderMap)> = (0..10_000)
        .map(|i| {
            let key = format.generate().expose().to_owned();
            store.insert(
                KeyRecord::new(KeyId::random(), hasher.digest(key.as_bytes()))
                    .with_name(format!("active-{i}")),
            );
            bearer_request(&key)
        })
        .collect();
    let stack = full_stack(store.clone());
    match mode.as_str() {
        "bare" => run(Bare, &requests, n),
        "floor" => {
            // From the store's digests: hashing the keys again would count as the floor's.
            let map: FloorMap = store
                .records()
                .iter()
                .zip(0..)
                .map(|(record, i)| (*record.digest().as_bytes(), i))
                .collect();
            let mut i = 0;
            for _ in 0..n {
                floor_check(&map, &next(&requests, &mut i));
            }
        }
        "inbound" => run(
            InboundApiKeyLayer::from_shared(store).layer(Bare),
            &requests,
            n,
        ),
        "full" => run(stack, &requests, n),
        "full-no-echo" => run(full_stack_echoing(store.clone(), false), &requests, n),
        "route" => run(
            RejectionLayer::new().realm("gateway").layer(stack),
            &requests,
            n,
        ),
        _ => panic!("mode"),
    }
}
