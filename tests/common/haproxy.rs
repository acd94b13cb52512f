//! The shipped HAProxy example (`deploy/haproxy-shards.cfg`) run for real on loopback in front
//! of four nodes, stopped by the PID it was started with when dropped.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

/// The example's backends, in the order [`ShardFront::start`] takes their addresses: two nodes
/// for shard 0, two for shard 1.
pub const BACKENDS: [&str; 4] = ["SHARD0_A", "SHARD0_B", "SHARD1_A", "SHARD1_B"];

pub struct ShardFront(Child);

impl ShardFront {
    /// Starts HAProxy listening on `front` with `nodes` as the [`BACKENDS`].
    pub fn start(front: SocketAddr, nodes: [SocketAddr; 4]) -> ShardFront {
        let mut command = Command::new("haproxy");
        command
            .arg("-db")
            .arg("-f")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/deploy/haproxy-shards.cfg"
            ))
            .env("KURZ_PUBLIC_BIND", front.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (name, node) in BACKENDS.iter().zip(nodes) {
            command.env(format!("KURZ_{name}"), node.to_string());
        }
        ShardFront(
            command
                .spawn()
                .expect("start haproxy (installed by .ci/run)"),
        )
    }
}

impl Drop for ShardFront {
    fn drop(&mut self) {
        // It may have exited already; either way it is gone afterwards.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
