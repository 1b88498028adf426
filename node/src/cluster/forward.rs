//! Stanzas between nodes (DESIGN.md, "The life of a stanza", step 3): one
//! queue per peer node and one long-lived gRPC stream (`ForwardStream`)
//! on the peer's HTTP/2 connection. Whatever waits in the queue when the
//! stream is polled travels as one batch; the peer acknowledges, with a
//! running count, what it handed to its sessions (or to its own delivery
//! rules), coalescing acknowledgements while batches keep arriving.
//!
//! What the peer did not acknowledge when the stream breaks (it is down,
//! or the connection failed) comes back through `returned`: the node
//! applies the delivery rules to it locally (offline storage or an error),
//! so a stanza is never dropped silently. Delivery is at-least-once: a
//! batch delivered whose acknowledgement was lost with the connection is
//! also given back.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use futures_util::Stream;
use proto::{ForwardBatch, Forwarded};
use tokio::sync::mpsc;

use super::network::Channels;

/// Most stanzas in one batch.
const BATCH: usize = 512;
/// Stanzas waiting for one peer before the sender is refused.
const QUEUE: usize = 65_536;
/// Waits between attempts to open the stream to a peer that is down.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

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

/// The queue of one peer and what was sent on the current stream but not
/// yet acknowledged. Shared by the request stream (polled by the HTTP/2
/// client, which sends what it yields) and the task reading the
/// acknowledgements.
struct Outgoing {
    rx: mpsc::Receiver<Forwarded>,
    unacked: VecDeque<Forwarded>,
    /// Set once the queue's senders are gone (the node shuts down).
    closed: bool,
    /// Counts the streams that ended. A stream's `Batches` made before the
    /// last end is stale: hyper may poll it once more before it sees the
    /// stream's reset, and what it took then would be counted against the
    /// next stream's acknowledgements.
    ended: u64,
}

/// The request side of one `ForwardStream`: yields a batch of whatever is
/// queued each time it is polled.
///
/// A stanza that finds the stream idle does not leave at once: the stream
/// lets the rest of the worker's ready tasks run first (a tokio yield,
/// which resumes after them and after the worker's next look at its
/// sockets), so that the stanzas the other sessions route in the same
/// turn leave with it, as one batch and one write. Without that, the
/// stream ran straight after each session that woke it, and batches held
/// one stanza each even at tens of thousands a second.
struct Batches {
    me: u64,
    out: Arc<Mutex<Outgoing>>,
    /// `Outgoing::ended` when this stream opened.
    stream: u64,
    /// The first stanza of the next batch, taken while waiting for the
    /// yield to end; already among the unacknowledged, so that it is given
    /// back if the stream breaks meanwhile.
    first: Option<Forwarded>,
    /// Set when the yield's deferred wake ran.
    gather: Option<Arc<Gathered>>,
}

/// The waker a batch's yield is deferred with: notes that the worker's
/// turn is over, then wakes the stream's task. (tokio's `yield_now`
/// itself is ready at its next poll, and the HTTP/2 client polls the
/// stream again right after each batch, which would end the wait early.)
#[derive(Default)]
struct Gathered {
    done: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Gathered {
    fn wake(self: Arc<Self>) {
        self.done.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Batches {
    fn new(me: u64, out: Arc<Mutex<Outgoing>>) -> Batches {
        let stream = out.lock().unwrap_or_else(|p| p.into_inner()).ended;
        Batches {
            me,
            out,
            stream,
            first: None,
            gather: None,
        }
    }
}

impl Stream for Batches {
    type Item = ForwardBatch;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ForwardBatch>> {
        let this = self.get_mut();
        if this.first.is_none() {
            let mut out = this.out.lock().unwrap_or_else(|p| p.into_inner());
            if out.ended != this.stream {
                return Poll::Ready(None);
            }
            match out.rx.poll_recv(cx) {
                Poll::Ready(Some(f)) => {
                    out.unacked.push_back(f.clone());
                    this.first = Some(f);
                }
                Poll::Ready(None) => {
                    out.closed = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
            let gathered = Arc::new(Gathered::default());
            gathered.task.register(cx.waker());
            let waker = Waker::from(gathered.clone());
            let mut turn = std::pin::pin!(tokio::task::yield_now());
            // Pending: tokio wakes `gathered` after the worker's other
            // ready tasks (outside a runtime it wakes it at once).
            let _ = turn.as_mut().poll(&mut Context::from_waker(&waker));
            this.gather = Some(gathered);
        }
        if let Some(gathered) = &this.gather {
            gathered.task.register(cx.waker());
            if !gathered.done.load(Ordering::Acquire) {
                return Poll::Pending;
            }
            this.gather = None;
        }
        let mut out = this.out.lock().unwrap_or_else(|p| p.into_inner());
        let out = &mut *out;
        if out.ended != this.stream {
            // The held stanza was given back with the stream's others.
            this.first = None;
            return Poll::Ready(None);
        }
        let mut stanzas = Vec::with_capacity(out.rx.len().min(BATCH - 1) + 1);
        stanzas.extend(this.first.take());
        while stanzas.len() < BATCH {
            match out.rx.try_recv() {
                Ok(f) => stanzas.push(f),
                Err(_) => break,
            }
        }
        // Kept until acknowledged (the first already is); `xml` is
        // shared, not copied.
        out.unacked.extend(stanzas.iter().skip(1).cloned());
        Poll::Ready(Some(ForwardBatch {
            from_node: this.me,
            stanzas,
        }))
    }
}

async fn run(
    me: u64,
    addr: String,
    channels: Arc<Channels>,
    rx: mpsc::Receiver<Forwarded>,
    returned: mpsc::UnboundedSender<Forwarded>,
) {
    let out = Arc::new(Mutex::new(Outgoing {
        rx,
        unacked: VecDeque::new(),
        closed: false,
        ended: 0,
    }));
    let give_back_unacked = |out: &Mutex<Outgoing>| {
        let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
        // This stream's `Batches` takes nothing more from now on.
        o.ended += 1;
        let n = o.unacked.len();
        for f in o.unacked.drain(..) {
            let _ = returned.send(f);
        }
        n
    };
    let mut backoff = BACKOFF_MIN;
    loop {
        let opened = match channels.get(&addr) {
            Ok(mut client) => client
                .forward_stream(Batches::new(me, out.clone()))
                .await
                .map(|r| r.into_inner()),
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
        let error = match opened {
            Ok(mut acks) => {
                backoff = BACKOFF_MIN;
                let mut acked = 0u64;
                loop {
                    match acks.message().await {
                        Ok(Some(ack)) => {
                            let n = ack.received.saturating_sub(acked);
                            acked = ack.received;
                            let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
                            let n = (n as usize).min(o.unacked.len());
                            o.unacked.drain(..n);
                        }
                        Ok(None) => break tonic::Status::unavailable("the peer ended the stream"),
                        Err(s) => break s,
                    }
                }
            }
            Err(s) => s,
        };
        let unacked = give_back_unacked(&out);
        {
            let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
            if o.closed {
                return;
            }
            // The peer is unreachable: what waits now goes to the local
            // rules rather than wait for it.
            let mut n = unacked;
            while let Ok(f) = o.rx.try_recv() {
                let _ = returned.send(f);
                n += 1;
            }
            if n > 0 {
                tracing::warn!(peer = %addr, error = %error, stanzas = n, "forwarding to a peer node failed; delivering those stanzas by the local rules");
            } else {
                tracing::debug!(peer = %addr, error = %error, "stream to a peer node ended");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt as _;

    fn stanza(i: u32) -> Forwarded {
        Forwarded {
            to: format!("u{i}@example.test/r"),
            xml: prost::bytes::Bytes::from(format!("<message id='{i}'/>")),
            ..Forwarded::default()
        }
    }

    fn batches() -> (mpsc::Sender<Forwarded>, Arc<Mutex<Outgoing>>, Batches) {
        let (tx, rx) = mpsc::channel(16);
        let out = Arc::new(Mutex::new(Outgoing {
            rx,
            unacked: VecDeque::new(),
            closed: false,
            ended: 0,
        }));
        let b = Batches::new(7, out.clone());
        (tx, out, b)
    }

    /// One poll of the stream, from inside a task (so that the yield it
    /// makes is tokio's).
    async fn poll_once(b: &mut Batches) -> Poll<Option<ForwardBatch>> {
        std::future::poll_fn(|cx| Poll::Ready(b.poll_next_unpin(cx))).await
    }

    fn unacked(out: &Mutex<Outgoing>) -> Vec<String> {
        let o = out.lock().unwrap_or_else(|p| p.into_inner());
        o.unacked.iter().map(|f| f.to.clone()).collect()
    }

    #[tokio::test]
    async fn what_the_same_turn_queues_leaves_as_one_batch_in_order() {
        let (tx, out, mut b) = batches();
        tx.try_send(stanza(1)).expect("room");
        // The first stanza waits for the rest of the turn...
        assert!(poll_once(&mut b).await.is_pending());
        tx.try_send(stanza(2)).expect("room");
        tx.try_send(stanza(3)).expect("room");
        // ...and takes what was queued meanwhile along.
        let batch = b.next().await.expect("a batch");
        assert_eq!(batch.from_node, 7);
        let to: Vec<_> = batch.stanzas.iter().map(|f| f.to.as_str()).collect();
        assert_eq!(
            to,
            [
                "u1@example.test/r",
                "u2@example.test/r",
                "u3@example.test/r"
            ]
        );
        assert_eq!(unacked(&out), to);
        // Nothing queued: the stream waits.
        assert!(poll_once(&mut b).await.is_pending());
        drop(tx);
        assert!(b.next().await.is_none());
        assert!(out.lock().unwrap_or_else(|p| p.into_inner()).closed);
    }

    #[tokio::test]
    async fn a_stanza_held_for_its_batch_is_given_back_if_the_stream_goes() {
        let (tx, out, mut b) = batches();
        tx.try_send(stanza(1)).expect("room");
        assert!(poll_once(&mut b).await.is_pending());
        // The HTTP/2 stream fails and drops the request stream now: the
        // held stanza is among those the sender gives back.
        drop(b);
        assert_eq!(unacked(&out), ["u1@example.test/r"]);
    }

    #[tokio::test]
    async fn a_stream_that_ended_takes_nothing_more_from_the_queue() {
        let (tx, out, mut b) = batches();
        tx.try_send(stanza(1)).expect("room");
        assert!(b.next().await.is_some());
        // The acknowledgements stopped: the sender gives back what is
        // unacknowledged and counts the stream as ended (`run`)...
        out.lock().unwrap_or_else(|p| p.into_inner()).ended += 1;
        tx.try_send(stanza(2)).expect("room");
        // ...and HTTP/2 polls the old request stream once more.
        assert!(b.next().await.is_none());
        let o = out.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(o.rx.len(), 1, "the queued stanza waits for the next stream");
        assert_eq!(o.unacked.len(), 1, "only the first stream's stanza");
    }

    #[tokio::test]
    async fn a_stanza_held_when_its_stream_ends_is_not_sent_on_it() {
        let (tx, out, mut b) = batches();
        tx.try_send(stanza(1)).expect("room");
        assert!(poll_once(&mut b).await.is_pending());
        out.lock().unwrap_or_else(|p| p.into_inner()).ended += 1;
        assert!(b.next().await.is_none());
        assert_eq!(unacked(&out), ["u1@example.test/r"]);
    }
}
