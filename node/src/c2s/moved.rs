//! Stream resumption across nodes (XEP-0198 §5 in a cluster): behind a load
//! balancer a phone's new connection lands on any node, rarely the one its
//! waiting session is on. The node it lands on asks the other members
//! (`Peer.TakeSession`); the one holding the session hands its state over
//! (what the client has not acknowledged, presence, carbons, directed
//! presence) and lets it go without a trace; the asking node binds the same
//! full JID (its binding replaces the old one in the replicated table, so
//! rooms and contacts see nothing) and resumes the stream.

use futures_util::future::join_all;
use proto::{TakeSessionReply, TakeSessionRequest};
use tokio::sync::oneshot;
use xmpp::jid::BareJid;

use super::sm::{Handoff, Migrated};
use crate::Server;

/// How long a holder may take to hand over.
const HANDOVER: std::time::Duration = std::time::Duration::from_secs(5);

/// Asks every other member for the session `previd` of `user`.
pub async fn take(server: &Server, previd: &str, user: &BareJid, h: u32) -> Option<Migrated> {
    let cluster = &server.cluster;
    let peers: Vec<String> = {
        let m = cluster.raft.metrics().borrow().clone();
        m.membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != cluster.id)
            .map(|(_, n)| n.addr.clone())
            .collect()
    };
    let asks = peers.iter().map(|addr| async move {
        let mut client = cluster.channels.get(addr).ok()?;
        let req = TakeSessionRequest {
            previd: previd.to_owned(),
            user: user.to_string(),
            h,
        };
        let reply = match tokio::time::timeout(HANDOVER * 2, client.take_session(req)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(e)) => {
                tracing::debug!(peer = %addr, error = %e, "cannot ask a member for the session");
                return None;
            }
            Err(_) => {
                tracing::debug!(peer = %addr, "a member did not answer in time about the session");
                return None;
            }
        };
        reply.found.then(|| migrated(previd, h, reply))
    });
    // At most one member holds it; each hands it over at most once.
    join_all(asks).await.into_iter().flatten().next()
}

fn migrated(previd: &str, h: u32, r: TakeSessionReply) -> Migrated {
    Migrated {
        id: previd.to_owned(),
        jid: r.jid,
        handled: r.handled,
        acked: h,
        unacked: r.unacked,
        directed: r.directed,
        carbons: r.carbons,
        interested: r.interested,
        available: r.available,
        priority: r.priority.clamp(i8::MIN.into(), i8::MAX.into()) as i8,
        presence: (!r.presence.is_empty()).then_some(r.presence),
        inactive: r.inactive,
    }
}

/// On the holder: hands the session over if it is here and `user`'s.
pub async fn give(server: &Server, req: TakeSessionRequest) -> TakeSessionReply {
    let none = TakeSessionReply::default();
    let Ok(user) = BareJid::parse(&req.user) else {
        return none;
    };
    let Some(tx) = server.resumable.find(&req.previd, &user) else {
        tracing::debug!(previd = %req.previd, %user, "asked for a session this node does not hold");
        return none;
    };
    let (reply, answer) = oneshot::channel();
    let ask = Handoff::Migrate { h: req.h, reply };
    if tx.send(Box::new(ask)).await.is_err() {
        return none;
    }
    let Ok(Ok(Some(m))) = tokio::time::timeout(HANDOVER, answer).await else {
        return none;
    };
    TakeSessionReply {
        found: true,
        jid: m.jid,
        handled: m.handled,
        unacked: m.unacked,
        directed: m.directed,
        carbons: m.carbons,
        interested: m.interested,
        available: m.available,
        priority: m.priority.into(),
        presence: m.presence.unwrap_or_default(),
        inactive: m.inactive,
    }
}
