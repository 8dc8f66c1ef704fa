//! The header-inject layer in a real gateway, and the whole stack in the order the design
//! gives: client → inbound → upstream → inject → proxy → provider, all on loopback.

use crate::support;

use http::{HeaderName, HeaderValue, StatusCode};
use support::{
    UPSTREAM_REQUEST_ID, client, forward_to, get, pairs, send, spawn_service, spawn_upstream,
    store_with,
};
use tower::ServiceBuilder;
use tower_gateway_auth::inject::{HeaderRule, RequestId};
use tower_gateway_auth::upstream::{Credential, Provider};
use tower_gateway_auth::{HeaderInjectLayer, Identity, InboundApiKeyLayer, UpstreamAuthLayer};

fn name(n: &'static str) -> HeaderName {
    HeaderName::from_static(n)
}

fn value(v: &'static str) -> HeaderValue {
    HeaderValue::from_static(v)
}

async fn gateway(inject: HeaderInjectLayer) -> (std::net::SocketAddr, support::Recorder) {
    let (provider, seen) = spawn_upstream().await;
    let stack = ServiceBuilder::new()
        .layer(inject)
        .service(forward_to(provider));
    (spawn_service(stack).await, seen)
}

fn is_uuid_v4(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 36
        && [8, 13, 18, 23].iter().all(|&i| b[i] == b'-')
        && b[14] == b'4'
        && matches!(b[19], b'8' | b'9' | b'a' | b'b')
        && b.iter()
            .enumerate()
            .all(|(i, c)| [8, 13, 18, 23].contains(&i) || c.is_ascii_hexdigit())
}

#[tokio::test]
async fn overwrite_append_if_absent_and_remove() {
    let (addr, seen) = gateway(
        HeaderInjectLayer::new()
            .overwrite(name("x-env"), value("prod"))
            .append(name("x-via"), value("gateway"))
            .if_absent(name("accept"), value("application/json"))
            .remove(name("cookie"))
            .rule(HeaderRule::overwrite_with(name("x-path"), |req| {
                HeaderValue::try_from(req.uri.path()).ok()
            }))
            .rule(HeaderRule::append_with(name("x-never"), |_| None)),
    )
    .await;
    let http = client();

    send(
        &http,
        get(
            addr,
            "/v1/chat?x=1",
            &[
                ("x-env", "dev"),
                ("x-env", "staging"),
                ("x-via", "edge"),
                ("accept", "text/event-stream"),
                ("cookie", "session=1"),
                ("x-keep", "1"),
            ],
        ),
    )
    .await;
    let received = seen.last();
    assert_eq!(received.uri, "/v1/chat?x=1");
    assert_eq!(
        received.header_pairs(),
        pairs(&[
            ("accept", "text/event-stream"),
            ("x-env", "prod"),
            ("x-keep", "1"),
            ("x-path", "/v1/chat"),
            ("x-via", "edge"),
            ("x-via", "gateway"),
        ])
    );

    send(&http, get(addr, "/v2", &[])).await;
    assert_eq!(
        seen.last().header_pairs(),
        pairs(&[
            ("accept", "application/json"),
            ("x-env", "prod"),
            ("x-path", "/v2"),
            ("x-via", "gateway"),
        ])
    );
}

#[tokio::test]
async fn request_ids_are_made_replaced_kept_and_echoed_as_configured() {
    let http = client();

    // Default: always a fresh id, the client's replaced, the upstream's answer untouched.
    let (addr, seen) = gateway(HeaderInjectLayer::new().request_id(RequestId::new())).await;
    let answer = send(&http, get(addr, "/", &[("x-request-id", "client-chosen")])).await;
    let sent = seen.last().headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(is_uuid_v4(&sent), "{sent}");
    assert_eq!(answer.headers["x-request-id"], UPSTREAM_REQUEST_ID);
    send(&http, get(addr, "/", &[])).await;
    let second = seen.last().headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(is_uuid_v4(&second) && second != sent);

    // Kept and echoed: the client sees the id the provider got, not the provider's own.
    let (addr, seen) = gateway(
        HeaderInjectLayer::new().request_id(RequestId::new().keep_client_id(true).echo(true)),
    )
    .await;
    let answer = send(&http, get(addr, "/", &[("x-request-id", "client-chosen")])).await;
    assert_eq!(seen.last().headers["x-request-id"], "client-chosen");
    assert_eq!(answer.headers["x-request-id"], "client-chosen");
    // A client id that is not one clean value is replaced, and the replacement echoed.
    for bad in [
        &[("x-request-id", "two words")][..],
        &[("x-request-id", "a"), ("x-request-id", "b")],
    ] {
        let answer = send(&http, get(addr, "/", bad)).await;
        let received = seen.last();
        let ids: Vec<_> = received.headers.get_all("x-request-id").iter().collect();
        assert_eq!(ids.len(), 1);
        assert!(is_uuid_v4(ids[0].to_str().unwrap()));
        assert_eq!(answer.headers["x-request-id"], ids[0]);
    }

    // Under a name of its own, echoing keeps the provider's id too; rules see the id.
    let (addr, seen) = gateway(
        HeaderInjectLayer::new()
            .request_id(
                RequestId::new()
                    .header(name("x-gateway-request-id"))
                    .echo(true),
            )
            .rule(HeaderRule::overwrite_with(name("x-trace-parent"), |req| {
                req.headers.get("x-gateway-request-id").cloned()
            })),
    )
    .await;
    let answer = send(&http, get(addr, "/", &[])).await;
    let received = seen.last();
    let id = &received.headers["x-gateway-request-id"];
    assert_eq!(&received.headers["x-trace-parent"], id);
    assert_eq!(&answer.headers["x-gateway-request-id"], id);
    assert_eq!(answer.headers["x-request-id"], UPSTREAM_REQUEST_ID);
}

#[tokio::test]
async fn provider_bundles() {
    let (addr, seen) = gateway(
        HeaderInjectLayer::new()
            .anthropic(
                value("2023-06-01"),
                Some(value("prompt-caching-2024-07-31")),
            )
            .openai(Some(value("org-gateway")), Some(value("proj_gateway"))),
    )
    .await;
    let http = client();

    send(
        &http,
        get(
            addr,
            "/",
            &[
                ("anthropic-beta", "tools-2024-04-04"),
                ("openai-organization", "org-client"),
            ],
        ),
    )
    .await;
    assert_eq!(
        seen.last().header_pairs(),
        pairs(&[
            (
                "anthropic-beta",
                "tools-2024-04-04,prompt-caching-2024-07-31"
            ),
            ("anthropic-version", "2023-06-01"),
            ("openai-organization", "org-gateway"),
            ("openai-project", "proj_gateway"),
        ])
    );

    send(
        &http,
        get(addr, "/", &[("anthropic-version", "2024-10-22")]),
    )
    .await;
    assert_eq!(
        seen.last().header_pairs(),
        pairs(&[
            ("anthropic-beta", "prompt-caching-2024-07-31"),
            ("anthropic-version", "2024-10-22"),
            ("openai-organization", "org-gateway"),
            ("openai-project", "proj_gateway"),
        ])
    );

    // Absent values set nothing, and leave the client's alone.
    let (addr, seen) = gateway(HeaderInjectLayer::new().openai(None, None)).await;
    send(&http, get(addr, "/", &[("openai-project", "proj_client")])).await;
    assert_eq!(
        seen.last().header_pairs(),
        pairs(&[("openai-project", "proj_client")])
    );
}

#[tokio::test]
async fn the_whole_stack_in_order() {
    const CLIENT_KEY: &str = "gw_stack-client-key";
    let inbound = InboundApiKeyLayer::from_shared(store_with(&[("alice", CLIENT_KEY, &[])]));
    let (provider, seen) = spawn_upstream().await;
    let stack = ServiceBuilder::new()
        .layer(inbound.clone())
        .layer(
            UpstreamAuthLayer::new(
                Provider::anthropic(),
                Credential::new("sk-ant-upstream").unwrap(),
            )
            .strip_inbound(&inbound),
        )
        .layer(
            HeaderInjectLayer::new()
                .request_id(RequestId::new().echo(true))
                .rule(HeaderRule::overwrite_with(name("x-caller"), |req| {
                    let who = req.extensions.get::<Identity>()?;
                    HeaderValue::try_from(who.name()).ok()
                })),
        )
        .service(forward_to(provider));
    let addr = spawn_service(stack).await;
    let http = client();

    let answer = send(
        &http,
        get(addr, "/v1/messages", &[("x-api-key", CLIENT_KEY)]),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let received = seen.last();
    let id = received.headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(is_uuid_v4(&id));
    assert_eq!(answer.headers["x-request-id"], id.as_str());
    assert_eq!(
        received.header_pairs(),
        pairs(&[
            ("anthropic-version", "2023-06-01"),
            ("x-api-key", "sk-ant-upstream"),
            ("x-caller", "alice"),
            ("x-request-id", &id),
        ])
    );

    // Turned away at the door: neither the provider nor the inject layer sees it.
    let answer = send(
        &http,
        get(addr, "/v1/messages", &[("x-api-key", "gw_wrong")]),
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(answer.headers.get("x-request-id").is_none());
    assert_eq!(seen.count(), 1);
}
