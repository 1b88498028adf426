//! Stanzas between nodes (DESIGN.md, "The life of a stanza", step 3): one
//! queue and one sender task per peer node, batching whatever waits, one
//! batch in flight on the peer's long-lived HTTP/2 connection.
//!
//! A batch the peer did not acknowledge (it is down, or the connection
//! broke) comes back through `returned`: the node applies the delivery
//! rules to it locally (offline storage or an error), so a stanza is never
//! dropped silently.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use proto::{ForwardBatch, Forwarded};
use tokio::sync::mpsc;

use super::network::Channels;

/// Most stanzas in one batch.
const BATCH: usize = 512;
/// Stanzas waiting for one peer before the sender is refused.
const QUEUE: usize = 65_536;

pub struct Forwarder {
    me: u64,
    channels: Arc<Channels>,
    queues: Mutex<HashMap<u64, mpsc::Sender<Forwarded>>>,
    returned: mpsc::UnboundedSender<Forwarded>,
}

impl Forwarder {
    pub fn new(
        me: u64,
        channels: Arc<Channels>,
        returned: mpsc::UnboundedSender<Forwarded>,
    ) -> Forwarder {
        Forwarder {
            me,
            channels,
            queues: Mutex::new(HashMap::new()),
            returned,
        }
    }

    /// Hands `f` to the local delivery rules.
    pub fn give_back(&self, f: Forwarded) {
        let _ = self.returned.send(f);
    }

    /// Queues `f` for `node` at `addr`. A full queue hands the stanza
    /// straight back to the local rules.
    pub fn send(&self, node: u64, addr: &str, f: Forwarded) {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let tx = queues.entry(node).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(run(
                self.me,
                addr.to_owned(),
                self.channels.clone(),
                rx,
                self.returned.clone(),
            ));
            tx
        });
        if let Err(e) = tx.try_send(f) {
            let f = match e {
                mpsc::error::TrySendError::Full(f) | mpsc::error::TrySendError::Closed(f) => f,
            };
            if tx.is_closed() {
                queues.remove(&node);
            }
            let _ = self.returned.send(f);
        }
    }
}

async fn run(
    me: u64,
    addr: String,
    channels: Arc<Channels>,
    mut rx: mpsc::Receiver<Forwarded>,
    returned: mpsc::UnboundedSender<Forwarded>,
) {
    while let Some(first) = rx.recv().await {
        let mut stanzas = vec![first];
        while stanzas.len() < BATCH {
            match rx.try_recv() {
                Ok(f) => stanzas.push(f),
                Err(_) => break,
            }
        }
        let batch = ForwardBatch {
            from_node: me,
            stanzas,
        };
        let sent = match channels.get(&addr) {
            Ok(mut client) => client.forward(batch.clone()).await.map(|_| ()),
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
        if let Err(status) = sent {
            tracing::warn!(peer = %addr, error = %status, stanzas = batch.stanzas.len(), "forwarding to a peer node failed; delivering those stanzas by the local rules");
            for f in batch.stanzas {
                let _ = returned.send(f);
            }
        }
    }
}
