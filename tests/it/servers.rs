//! The inbound layer in front of real servers on loopback — axum, plain hyper and tonic —
//! driven by real clients. Each test checks what the server behind the layer received.

use crate::support;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use http::{Request, StatusCode};
use support::{Recorder, client, get as get_req, send, spawn_axum, store_with};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower::ServiceBuilder;
use tower_gateway_auth::inbound::KeySource;
use tower_gateway_auth::rejection::ErrorFormat;
use tower_gateway_auth::store::MemoryStore;
use tower_gateway_auth::{Identity, InboundApiKeyLayer, RequireScopesLayer};

const ALICE: &str = "gw_alice-key-1234";
const BOB: &str = "gw_bob-key-5678";

fn store() -> Arc<MemoryStore> {
    store_with(&[
        ("alice", ALICE, &["chat", "admin"]),
        ("bob", BOB, &["chat"]),
    ])
}

#[tokio::test]
async fn axum_router_with_extractors_and_per_route_scopes() {
    let rec = Recorder::default();
    let record = {
        let rec = rec.clone();
        axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                rec.record(&req);
                next.run(req)
            },
        )
    };
    let app = Router::new()
        .route(
            "/whoami",
            get(|who: Identity| async move { format!("{} {}", who.name(), who.id()) }),
        )
        .route(
            "/maybe",
            get(|who: Option<Identity>| async move {
                who.map_or("anonymous".to_owned(), |w| w.name().to_owned())
            }),
        )
        .route(
            "/admin",
            get(|| async { "admin area" }).route_layer(RequireScopesLayer::new(["admin"])),
        )
        .layer(record)
        .layer(
            InboundApiKeyLayer::from_shared(store())
                .sources(
                    ["header:x-api-key", "bearer", "query:api_key"].map(|s| s.parse().unwrap()),
                )
                .allow_anonymous(true),
        )
        .layer(tower_gateway_auth::RejectionLayer::new().error_format(ErrorFormat::Anthropic));
    let addr = spawn_axum(app).await;
    let http = client();

    let auth = format!("Bearer {ALICE}");
    let a = send(&http, get_req(addr, "/whoami", &[("authorization", &auth)])).await;
    assert_eq!(a.status, StatusCode::OK);
    let seen = rec.last();
    let id = seen.identity.expect("identity").id();
    assert_eq!(a.text(), format!("alice {id}"));
    assert!(seen.headers.get("authorization").is_none());

    let a = send(
        &http,
        get_req(addr, &format!("/maybe?x=%20y&api_key={BOB}&z"), &[]),
    )
    .await;
    assert_eq!(a.text(), "bob");
    assert_eq!(rec.last().uri, "/maybe?x=%20y&z");

    let a = send(&http, get_req(addr, "/maybe", &[])).await;
    assert_eq!(a.text(), "anonymous");
    let a = send(&http, get_req(addr, "/whoami", &[])).await;
    assert_eq!(
        a.status,
        StatusCode::UNAUTHORIZED,
        "Identity extractor without a key"
    );

    let calls = rec.count();
    let a = send(&http, get_req(addr, "/admin", &[("x-api-key", BOB)])).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.json()["error"]["type"], "permission_error");
    let a = send(&http, get_req(addr, "/admin", &[("x-api-key", ALICE)])).await;
    assert_eq!((a.status, a.text()), (StatusCode::OK, "admin area"));

    // Bad keys never reach the router's middleware, let alone a handler.
    let calls_after_admin = rec.count();
    assert_eq!(calls_after_admin, calls + 2);
    let a = send(
        &http,
        get_req(addr, "/whoami", &[("x-api-key", "gw_wrong")]),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json()["error"]["type"], "authentication_error");
    let a = send(
        &http,
        get_req(
            addr,
            "/whoami",
            &[
                ("x-api-key", ALICE),
                ("authorization", &format!("Bearer {BOB}")),
            ],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(rec.count(), calls_after_admin);
}

#[tokio::test]
async fn plain_hyper_server() {
    let rec = Recorder::default();
    let service = ServiceBuilder::new()
        .layer(InboundApiKeyLayer::from_shared(store()).sources([KeySource::query("key")]))
        .service(rec.service());
    let addr = support::spawn_service(service).await;
    let http = client();
    let a = send(
        &http,
        get_req(addr, &format!("/v1/models?key={ALICE}&limit=5"), &[]),
    )
    .await;
    assert_eq!((a.status, a.text()), (StatusCode::OK, "ok"));
    let seen = rec.last();
    assert_eq!(seen.uri, "/v1/models?limit=5");
    assert_eq!(seen.identity.unwrap().name(), "alice");

    let a = send(&http, get_req(addr, "/v1/models?key=nope", &[])).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let a = send(&http, get_req(addr, "/v1/models", &[("x-api-key", ALICE)])).await;
    assert_eq!(
        a.status,
        StatusCode::UNAUTHORIZED,
        "only the query source is configured"
    );
    assert_eq!(rec.count(), 1);
}

#[tokio::test]
async fn tonic_server_answers_grpc_statuses() {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let rec = Recorder::default();
    let record = {
        let rec = rec.clone();
        tower::util::MapRequestLayer::new(move |req: Request<tonic::body::Body>| {
            rec.record(&req);
            req
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let layer = InboundApiKeyLayer::from_shared(store()).require_scopes(["admin"]);
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(layer)
            .layer(record)
            .add_service(health)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let check = |key: Option<&'static str>| {
        let channel = channel.clone();
        async move {
            let mut client =
                HealthClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
                    if let Some(key) = key {
                        req.metadata_mut()
                            .insert("authorization", format!("Bearer {key}").parse().unwrap());
                    }
                    Ok(req)
                });
            client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
        }
    };

    let status = check(None).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let status = check(Some("gw_wrong")).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (tonic::Code::Unauthenticated, "Invalid API key.")
    );
    let status = check(Some(BOB)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(rec.count(), 0);

    let ok = check(Some(ALICE)).await.unwrap().into_inner();
    assert_eq!(ok.status, ServingStatus::Serving as i32);
    let seen = rec.last();
    assert!(seen.headers.get("authorization").is_none());
    assert_eq!(seen.identity.unwrap().name(), "alice");
    assert_eq!(rec.count(), 1);
}
