//! The reference gateway: API keys in, provider credentials out.
//!
//! ```text
//! cargo run --example gateway                       # demo: echo upstream, one fresh key
//! cargo run --example gateway -- --config gateway.toml
//! ```
//!
//! See `examples/gateway.toml` and the README's "Run the gateway" section.

mod app;

use std::process::ExitCode;

const USAGE: &str = "usage: gateway [--config FILE]";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let config = match (args.next().as_deref(), args.next(), args.next()) {
        (None, _, _) => Ok(app::Config::demo()),
        (Some("--config"), Some(path), None) => std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {path}: {e}"))
            .and_then(|text| app::Config::from_toml(&text).map_err(|e| format!("{path}: {e}"))),
        _ => Err(USAGE.to_owned()),
    };
    let started = config.and_then(|config| {
        // Logging first, in the configured format: the rest of start-up logs.
        let format = config
            .log_format()
            .map_err(|e| format!("configuration error: {e}"))?;
        app::telemetry::init_logging(format);
        let runtime = config
            .runtime()
            .map_err(|e| format!("configuration error: {e}"))?;
        Ok((runtime, config))
    });
    match started {
        Ok((runtime, config)) => runtime.block_on(serve(config)),
        Err(e) => {
            eprintln!("gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: app::Config) -> ExitCode {
    let env = |var: &str| std::env::var(var).ok();
    let gateway = match app::build(config, &env).await {
        Ok(gateway) => gateway,
        Err(e) => {
            eprintln!("gateway: configuration error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(gateway.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("gateway: cannot listen on {}: {e}", gateway.listen);
            return ExitCode::FAILURE;
        }
    };
    // Before the address is announced: from then on a SIGTERM must drain, not kill.
    let signalled = match shutdown_signal() {
        Ok(signalled) => signalled,
        Err(e) => {
            eprintln!("gateway: cannot handle shutdown signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The bound address, not the configured one: `listen = "127.0.0.1:0"` picks a port.
    let base = match listener.local_addr() {
        Ok(addr) => format!("http://{addr}"),
        Err(_) => format!("http://{}", gateway.listen),
    };
    println!("gateway listening on {base}");
    if let Some(metrics) = gateway.metrics {
        println!("metrics for Prometheus on http://{metrics}/metrics");
    }
    if let Some(echo) = gateway.echo {
        println!("built-in echo upstream on http://{echo}");
    }
    if let Some(key) = &gateway.first_key {
        println!(
            "\nyour API key (shown once, kept only in memory):\n\n    {}\n",
            key.expose()
        );
        println!(
            "try:\n    curl -s {base}/openai/v1/chat/completions -H 'Authorization: Bearer {}' -d '{{}}'",
            key.expose()
        );
        println!(
            "    curl -s {base}/anthropic/v1/messages -H 'x-api-key: {}' -d '{{}}'",
            key.expose()
        );
        println!("    curl -s {base}/openai/v1/models                     # no key: 401\n");
    }
    let shutdown = async {
        signalled.await;
        println!("gateway: shutting down");
    };
    let served = app::serve(listener, gateway.serving(), shutdown).await;
    if let Err(e) = gateway.last_used.flush().await {
        eprintln!("gateway: last-used times not written: {e}");
    }
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Completes at the first SIGTERM (what orchestrators send) or SIGINT (Ctrl-C); `serve`
/// then stops accepting and drains within the grace period.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
