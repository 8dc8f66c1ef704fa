//! One way to reach Redis, standalone or Cluster, for the Redis store and the Redis limiter.
//!
//! An address list names the servers: one URL (`redis://127.0.0.1:6379`), or several joined
//! by commas, which are the seed nodes of a Cluster. A single URL is asked `INFO cluster`
//! once, so that a Cluster reached through one of its nodes is used as a Cluster and not
//! answered with `MOVED` errors.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

/// A connection that reconnects by itself: a [`ConnectionManager`] to one server, or a
/// Cluster connection that follows the cluster's slots.
#[derive(Clone)]
pub(crate) enum RedisConnection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(c) => c.req_packed_command(cmd),
            RedisConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(c) => c.get_db(),
            RedisConnection::Cluster(c) => c.get_db(),
        }
    }
}

/// How long a request may wait on Redis before it is answered without it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) connect: Duration,
    pub(crate) response: Duration,
}

/// A connection, and a client of each node for what cannot go through it (pub/sub).
pub(crate) struct Connected {
    pub(crate) connection: RedisConnection,
    /// The nodes, in the order given: a subscriber tries them in turn.
    pub(crate) nodes: Vec<redis::Client>,
}

impl Connected {
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.connection, RedisConnection::Cluster(_))
    }
}

/// Why an address list cannot be used. Never quotes the list: a URL may hold a password.
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// Entry `index` (from 1) is not a Redis URL.
    BadUrl { index: usize, source: RedisError },
    /// The list is empty.
    Empty,
    /// The servers cannot be reached, or answered with an error.
    Redis(RedisError),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::BadUrl { index, .. } => {
                write!(f, "Redis address {index} of the list is not a Redis URL")
            }
            ConnectError::Empty => f.write_str("no Redis address given"),
            ConnectError::Redis(_) => f.write_str("cannot connect to Redis"),
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConnectError::BadUrl { source, .. } | ConnectError::Redis(source) => Some(source),
            ConnectError::Empty => None,
        }
    }
}

/// Connects to the servers `addresses` names (see the module docs).
pub(crate) async fn connect(
    addresses: &str,
    timeouts: Timeouts,
) -> Result<Connected, ConnectError> {
    let nodes = addresses
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .enumerate()
        .map(|(i, url)| {
            redis::Client::open(url).map_err(|source| ConnectError::BadUrl {
                index: i + 1,
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cluster = match nodes.as_slice() {
        [] => return Err(ConnectError::Empty),
        [one] => cluster_enabled(one, timeouts).await?,
        _ => true,
    };
    let connection = if cluster {
        let client = ClusterClient::builder(nodes.iter().map(|n| n.get_connection_info().clone()))
            .connection_timeout(timeouts.connect)
            .response_timeout(timeouts.response)
            .retries(1)
            .build()
            .map_err(ConnectError::Redis)?;
        RedisConnection::Cluster(
            client
                .get_async_connection()
                .await
                .map_err(ConnectError::Redis)?,
        )
    } else {
        // While Redis is down a request should fail fast (a cache then serves what it
        // holds, or the request is answered without Redis), not wait through a long series
        // of reconnection attempts.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeouts.connect))
            .set_response_timeout(Some(timeouts.response))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        RedisConnection::Single(
            ConnectionManager::new_with_config(nodes[0].clone(), config)
                .await
                .map_err(ConnectError::Redis)?,
        )
    };
    Ok(Connected { connection, nodes })
}

async fn cluster_enabled(node: &redis::Client, timeouts: Timeouts) -> Result<bool, ConnectError> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeouts.connect))
        .set_response_timeout(Some(timeouts.response));
    let mut connection = node
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(ConnectError::Redis)?;
    let info: String = redis::cmd("INFO")
        .arg("cluster")
        .query_async(&mut connection)
        .await
        .map_err(ConnectError::Redis)?;
    Ok(info.lines().any(|line| line.trim() == "cluster_enabled:1"))
}
