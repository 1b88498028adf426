//! Starts the real `xmpp-node` binary as a separate process on its own
//! loopback address, with a temporary data directory, and drives
//! `clusterctl` against it.
//!
//! The binaries are found next to the running test (`target/<profile>/`);
//! `cargo test --workspace` builds them because the `node` package has
//! integration tests of its own. `XMPP_BIN_DIR` overrides the directory.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Where `xmpp-node` and `clusterctl` are.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XMPP_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A loopback address of its own for each test node (127.0.0.0/8 is all
/// loopback), so parallel tests don't collide on ports.
pub fn fresh_ip() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    Ipv4Addr::new(
        127,
        100 + (pid % 100) as u8,
        (pid / 100 % 250) as u8,
        1 + (n % 250) as u8,
    )
}

/// `N` distinct free ports on `ip`, chosen by the kernel. The listeners are
/// all held until every port is chosen: released one by one, the kernel
/// may hand the same port out twice.
fn free_ports<const N: usize>(ip: Ipv4Addr) -> anyhow::Result<[SocketAddr; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind((ip, 0)).with_context(|| format!("cannot bind {ip}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let addrs = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<std::io::Result<Vec<_>>>()?;
    addrs
        .try_into()
        .map_err(|_| anyhow::anyhow!("wrong number of ports"))
}

/// Options for a test node.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub vhosts: Vec<String>,
    /// Extra TOML appended to the generated config file. It follows the
    /// generated `[auth]` table, so keys before its first table header are
    /// `[auth]` keys (e.g. `allow_registration = true`).
    pub extra_config: String,
    /// `node_id` in the cluster.
    pub node_id: u64,
    /// Cluster addresses of members to join (empty: a cluster of one).
    pub join: Vec<String>,
    /// Extra keys of the `[cluster]` table (`snapshot_every = 50`).
    pub cluster_config: String,
    /// Wait at start until the node knows a leader with a quorum.
    pub wait_quorum: bool,
    /// The cluster address peers dial (`advertise_addr`), e.g. a
    /// [`crate::faultnet::FaultNet`] proxy in front of the node.
    pub advertise_addr: Option<String>,
    /// The loopback address to use (a fresh one when `None`).
    pub ip: Option<Ipv4Addr>,
    /// `admin.token_file`: this node's `clusterctl` calls send it.
    pub admin_token_file: Option<PathBuf>,
    /// The s2s listener (a free port when `None`): a peer that finds us
    /// through a hosts file dials port 5269.
    pub s2s_addr: Option<SocketAddr>,
    /// The inter-node listener's port (a free one when `None`): pods of a
    /// StatefulSet all listen on the same port, each on its own address.
    pub cluster_port: Option<u16>,
    /// Command-line arguments after `--config FILE`, as a pod's spec gives them.
    pub args: Vec<String>,
    /// The open-files limit (soft, hard) the node starts with.
    pub nofile: Option<(u64, u64)>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            vhosts: vec!["localhost".into()],
            extra_config: String::new(),
            node_id: 1,
            join: Vec::new(),
            cluster_config: String::new(),
            wait_quorum: true,
            advertise_addr: None,
            ip: None,
            admin_token_file: None,
            s2s_addr: None,
            cluster_port: None,
            args: Vec::new(),
            nofile: None,
        }
    }
}

/// A running node. Killed on drop; its data dir is removed with it.
pub struct TestNode {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub c2s: SocketAddr,
    pub c2s_tls: SocketAddr,
    /// The server-to-server (federation) listener.
    pub s2s: SocketAddr,
    /// BOSH and WebSocket over plain HTTP.
    pub http: SocketAddr,
    /// BOSH and WebSocket over HTTPS (the vhosts' certificates).
    pub https: SocketAddr,
    pub grpc: SocketAddr,
    /// The inter-node (Raft) address.
    pub cluster: SocketAddr,
    /// The cluster address peers dial: `advertise_addr`, or `cluster`.
    pub advertised: String,
    pub node_id: u64,
    pub domain: String,
    token_file: Option<PathBuf>,
    wait_quorum: bool,
    args: Vec<String>,
    nofile: Option<(u64, u64)>,
}

impl TestNode {
    pub fn start() -> anyhow::Result<TestNode> {
        TestNode::start_with(NodeOptions::default())
    }

    pub fn start_with(opts: NodeOptions) -> anyhow::Result<TestNode> {
        let mut node = TestNode::create(opts)?;
        node.spawn()?;
        Ok(node)
    }

    /// Writes the config and picks the addresses without starting the
    /// process ([`TestNode::start_again`] starts it).
    pub fn create(opts: NodeOptions) -> anyhow::Result<TestNode> {
        let dir = tempfile::tempdir()?;
        let ip = opts.ip.unwrap_or_else(fresh_ip);
        let [c2s, c2s_tls, s2s, http, https, grpc, cluster] = free_ports::<7>(ip)?;
        let s2s = opts.s2s_addr.unwrap_or(s2s);
        let cluster = match opts.cluster_port {
            Some(p) => SocketAddr::from((ip, p)),
            None => cluster,
        };
        let mut toml = format!(
            "data_dir = {:?}\nnode_id = {}\n",
            dir.path().join("data"),
            opts.node_id
        );
        toml.push_str(&format!(
            "[cluster]\naddr = \"{cluster}\"\njoin = {:?}\n{}\n",
            opts.join, opts.cluster_config
        ));
        if let Some(a) = &opts.advertise_addr {
            toml.push_str(&format!("advertise_addr = {a:?}\n"));
        }
        if let Some(t) = &opts.admin_token_file {
            toml.push_str(&format!("[admin]\ntoken_file = {t:?}\n"));
        }
        toml.push_str("[listen]\n");
        toml.push_str(&format!(
            "c2s = \"{c2s}\"\nc2s_tls = \"{c2s_tls}\"\ns2s = \"{s2s}\"\nhttp = \"{http}\"\nhttps = \"{https}\"\ngrpc = \"{grpc}\"\n"
        ));
        for v in &opts.vhosts {
            toml.push_str(&format!("[[vhosts]]\nname = \"{v}\"\n"));
        }
        // Fast failure delays keep the auth tests short; the doubling is what they check.
        toml.push_str("[auth]\nfailure_delay_ms = 100\nmax_failure_delay_ms = 1600\n");
        toml.push_str(&opts.extra_config);
        let config_path = dir.path().join("node.toml");
        std::fs::write(&config_path, toml)?;
        Ok(TestNode {
            child: None,
            dir,
            config_path,
            c2s,
            c2s_tls,
            s2s,
            http,
            https,
            grpc,
            cluster,
            advertised: opts
                .advertise_addr
                .clone()
                .unwrap_or_else(|| cluster.to_string()),
            node_id: opts.node_id,
            token_file: opts.admin_token_file.clone(),
            domain: opts.vhosts.first().cloned().unwrap_or_default(),
            wait_quorum: opts.wait_quorum,
            args: opts.args.clone(),
            nofile: opts.nofile,
        })
    }

    /// Appends TOML to the config file (before the node starts).
    pub fn append_config(&self, toml: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.config_path)?;
        writeln!(f, "\n{toml}")?;
        Ok(())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("node.log")
    }

    /// The node's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = Command::new(bin("xmpp-node"));
        if let Some((soft, hard)) = self.nofile {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: setrlimit only, between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let rl = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .arg("--config")
            .arg(&self.config_path)
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("TEST_NODE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (build it with `cargo build --bins`)",
                    bin("xmpp-node").display()
                )
            })?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!("xmpp-node exited with {status}:\n{}", self.log());
                }
            }
            let up = |a: SocketAddr| {
                std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok()
            };
            if up(self.c2s) && up(self.c2s_tls) && up(self.grpc) {
                break;
            }
            if Instant::now() > deadline {
                bail!("xmpp-node did not start listening:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.wait_quorum {
            self.wait_quorum(deadline)?;
        }
        Ok(())
    }

    fn status_json(&self) -> anyhow::Result<std::process::Output> {
        self.clusterctl_command()
            .args(["status", "--json"])
            .output()
            .context("cannot run clusterctl")
    }

    /// Waits until `clusterctl status` reports a quorum (exit status 0).
    pub fn wait_quorum(&mut self, deadline: Instant) -> anyhow::Result<()> {
        loop {
            let out = self.status_json()?;
            if out.status.success() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!("xmpp-node exited with {status}:\n{}", self.log());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "xmpp-node did not reach a quorum:\n{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `clusterctl status --json` as a JSON value (whatever its exit status).
    pub fn cluster_status(&self) -> anyhow::Result<serde_json::Value> {
        let out = self.status_json()?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "clusterctl status --json: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// SIGKILL: the process dies without any chance to flush.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: the graceful shutdown path.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            let pid = c.id().to_string();
            Command::new("kill").args(["-TERM", &pid]).status()?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    bail!("xmpp-node did not stop on SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Stops gracefully and starts again on the same addresses and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// Starts the node again on the same addresses and data after
    /// [`TestNode::kill`] or [`TestNode::stop`].
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("xmpp-node is still running");
        }
        self.spawn()
    }

    /// Replaces the command-line arguments (before the node starts).
    pub fn set_args(&mut self, args: Vec<String>) {
        self.args = args;
    }

    /// The id the node chose and keeps in its data dir (`node_id = 0`).
    pub fn kept_id(&self) -> Option<u64> {
        std::fs::read_to_string(self.dir.path().join("data").join("node.id"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Removes the data dir of a stopped node: a pod back with an empty volume.
    pub fn wipe_data(&self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("xmpp-node is still running");
        }
        let data = self.dir.path().join("data");
        if data.exists() {
            std::fs::remove_dir_all(&data)?;
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Runs `clusterctl --node <grpc> ARGS`; returns stdout, or an error with stderr.
    pub fn clusterctl(&self, args: &[&str]) -> anyhow::Result<String> {
        run_clusterctl(self.clusterctl_command(), args)
    }

    /// `clusterctl --node <grpc>`, with this node's token if it has one.
    pub fn clusterctl_command(&self) -> Command {
        let mut c = Command::new(bin("clusterctl"));
        c.arg("--node").arg(self.grpc.to_string());
        if let Some(t) = &self.token_file {
            c.arg("--token-file").arg(t);
        }
        c
    }

    /// Waits until this node sees `want` voting members and a quorum.
    pub fn wait_voters(&self, want: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.cluster_status()?;
            let voters = s["members"]
                .as_array()
                .map(|m| m.iter().filter(|m| m["role"] != "learner").count())
                .unwrap_or(0);
            if voters == want && s["quorum"] == true {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("members never reached {want}: {s}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Creates `user@<domain>` with this password.
    /// A fresh node of `localhost` with these accounts, all with `password`.
    pub fn with_users(users: &[&str], password: &str) -> anyhow::Result<TestNode> {
        let node = TestNode::start()?;
        for u in users {
            node.adduser(u, password)?;
        }
        Ok(node)
    }

    pub fn adduser(&self, user: &str, password: &str) -> anyhow::Result<()> {
        let jid = format!("{user}@{}", self.domain);
        self.clusterctl(&["adduser", &jid, "--password", password])
            .map(|_| ())
    }
}

/// `count` nodes of one cluster, each behind its own proxy in `net`
/// (advertising the proxy): node 1 bootstraps, the others join through it.
/// `opts(id, join)` gives each node's options.
pub fn cluster_behind(
    net: &crate::faultnet::FaultNet,
    count: u64,
    opts: impl Fn(u64, Vec<String>) -> NodeOptions,
) -> anyhow::Result<Vec<TestNode>> {
    let mut nodes: Vec<TestNode> = Vec::new();
    for id in 1..=count {
        let proxy = net.listen(id)?;
        let join = nodes
            .first()
            .map(|n| vec![n.advertised.clone()])
            .unwrap_or_default();
        let mut o = opts(id, join);
        o.advertise_addr = Some(proxy.to_string());
        let mut n = TestNode::create(o)?;
        net.route(id, n.cluster);
        n.start_again().with_context(|| format!("node {id}"))?;
        nodes.push(n);
    }
    if let Some(first) = nodes.first() {
        first.wait_voters(nodes.len())?;
    }
    Ok(nodes)
}

/// Runs `clusterctl --node <grpc> ARGS`; returns stdout, or an error with stderr.
pub fn clusterctl(grpc: SocketAddr, args: &[&str]) -> anyhow::Result<String> {
    let mut c = Command::new(bin("clusterctl"));
    c.arg("--node").arg(grpc.to_string());
    run_clusterctl(c, args)
}

fn run_clusterctl(mut c: Command, args: &[&str]) -> anyhow::Result<String> {
    let out = c.args(args).output().context("cannot run clusterctl")?;
    if !out.status.success() {
        bail!(
            "clusterctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
    }
}
