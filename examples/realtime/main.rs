//! A browser page talking to a realtime API through the gateway, with a key it may hold.
//!
//! ```text
//! cargo run --example gateway                                  # prints a fresh key
//! GATEWAY_KEY=gw_… cargo run --example realtime                # then open http://127.0.0.1:8000
//! ```
//!
//! The page's backend (this program) keeps its gateway key to itself and mints a
//! short-lived ephemeral key for the page (`POST /admin/ephemeral` on the gateway). The
//! page opens `ws://127.0.0.1:8080/realtime/v1/realtime` with the ephemeral key in the
//! subprotocol list; the gateway's `/realtime` route (in the demo, in front of the built-in
//! echo upstream; with a config, in front of `wss://api.openai.com`) checks it, takes it
//! out and sends the provider's credential. See the README's "Browser clients".

mod page;

use std::net::SocketAddr;

const USAGE: &str =
    "usage: GATEWAY_KEY=gw_… realtime [--gateway http://127.0.0.1:8080] [--listen 127.0.0.1:8000]";

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let mut gateway = "http://127.0.0.1:8080".to_owned();
    let mut listen: SocketAddr = "127.0.0.1:8000".parse().expect("an address");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--gateway", Some(url)) => gateway = url.trim_end_matches('/').to_owned(),
            ("--listen", Some(addr)) => match addr.parse() {
                Ok(addr) => listen = addr,
                Err(e) => {
                    eprintln!("realtime: --listen {addr}: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            },
            _ => {
                eprintln!("{USAGE}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let Some(key) = std::env::var("GATEWAY_KEY").ok().filter(|k| !k.is_empty()) else {
        eprintln!(
            "realtime: set GATEWAY_KEY to a gateway key (the one `cargo run --example gateway` prints)\n{USAGE}"
        );
        return std::process::ExitCode::FAILURE;
    };
    let app = page::router(page::Backend {
        gateway,
        route: "/realtime".into(),
        key,
        ttl_seconds: 60,
    });
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("realtime: cannot listen on {listen}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("open http://{listen} (allowed by the demo gateway's /realtime cors origins)");
    match axum::serve(listener, app).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("realtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
