//! `clusterctl`: operate a node over its admin gRPC API, the way
//! `prosodyctl` and `ejabberdctl` operate theirs.

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use proto::admin_client::AdminClient;
use proto::*;

#[derive(Parser)]
#[command(name = "clusterctl", version, about = "Operate an xmpp-node cluster")]
struct Cli {
    /// Admin gRPC address of the node (its --grpc-addr).
    #[arg(
        long,
        env = "XMPP_NODE",
        default_value = "127.0.0.1:5290",
        global = true
    )]
    node: String,
    /// A file holding the node's admin token (its `admin.token_file`).
    #[arg(long, env = "XMPP_ADMIN_TOKEN_FILE", global = true)]
    token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// This node and the cluster: members, roles, leader, term, indexes,
    /// lag, sessions per node, health. Exits 3 without quorum.
    Status {
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Add a node (started with --join, or by hand) to the cluster.
    Join {
        /// The new node's id (its --node-id).
        node_id: u64,
        /// The new node's cluster address (its --advertise-addr).
        addr: String,
    },
    /// Remove a node from the cluster (passed on to the leader).
    RemoveNode { node_id: u64 },
    /// Remove the node this command talks to from the cluster.
    Leave,
    /// Ask `node_id` to take over leadership.
    TransferLeader { node_id: u64 },
    /// Create an account; prompts for the password unless --password is given.
    Adduser {
        jid: String,
        #[arg(long, env = "XMPP_PASSWORD")]
        password: Option<String>,
    },
    /// Change an account's password.
    Passwd {
        jid: String,
        #[arg(long, env = "XMPP_PASSWORD")]
        password: Option<String>,
    },
    /// Delete an account and close its sessions.
    Deluser { jid: String },
    /// List the accounts of a virtual host (all hosts when omitted).
    Users { vhost: Option<String> },
    /// List the live sessions of the whole cluster, each with its node.
    Sessions {
        vhost: Option<String>,
        /// Only the sessions bound on the node this command talks to.
        #[arg(long)]
        local: bool,
        /// One JSON object: `sessions` and the `unreachable` nodes.
        #[arg(long)]
        json: bool,
    },
    /// Disconnect a session (full JID) or all of a user's sessions (bare
    /// JID), on whichever nodes they are bound.
    Kick {
        jid: String,
        /// The text of the stream error the client gets.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// This node's server-to-server streams: remote domain, direction,
    /// state, how the peer authenticated, TLS version, age, queued stanzas.
    S2s,
    /// Make TLS material for mutual TLS between nodes.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Create accounts from a file of `user@domain;password` lines.
    ImportUsers {
        file: std::path::PathBuf,
        /// Replace the password of accounts that already exist.
        #[arg(long)]
        update_existing: bool,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// A cluster CA and one certificate per node, written to DIR:
    /// ca.crt, ca.key, node-ID.crt, node-ID.key (keys mode 0600).
    Init {
        /// Where to write them (created if missing; existing files are kept).
        #[arg(long)]
        dir: std::path::PathBuf,
        /// ID=HOST for each node: HOST is what peers dial (its advertised
        /// address without the port), an IP address or a DNS name.
        #[arg(long, required = true)]
        node: Vec<String>,
    },
}

fn certs_init(dir: &std::path::Path, nodes: &[String]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut list = Vec::new();
    for n in nodes {
        let (id, host) = n
            .split_once('=')
            .with_context(|| format!("--node {n}: expected ID=HOST, e.g. 1=10.0.0.1"))?;
        let id: u64 = id
            .parse()
            .with_context(|| format!("--node {n}: {id} is not a node id"))?;
        list.push((id, host.to_owned()));
    }
    let issued = node::cluster::peer_tls::issue(&list).context("cannot make the certificates")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: String, text: &str, secret: bool| -> anyhow::Result<()> {
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(&path)
            .with_context(|| {
                format!(
                    "cannot create {} (already there? certs init never overwrites)",
                    path.display()
                )
            })?;
        std::io::Write::write_all(&mut f, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))
    };
    write("ca.crt".into(), &issued.ca_cert, false)?;
    write("ca.key".into(), &issued.ca_key, true)?;
    for (id, cert, key) in &issued.nodes {
        write(format!("node-{id}.crt"), cert, false)?;
        write(format!("node-{id}.key"), key, true)?;
    }
    println!(
        "wrote ca.crt, ca.key and node-ID.crt/.key in {}; on node ID:",
        dir.display()
    );
    println!(
        "[cluster]\nca = \"{0}/ca.crt\"\ncert = \"{0}/node-ID.crt\"\nkey = \"{0}/node-ID.key\"",
        dir.display()
    );
    Ok(())
}

fn password(given: Option<String>, confirm: bool) -> anyhow::Result<String> {
    if let Some(p) = given {
        return Ok(p);
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        // Piped: `printf '%s\n' "$PW" | clusterctl adduser JID`.
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .context("cannot read the password from stdin")?;
        let p = line.trim_end_matches(['\r', '\n']).to_owned();
        if p.is_empty() {
            bail!("no password on stdin");
        }
        return Ok(p);
    }
    let p = rpassword::prompt_password("Password: ").context("cannot read the password")?;
    if confirm {
        let again = rpassword::prompt_password("Again: ").context("cannot read the password")?;
        if again != p {
            bail!("the passwords differ");
        }
    }
    Ok(p)
}

fn print_status(s: &StatusReply, cs: &ClusterStatusReply) {
    println!("node       {} ({})", s.node_id, cs.role);
    println!("version    {}", s.version);
    println!("uptime     {}s", s.uptime_seconds);
    println!("vhosts     {}", s.vhosts.join(", "));
    println!("sessions   {}", s.sessions);
    println!("accounts   {}", s.accounts);
    println!(
        "c2s        {} (STARTTLS), {} (direct TLS)",
        s.c2s_addr, s.c2s_tls_addr
    );
    println!("data dir   {}", s.data_dir);
    println!(
        "cluster    leader {}, term {}, commit {}, applied {}, last log {}",
        cs.leader, cs.term, cs.commit_index, cs.applied_index, cs.last_log_index
    );
    println!("health     {}", cs.health);
    println!();
    println!(
        "{:>4}  {:<22} {:<9} {:<10} {:>12} {:>8} {:>6} {:>8}",
        "id", "address", "role", "reachable", "last contact", "matched", "lag", "sessions"
    );
    for m in &cs.members {
        let contact = if m.last_contact_ms < 0 {
            "-".to_string()
        } else {
            format!("{} ms", m.last_contact_ms)
        };
        println!(
            "{:>4}  {:<22} {:<9} {:<10} {:>12} {:>8} {:>6} {:>8}",
            m.id,
            m.addr,
            m.role,
            if m.reachable { "yes" } else { "no" },
            contact,
            m.matched,
            m.lag,
            m.sessions
        );
    }
}

fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", e.message())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let url = if cli.node.contains("://") {
        cli.node.clone()
    } else {
        format!("http://{}", cli.node)
    };
    if let Cmd::Certs {
        cmd: CertsCmd::Init { dir, node },
    } = &cli.cmd
    {
        return certs_init(dir, node);
    }
    let auth = match &cli.token_file {
        Some(path) => {
            let t = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?;
            Some(
                tonic::metadata::MetadataValue::try_from(format!("Bearer {}", t.trim()))
                    .context("the token file holds characters a header cannot carry")?,
            )
        }
        None => None,
    };
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .context("--node is not an address")?
        .connect()
        .await
        .with_context(|| format!("cannot reach the node's admin API at {}; is xmpp-node running, and is --node its --grpc-addr?", cli.node))?;
    let mut c = AdminClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        if let Some(v) = &auth {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    })
    // A whole cluster's sessions or accounts exceed tonic's 4 MiB default.
    .max_decoding_message_size(256 * 1024 * 1024);
    match cli.cmd {
        Cmd::Status { json } => {
            let s = c
                .status(StatusRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            let cs = c
                .cluster_status(ClusterStatusRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                let members: Vec<serde_json::Value> = cs
                    .members
                    .iter()
                    .map(|m| {
                        serde_json::json!({
                            "id": m.id, "addr": m.addr, "role": m.role,
                            "reachable": m.reachable, "last_contact_ms": m.last_contact_ms,
                            "matched": m.matched, "lag": m.lag, "sessions": m.sessions,
                        })
                    })
                    .collect();
                let v = serde_json::json!({
                    "node": s.node_id, "version": s.version, "uptime_seconds": s.uptime_seconds,
                    "vhosts": s.vhosts, "sessions": s.sessions, "accounts": s.accounts,
                    "role": cs.role, "leader": cs.leader, "term": cs.term,
                    "commit_index": cs.commit_index, "applied_index": cs.applied_index,
                    "last_log_index": cs.last_log_index, "quorum": cs.quorum,
                    "health": cs.health, "members": members,
                });
                println!("{v}");
            } else {
                print_status(&s, &cs);
            }
            if !cs.quorum {
                std::process::exit(3);
            }
        }
        Cmd::Join { node_id, addr } => {
            let r = c
                .add_node(AddNodeRequest { node_id, addr })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("members: {}", r.members.join(", "));
        }
        Cmd::RemoveNode { node_id } => {
            let r = c
                .remove_node(RemoveNodeRequest { node_id })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("members: {}", r.members.join(", "));
        }
        Cmd::Leave => {
            let me = c
                .status(StatusRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .node_id;
            let r = c
                .remove_node(RemoveNodeRequest { node_id: me })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("node {me} left; members: {}", r.members.join(", "));
        }
        Cmd::TransferLeader { node_id } => {
            let r = c
                .transfer_leader(TransferLeaderRequest { node_id })
                .await
                .map_err(status_error)?
                .into_inner();
            if r.leader == node_id {
                println!("node {node_id} is the leader");
            } else {
                bail!(
                    "node {node_id} stood for election, but the leader is {}",
                    r.leader
                );
            }
        }
        Cmd::Adduser { jid, password: p } => {
            let password = password(p, true)?;
            c.add_user(AddUserRequest {
                jid: jid.clone(),
                password,
            })
            .await
            .map_err(status_error)?;
            println!("created {jid}");
        }
        Cmd::Passwd { jid, password: p } => {
            let password = password(p, true)?;
            c.set_password(SetPasswordRequest {
                jid: jid.clone(),
                password,
            })
            .await
            .map_err(status_error)?;
            println!("changed the password of {jid}");
        }
        Cmd::Deluser { jid } => {
            c.delete_user(DeleteUserRequest { jid: jid.clone() })
                .await
                .map_err(status_error)?;
            println!("deleted {jid}");
        }
        Cmd::Users { vhost } => {
            let r = c
                .list_users(ListUsersRequest {
                    vhost: vhost.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            for j in r.jids {
                println!("{j}");
            }
        }
        Cmd::Sessions { vhost, local, json } => {
            let r = c
                .list_sessions(ListSessionsRequest {
                    vhost: vhost.unwrap_or_default(),
                    local,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                let sessions: Vec<serde_json::Value> = r
                    .sessions
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "jid": s.jid, "node": s.node, "priority": s.priority,
                            "available": s.available,
                            "peer": (!s.peer.is_empty()).then_some(&s.peer),
                            "tls": (!s.peer.is_empty()).then_some(s.tls),
                        })
                    })
                    .collect();
                let v = serde_json::json!({ "sessions": sessions, "unreachable": r.unreachable });
                println!("{v}");
                return Ok(());
            }
            for s in r.sessions {
                println!(
                    "{}\tnode={}\tpriority={}\t{}\t{}\t{}",
                    s.jid,
                    s.node,
                    s.priority,
                    if s.available {
                        "available"
                    } else {
                        "unavailable"
                    },
                    if s.peer.is_empty() { "-" } else { &s.peer },
                    match (s.peer.is_empty(), s.tls) {
                        (true, _) => "-",
                        (false, true) => "tls",
                        (false, false) => "plain",
                    }
                );
            }
            for n in r.unreachable {
                eprintln!(
                    "node {n} could not list its sessions (no answer, or an error): they are listed from the session table, without address or TLS"
                );
            }
        }
        Cmd::Kick { jid, reason } => {
            let r = c
                .kick(KickRequest { jid, reason })
                .await
                .map_err(status_error)?
                .into_inner();
            for j in r.closed {
                println!("closed {j}");
            }
        }
        Cmd::S2s => {
            let r = c
                .list_s2s(proto::ListS2sRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if !r.enabled {
                println!("federation is off on this node (s2s.enabled = false)");
                return Ok(());
            }
            println!(
                "{:<24} {:<9} {:<16} {:<15} {:<13} {:<8} {:>7} {:>7}  peer",
                "remote", "direction", "local", "state", "auth", "tls", "age", "queued"
            );
            for s in r.streams {
                let tls = if s.tls.is_empty() {
                    "none".to_owned()
                } else {
                    s.tls.replace("TLSv1_", "1.")
                };
                println!(
                    "{:<24} {:<9} {:<16} {:<15} {:<13} {:<8} {:>6}s {:>7}  {}{}",
                    s.remote,
                    s.direction,
                    s.local,
                    s.state,
                    s.auth,
                    tls,
                    s.age_seconds,
                    s.queued,
                    s.peer,
                    if s.cert_valid {
                        " (certificate valid)"
                    } else {
                        ""
                    }
                );
            }
        }
        // Made locally, before connecting to any node.
        Cmd::Certs { .. } => {}
        Cmd::ImportUsers {
            file,
            update_existing,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let mut users = Vec::new();
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let Some((jid, password)) = line.split_once(';') else {
                    bail!(
                        "{}:{}: expected `user@domain;password`",
                        file.display(),
                        i + 1
                    );
                };
                users.push(NewUser {
                    jid: jid.trim().to_owned(),
                    password: password.to_owned(),
                });
            }
            let (mut created, mut updated, mut skipped) = (0, 0, 0);
            let started = std::time::Instant::now();
            for chunk in users.chunks(5000) {
                let r = c
                    .import_users(ImportUsersRequest {
                        users: chunk.to_vec(),
                        update_existing,
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                created += r.created;
                updated += r.updated;
                skipped += r.skipped;
            }
            println!(
                "imported {} accounts in {:.1}s: {created} created, {updated} updated, {skipped} skipped (existing)",
                users.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
