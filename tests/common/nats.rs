//! A real 3-server NATS JetStream cluster on loopback ports for the cluster tests, stopped by
//! the PIDs it started when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NATS_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One nats-server process of the test cluster.
struct NatsServer {
    port: u16,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    fn spawn(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("nats log file");
        let child = Command::new("nats-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server (installed by .ci/run)");
        self.child = Some(child);
    }

    /// Kills this server (SIGKILL, by the PID we started) and reaps it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // It may have exited already; either way it is gone afterwards.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A 3-server NATS JetStream cluster on free loopback ports, with its store dirs in a temp dir.
pub struct NatsCluster {
    servers: Vec<NatsServer>,
    _dir: tempfile::TempDir,
}

pub fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().expect("local addr").port())
        .collect()
}

impl NatsCluster {
    pub async fn start() -> NatsCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports = free_ports(6);
        let routes: Vec<String> = ports[3..]
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect();
        let mut servers = Vec::new();
        for i in 0..3 {
            let name = format!("n{i}");
            let store_dir = dir.path().join(&name);
            let args = vec![
                "-js".to_owned(),
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                ports[i].to_string(),
                "-n".into(),
                name.clone(),
                "-sd".into(),
                store_dir.display().to_string(),
                "--cluster_name".into(),
                "kurztest".into(),
                "--cluster".into(),
                routes[i].clone(),
                "--routes".into(),
                routes.join(","),
            ];
            let mut server = NatsServer {
                log: dir.path().join(format!("{name}.log")),
                port: ports[i],
                args,
                child: None,
            };
            server.spawn();
            servers.push(server);
        }
        let cluster = NatsCluster { servers, _dir: dir };
        cluster.wait_jetstream_ready(&cluster.urls()).await;
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|server| format!("nats://127.0.0.1:{}", server.port))
            .collect()
    }

    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[i].port)
    }

    /// Waits until an R3 stream can be created and written through `urls`: the meta leader is
    /// elected and every server takes part.
    pub async fn wait_jetstream_ready(&self, urls: &[String]) {
        let deadline = Instant::now() + NATS_READY_TIMEOUT;
        loop {
            match probe_jetstream(urls).await {
                Ok(()) => return,
                Err(error) if Instant::now() < deadline => {
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!(
                    "NATS JetStream cluster not ready after {NATS_READY_TIMEOUT:?}: {error}; logs in {}",
                    self._dir.path().display()
                ),
            }
        }
    }

    pub fn kill(&mut self, i: usize) {
        self.servers[i].kill();
    }

    pub fn restart(&mut self, i: usize) {
        self.servers[i].spawn();
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            server.kill();
        }
    }
}

async fn probe_jetstream(urls: &[String]) -> Result<(), async_nats::Error> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(1))
        .connect(urls)
        .await?;
    let mut jetstream = async_nats::jetstream::new(client);
    // Short: until the cluster has a meta leader, requests go unanswered.
    jetstream.set_timeout(Duration::from_secs(1));
    let name = format!("PROBE_{:x}", rand::random::<u32>());
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("probe.{name}")],
            num_replicas: 3,
            ..Default::default()
        })
        .await?;
    jetstream
        .publish(format!("probe.{name}"), "ready".into())
        .await?
        .await?;
    jetstream.delete_stream(&name).await?;
    Ok(())
}
