//! Group commit at the command level: writes that arrive while the
//! previous entry is being committed travel together in the next one
//! (`Command::Many`), each with its own outcome. openraft appends and
//! flushes about one entry per client write, and a flush costs far more
//! than applying a command, so under load this is what keeps the cost of
//! a replicated write near the cost of applying it. An idle cluster sends
//! a lone write as it is, with no delay.

use openraft::error::{ClientWriteError, Fatal, RaftError};
use openraft::BasicNode;
use tokio::sync::{mpsc, oneshot};

use super::state_machine::{Command, Outcome, Response};
use super::Raft;

type NodeId = u64;

/// A committed write's log index and outcome, or openraft's refusal (not
/// the leader, no quorum, stopped).
pub type WriteResult =
    Result<(u64, Outcome), RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>;

/// Most commands in one entry.
const MAX_GROUP: usize = 512;

struct Job {
    cmd: Command,
    done: oneshot::Sender<WriteResult>,
}

#[derive(Clone)]
pub struct Combiner {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Combiner {
    /// Starts the combining task (inside a tokio runtime).
    pub fn new(raft: Raft) -> Combiner {
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, rx));
        Combiner { jobs }
    }

    /// `Raft::client_write`, grouped with whatever else is waiting.
    pub async fn client_write(&self, cmd: Command) -> WriteResult {
        let (done, wait) = oneshot::channel();
        if self.jobs.send(Job { cmd, done }).is_err() {
            return Err(RaftError::Fatal(Fatal::Stopped));
        }
        wait.await.unwrap_or(Err(RaftError::Fatal(Fatal::Stopped)))
    }
}

async fn run(raft: Raft, mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        if jobs.len() == 1 {
            let Job { cmd, done } = jobs.remove(0);
            let r = raft
                .client_write(cmd)
                .await
                .map(|r| (r.log_id.index, r.data));
            let _ = done.send(r);
            continue;
        }
        let (cmds, dones): (Vec<Command>, Vec<oneshot::Sender<WriteResult>>) =
            jobs.into_iter().map(|j| (j.cmd, j.done)).unzip();
        match raft.client_write(Command::Many(cmds)).await {
            Ok(r) => {
                let index = r.log_id.index;
                match r.data {
                    Ok(Response::Many(outcomes)) if outcomes.len() == dones.len() => {
                        for (done, o) in dones.into_iter().zip(outcomes) {
                            let _ = done.send(Ok((index, o)));
                        }
                    }
                    // The state machine always answers a group with one
                    // outcome per command; anything else reaches everyone.
                    other => {
                        for done in dones {
                            let _ = done.send(Ok((index, other.clone())));
                        }
                    }
                }
            }
            Err(e) => {
                for done in dones {
                    let _ = done.send(Err(e.clone()));
                }
            }
        }
    }
}
