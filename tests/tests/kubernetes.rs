//! Pods of the StatefulSet in `deploy/kubernetes/`, as separate processes
//! with exactly the arguments its spec gives them (no node id; advertise
//! the pod's DNS name; join the list of pod names) and the pods' DNS names
//! mapped to loopback addresses in /etc/hosts, where a test can make a name
//! resolve late or vanish. Shows: pod 0 starts the cluster once no listed
//! peer has one, the others join by name even when their names resolve only
//! later; a pod back with an empty volume joins as a new member and its
//! stale self is removed; scaling 3 -> 5 -> 3 changes membership with no
//! operator command; a SIGTERM on the leader hands leadership over and
//! sends clients to another host.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use tests::client::{body, message, Client, WAIT};
use tests::hosts::Hosts;
use tests::node::{fresh_ip, NodeOptions, TestNode};
use xmpp::stanza::ns;

const PW: &str = "secret";
const PEER_PORT: u16 = 5291;

/// A namespace of our own, so names never collide with a parallel test.
fn namespace() -> String {
    let mut raw = [0u8; 4];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut raw);
    format!(
        "t{}",
        raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

struct StatefulSet {
    ns: String,
    hosts: Hosts,
    pods: Vec<Option<TestNode>>,
    ips: Vec<Ipv4Addr>,
    /// The Secrets' files: cluster CA and the one wildcard node
    /// certificate, and the admin token.
    secrets: tempfile::TempDir,
}

/// The container's `args` in deploy/kubernetes/base/statefulset.yaml.
fn pod_args_in_spec() -> Vec<String> {
    let spec = include_str!("../../deploy/kubernetes/base/statefulset.yaml");
    let mut lines = spec.lines().skip_while(|l| l.trim() != "args:");
    lines.next();
    lines
        .map(str::trim)
        .take_while(|l| l.starts_with("- "))
        .map(|l| l[2..].trim().to_owned())
        .collect()
}

impl StatefulSet {
    fn new() -> StatefulSet {
        let ns = namespace();
        let secrets = tempfile::tempdir().expect("temp dir");
        // As the README has operators make them: one certificate for
        // every pod's name.
        let out = std::process::Command::new(tests::node::bin("clusterctl"))
            .args(["certs", "init", "--dir"])
            .arg(secrets.path().join("cluster-tls"))
            .arg("--node")
            .arg(format!("1=*.xmpp-peers.{ns}.svc.cluster.local"))
            .output()
            .expect("clusterctl certs init");
        assert!(out.status.success(), "{out:?}");
        std::fs::write(
            secrets.path().join("token"),
            "a-test-admin-token-of-enough-length\n",
        )
        .expect("token");
        StatefulSet {
            ns,
            hosts: Hosts::new(),
            pods: Vec::new(),
            ips: Vec::new(),
            secrets,
        }
    }

    fn name(&self, i: usize) -> String {
        format!("xmpp-{i}.xmpp-peers.{}.svc.cluster.local", self.ns)
    }

    fn ip(&mut self, i: usize) -> Ipv4Addr {
        while self.ips.len() <= i {
            self.ips.push(fresh_ip());
        }
        self.ips[i]
    }

    /// The DNS name of pod `i` starts resolving.
    fn publish(&mut self, i: usize) {
        let (name, ip) = (self.name(i), self.ip(i));
        self.hosts.add(&name, ip).expect("/etc/hosts");
    }

    fn unpublish(&self, i: usize) {
        self.hosts.remove(&self.name(i)).expect("/etc/hosts");
    }

    /// Pod `i`'s arguments: the spec's, with `$(POD_NAME)` and
    /// `$(POD_NAMESPACE)` as Kubernetes fills them, and the mounted files'
    /// paths (`/etc/xmpp/...`, the volume) pointing at this test's copies.
    /// `--config` is the test node's own (it carries the test's addresses).
    fn args(&self, i: usize, data_dir: &std::path::Path) -> Vec<String> {
        let secrets = self.secrets.path();
        let file = |p: &str| -> String {
            let mapped = match p {
                "/etc/xmpp/cluster-tls/ca.crt" => secrets.join("cluster-tls/ca.crt"),
                "/etc/xmpp/cluster-tls/tls.crt" => secrets.join("cluster-tls/node-1.crt"),
                "/etc/xmpp/cluster-tls/tls.key" => secrets.join("cluster-tls/node-1.key"),
                "/etc/xmpp/admin/token" => secrets.join("token"),
                "/var/lib/xmpp/data" => data_dir.to_owned(),
                other => panic!("the spec mounts {other}: map it in this test"),
            };
            mapped.display().to_string()
        };
        let spec = pod_args_in_spec();
        let mut out = Vec::new();
        let mut it = spec.iter();
        while let Some(a) = it.next() {
            if a == "--config" {
                it.next();
                continue;
            }
            if a.starts_with('/') {
                out.push(file(a));
            } else {
                out.push(
                    a.replace("$(POD_NAME)", &format!("xmpp-{i}"))
                        .replace("$(POD_NAMESPACE)", &self.ns),
                );
            }
        }
        assert!(out.iter().any(|a| a == "--join"), "{spec:?}");
        out
    }

    /// Creates pod `i` (not started): the ConfigMap's settings in its file.
    fn create(&mut self, i: usize) {
        let ip = self.ip(i);
        let opts = NodeOptions {
            node_id: 0,
            ip: Some(ip),
            cluster_port: Some(PEER_PORT),
            wait_quorum: false,
            admin_token_file: Some(self.secrets.path().join("token")),
            cluster_config: "heartbeat_ms = 100\nelection_timeout_ms = 600\nnode_down_grace_secs = 2\nbootstrap_wait_secs = 2\nremove_unresolvable_after_secs = 3\nsee_other_host = \"xmpp.example.test\"\n".into(),
            ..NodeOptions::default()
        };
        let mut pod = TestNode::create(opts).expect("pod");
        let args = self.args(i, &pod.dir.path().join("data"));
        pod.set_args(args);
        while self.pods.len() <= i {
            self.pods.push(None);
        }
        self.pods[i] = Some(pod);
    }

    fn pod(&mut self, i: usize) -> &mut TestNode {
        self.pods[i].as_mut().expect("pod exists")
    }

    fn start(&mut self, i: usize) {
        self.pod(i).start_again().expect("pod starts");
    }

    /// Waits until every running pod sees `want` voters with a quorum.
    fn wait_voters(&mut self, want: usize) {
        for p in self.pods.iter().flatten() {
            if p.pid().is_some() {
                p.wait_voters(want)
                    .unwrap_or_else(|e| panic!("{e}\n{}", p.log()));
            }
        }
    }

    fn members(&self, via: usize) -> Vec<(u64, String)> {
        let s = self.pods[via]
            .as_ref()
            .expect("pod")
            .cluster_status()
            .expect("status");
        s["members"]
            .as_array()
            .expect("members")
            .iter()
            .filter(|m| m["role"] != "learner")
            .map(|m| {
                (
                    m["id"].as_u64().expect("id"),
                    m["addr"].as_str().expect("addr").to_owned(),
                )
            })
            .collect()
    }
}

/// The HTTP status of a GET on a pod's probe port.
async fn status(http: std::net::SocketAddr, path: &str) -> u16 {
    tests::http::request(http, "GET", path, &[], "")
        .await
        .map(|r| r.status)
        .unwrap_or(0)
}

/// Sends a message from a user on pod `a` to a user on pod `b` and
/// checks it arrives.
async fn message_crosses(set: &mut StatefulSet, a: usize, b: usize, text: &str) {
    let pa = set.pods[a].as_ref().unwrap();
    let pb = set.pods[b].as_ref().unwrap();
    let mut alice = Client::login_bound(pa, "alice", PW, "a").await.unwrap();
    let mut bob = Client::login_bound(pb, "bob", PW, "b").await.unwrap();
    bob.presence(1).await.unwrap();
    bob.sync().await.unwrap();
    alice.send(&message("bob@localhost/b", text)).await.unwrap();
    // (An earlier message may come again first: a connection dropped
    // without closing its stream hands its last deliveries on.)
    bob.recv_until(|e| body(e).as_deref() == Some(text), WAIT)
        .await
        .unwrap_or_else(|e| panic!("{text}: {e}"));
}

#[tokio::test]
async fn pods_join_by_names_that_resolve_late_and_an_empty_volume_replaces_its_old_self() {
    let mut set = StatefulSet::new();
    for i in 0..3 {
        set.create(i);
    }
    // All three start at once (podManagementPolicy: Parallel); only pod
    // 0's name resolves yet.
    set.publish(0);
    for i in 0..3 {
        set.start(i);
    }
    std::thread::sleep(Duration::from_secs(3));
    // Pods whose names do not resolve cannot be reached, so they are not
    // members yet: alive, but not ready (Kubernetes sends them no clients).
    for i in 1..3 {
        let http = set.pods[i].as_ref().unwrap().http;
        assert_eq!(status(http, "/healthz").await, 200);
        assert_eq!(
            status(http, "/readyz").await,
            503,
            "pod {i} is not a member yet"
        );
    }
    set.publish(1);
    set.publish(2);
    set.wait_voters(3);
    for i in 0..3 {
        let http = set.pods[i].as_ref().unwrap().http;
        let deadline = Instant::now() + Duration::from_secs(20);
        while status(http, "/readyz").await != 200 {
            assert!(Instant::now() < deadline, "pod {i} never turned ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Every member is known by its DNS name, under an id it chose itself.
    let members = set.members(0);
    for i in 0..3 {
        let name = format!("{}:{PEER_PORT}", set.name(i));
        let kept = set.pods[i].as_ref().unwrap().kept_id().expect("id kept");
        assert!(
            members.contains(&(kept, name.clone())),
            "{name} as {kept} in {members:?}"
        );
    }
    let p0 = set.pods[0].as_ref().unwrap();
    p0.adduser("alice", PW).unwrap();
    p0.adduser("bob", PW).unwrap();
    message_crosses(&mut set, 0, 2, "across pods").await;

    // Pod 2 comes back with an empty volume: a new member under a new id,
    // and its old self is gone from the membership.
    let old = set.pods[2].as_ref().unwrap().kept_id().unwrap();
    set.pod(2).kill();
    set.pod(2).wipe_data().unwrap();
    set.start(2);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let new = set.pods[2].as_ref().unwrap().kept_id();
        let members = set.members(0);
        let ids: Vec<u64> = members.iter().map(|m| m.0).collect();
        if new.is_some_and(|n| n != old && ids.contains(&n))
            && !ids.contains(&old)
            && ids.len() == 3
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "old {old}, new {new:?}, members {members:?}\n{}",
            set.pods
                .iter()
                .flatten()
                .flat_map(|p| p
                    .log()
                    .lines()
                    .filter(|l| l.contains("panic") || l.contains("ERROR"))
                    .map(str::to_owned)
                    .collect::<Vec<_>>())
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    set.wait_voters(3);
    // It serves: accounts made before it was wiped log in through it.
    message_crosses(&mut set, 2, 1, "after the new volume").await;
}

#[tokio::test]
async fn scaling_changes_membership_and_sigterm_hands_over_and_moves_clients() {
    let mut set = StatefulSet::new();
    for i in 0..3 {
        set.create(i);
        set.publish(i);
    }
    for i in 0..3 {
        set.start(i);
    }
    set.wait_voters(3);

    // Scale to 5: the new pods join by name; nobody runs a command.
    for i in 3..5 {
        set.create(i);
        set.publish(i);
        set.start(i);
    }
    set.wait_voters(5);

    // Scale back to 3: the pods go, and so do their names.
    for i in (3..5).rev() {
        set.pod(i).stop().unwrap();
        set.unpublish(i);
    }
    set.wait_voters(3);
    let names: Vec<String> = set.members(0).into_iter().map(|m| m.1).collect();
    for i in 0..3 {
        assert!(
            names.contains(&format!("{}:{PEER_PORT}", set.name(i))),
            "{names:?}"
        );
    }

    // SIGTERM on the leader: a client is sent to another host, and
    // another pod leads at once (no election timeout to wait out).
    let leader = (0..3)
        .find(|&i| {
            set.pods[i]
                .as_ref()
                .and_then(|p| p.cluster_status().ok())
                .is_some_and(|s| s["role"] == "leader")
        })
        .expect("a leader");
    let p = set.pods[leader].as_ref().unwrap();
    p.adduser("carol", PW).unwrap();
    let mut carol = Client::login_bound(p, "carol", PW, "c").await.unwrap();
    set.pod(leader).stop().unwrap();
    let e = carol
        .recv_until(|e| e.is("error", ns::STREAM), WAIT)
        .await
        .expect("a stream error");
    let host = e
        .get_child("see-other-host", "urn:ietf:params:xml:ns:xmpp-streams")
        .map(|h| h.text_content());
    assert_eq!(host.as_deref(), Some("xmpp.example.test"));
    let log = set.pods[leader].as_ref().unwrap().log();
    assert!(
        log.contains("handed leadership over before shutting down"),
        "{log}"
    );
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    for &i in &others {
        let s = set.pods[i].as_ref().unwrap().cluster_status().unwrap();
        assert!(s["leader"].as_u64().is_some(), "{s}");
    }
}

/// One roster write through whichever pod answers first, starting at
/// `first`; `Ok(true)` when the server acknowledged it (IQ result).
async fn roster_write(c2s: &[std::net::SocketAddr], first: usize, n: u32) -> (usize, bool) {
    for k in 0..c2s.len() {
        let at = (first + k) % c2s.len();
        let Ok(mut c) = Client::login_at(c2s[at], "localhost", "writer", PW, "w").await else {
            continue;
        };
        let item = xmpp::element::Element::new("item", ns::ROSTER)
            .attr("jid", format!("contact{n}@example.net"));
        let iq = c.make_iq(
            "set",
            None,
            xmpp::element::Element::new("query", ns::ROSTER).child(item),
        );
        match c.iq(iq).await {
            Ok(r) => return (at, r.get_attr("type") == Some("result")),
            Err(_) => continue,
        }
    }
    (first, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_writes_loses_no_acknowledged_write() {
    let mut set = StatefulSet::new();
    for i in 0..3 {
        set.create(i);
        set.publish(i);
    }
    for i in 0..3 {
        set.start(i);
    }
    set.wait_voters(3);
    set.pods[0].as_ref().unwrap().adduser("writer", PW).unwrap();
    let c2s: Vec<std::net::SocketAddr> = set.pods.iter().flatten().map(|p| p.c2s).collect();

    // A client writes without pause, each write on a new login, moving to
    // the next pod whenever one does not answer (as a client behind the
    // Service would be sent to a live pod).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    let writer = {
        let (stop, acked, c2s) = (stop.clone(), acked.clone(), c2s.clone());
        tokio::spawn(async move {
            let (mut at, mut n) = (0, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (used, ok) = roster_write(&c2s, at, n).await;
                at = used;
                if ok {
                    acked.lock().unwrap().push(n);
                }
                n += 1;
            }
        })
    };
    let count = || acked.lock().unwrap().len();
    let wait_progress = |before: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while count() < before + 3 {
            assert!(Instant::now() < deadline, "writes stopped after {before}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_progress(0);
    // Pod by pod, as `kubectl rollout restart` does: SIGTERM, start, ready.
    for i in (0..3).rev() {
        let before = count();
        let mut pod = set.pods[i].take().unwrap();
        let pod = tokio::task::spawn_blocking(move || {
            pod.stop().expect("drains on SIGTERM");
            pod.start_again().expect("starts again");
            pod
        })
        .await
        .unwrap();
        set.pods[i] = Some(pod);
        set.wait_voters(3);
        // Writes went on through the restart.
        wait_progress(before);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();

    // Every acknowledged write is there, read through every pod.
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 12, "{acked:?}");
    for p in set.pods.iter().flatten() {
        let mut c = Client::login_at(p.c2s, "localhost", "writer", PW, "check")
            .await
            .unwrap();
        let iq = c.make_iq(
            "get",
            None,
            xmpp::element::Element::new("query", ns::ROSTER),
        );
        let roster = c.iq(iq).await.unwrap();
        let have: std::collections::HashSet<String> = roster
            .get_child("query", ns::ROSTER)
            .map(|q| {
                q.elements()
                    .filter_map(|i| i.get_attr("jid"))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        for n in &acked {
            assert!(
                have.contains(&format!("contact{n}@example.net")),
                "acknowledged write {n} missing on a pod"
            );
        }
    }
}
