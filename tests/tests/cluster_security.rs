//! Security between nodes and around the admin API: mutual TLS with a
//! cluster CA made by `clusterctl certs init` (a node with a certificate
//! from another CA is not let in), and the admin token.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::client::Client;
use tests::node::{bin, fresh_ip, NodeOptions, TestNode};

fn certs_init(dir: &Path, nodes: &[(u64, std::net::Ipv4Addr)]) {
    let mut c = Command::new(bin("clusterctl"));
    c.args(["certs", "init", "--dir"]).arg(dir);
    for (id, ip) in nodes {
        c.arg("--node").arg(format!("{id}={ip}"));
    }
    let out = c.output().expect("clusterctl certs init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tls_opts(id: u64, ip: std::net::Ipv4Addr, dir: &Path, join: Vec<String>) -> NodeOptions {
    NodeOptions {
        node_id: id,
        ip: Some(ip),
        join,
        cluster_config: format!(
            "ca = {:?}\ncert = {:?}\nkey = {:?}\nheartbeat_ms = 100\nelection_timeout_ms = 600\n",
            dir.join("ca.crt"),
            dir.join(format!("node-{id}.crt")),
            dir.join(format!("node-{id}.key")),
        ),
        ..NodeOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_talk_mutual_tls_and_refuse_a_node_from_another_ca() {
    let certs = tempfile::tempdir().expect("tempdir");
    let ours = certs.path().join("ours");
    let theirs = certs.path().join("theirs");
    let (ip1, ip2, ip3) = (fresh_ip(), fresh_ip(), fresh_ip());
    certs_init(&ours, &[(1, ip1), (2, ip2)]);
    certs_init(&theirs, &[(3, ip3)]);
    for key in ["ca.key", "node-1.key", "node-2.key"] {
        let mode = std::fs::metadata(ours.join(key))
            .expect("key file")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077,
            0,
            "{key} is readable by others"
        );
    }

    let n1 = TestNode::start_with(tls_opts(1, ip1, &ours, vec![])).expect("node 1");
    let n2 = TestNode::start_with(tls_opts(2, ip2, &ours, vec![n1.cluster.to_string()]))
        .expect("node 2");
    n1.wait_voters(2).expect("two voters over TLS");
    // Replication and forwarding work over TLS: made on 2, used on 1.
    n2.adduser("alice", "secret").expect("adduser via node 2");
    let c = Client::login_bound(&n1, "alice", "secret", "r").await;
    assert!(c.is_ok(), "{:?}", c.err());

    // A node with a certificate from another CA cannot get in.
    let n3 = TestNode::start_with(NodeOptions {
        wait_quorum: false,
        ..tls_opts(3, ip3, &theirs, vec![n1.cluster.to_string()])
    })
    .expect("node 3 starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    // Two refusals: not a node that was merely early.
    while n3
        .log()
        .matches("cannot join through this member yet")
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "no join attempt:\n{}", n3.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = n1.cluster_status().expect("status");
    assert_eq!(
        s["members"].as_array().map(Vec::len),
        Some(2),
        "a stranger got in: {s}"
    );
}

#[test]
fn the_admin_api_wants_its_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").expect("token");
    let n = TestNode::start_with(NodeOptions {
        admin_token_file: Some(token.clone()),
        ..NodeOptions::default()
    })
    .expect("node");
    // With the token (TestNode passes it): works.
    n.adduser("bob", "secret").expect("adduser with the token");
    // Without it, or with a wrong one: refused, naming the fix.
    let wrong = dir.path().join("wrong.token");
    std::fs::write(&wrong, "not-the-token-at-all-0000").expect("wrong token");
    for extra in [
        vec![],
        vec!["--token-file".to_owned(), wrong.display().to_string()],
    ] {
        let out = Command::new(bin("clusterctl"))
            .arg("--node")
            .arg(n.grpc.to_string())
            .args(&extra)
            .arg("users")
            .output()
            .expect("clusterctl");
        assert!(!out.status.success(), "users listed without the token");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--token-file"), "{err}");
    }
    // The password comes from stdin when piped, never from argv.
    let mut child = n
        .clusterctl_command()
        .args(["adduser", "carol@localhost"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("clusterctl adduser");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), b"from-stdin\n")
        .expect("write password");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let c = rt.block_on(Client::login_bound(&n, "carol", "from-stdin", "r"));
    assert!(c.is_ok(), "{:?}", c.err());
}
