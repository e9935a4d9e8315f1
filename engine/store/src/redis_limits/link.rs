//! The connection to Redis: one server (or a primary behind one endpoint) through redis-rs's
//! tokio `ConnectionManager`, or a Redis Cluster (ElastiCache with cluster mode on) through its
//! cluster client, which follows slot moves and failovers by itself. Either way it is made
//! lazily, so a replica starts while Redis is down, and every command waits at most the
//! configured timeout.
//!
//! Every key the engine writes carries the hash tag [`TAG`], so all of them live in one slot:
//! the scripts take a caller's keys, the global budget and the provider's buckets in one atomic
//! step, and a cluster refuses a script whose keys span slots. The price is that one shard
//! serves all limit traffic — a few script calls per request, far below what one Redis node
//! handles.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, Value};

use super::{RedisConfig, RedisSetupError, redact};

/// The hash tag of every key: `{keyvex}:…`.
pub(super) const TAG: &str = "{keyvex}";

/// A connection to a single Redis or to a cluster; clones share it.
#[derive(Clone)]
pub(super) enum Link {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Link {
    /// Sets the connection up without connecting (inside a tokio runtime).
    pub(super) fn open(config: &RedisConfig) -> Result<Link, RedisSetupError> {
        let shown = redact(&config.url);
        let url_error = |e: redis::RedisError| RedisSetupError::Url {
            url: shown.clone(),
            message: e.to_string(),
        };
        // TCP_NODELAY, which redis-rs leaves off: with Nagle on, a command written while another
        // is unanswered (a settle, then the next request's admission) waits for the first one's
        // ACK, and commands sent together are answered one after the other.
        let info = config
            .url
            .as_str()
            .into_connection_info()
            .map_err(url_error)?;
        let tcp = info.tcp_settings().clone().set_nodelay(true);
        if config.cluster {
            let client = ClusterClient::builder([info.clone()])
                .tcp_settings(tcp)
                .connection_timeout(config.timeout)
                .response_timeout(config.timeout)
                // One quick retry (a MOVED after a failover is followed at once); the next
                // command tries again, so an outage costs each request at most the timeout.
                .retries(1)
                .min_retry_wait(10)
                .max_retry_wait(u64::try_from(config.timeout.as_millis()).unwrap_or(u64::MAX))
                .build()
                .map_err(url_error)?;
            return Ok(Link::Cluster(
                client.get_pending_async_connection_with_config(ClusterConfig::new()),
            ));
        }
        let client = redis::Client::open(info.set_tcp_settings(tcp)).map_err(url_error)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            // One quick reconnect per failure; the next command tries again, so an outage costs
            // each request at most the timeout.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(config.timeout);
        ConnectionManager::new_lazy_with_config(client, manager_config)
            .map(Link::Single)
            .map_err(url_error)
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::Single(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Link::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Single(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
        }
    }
}
