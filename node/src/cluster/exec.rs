//! The executor of the peer channels' HTTP/2 tasks (hyper's connection
//! task and one task per request body): it polls a task again at once
//! when the task woke itself during its own poll, rather than leave that
//! to tokio.
//!
//! Why: hyper's body pipe (`PipeToSendStream`) registers its waker with
//! h2 for a reset, then reserves send capacity for the chunk it just got,
//! and h2 grants it by waking that waker, inside the same poll. tokio
//! treats a task woken during its poll as a yield: it goes to the back of
//! the run queue and an idle worker thread is woken to share the work.
//! For the long-lived `ForwardStream` that is once per batch of stanzas,
//! so nearly once per stanza at moderate rates, and the futex calls and
//! context switches of that second worker were most of the scheduling
//! cost a hop between nodes adds (README "The cluster's cost").
//!
//! A task woken by itself is polled again here up to `REPOLLS` times; a
//! task that keeps waking itself is then handed back to tokio as a yield,
//! so it cannot starve the others. Wakes from elsewhere are unchanged.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Polls in a row of a task that keeps waking itself.
const REPOLLS: usize = 4;

const IDLE: u8 = 0;
const POLLING: u8 = 1;
const WOKEN: u8 = 2;

/// Spawns on the current tokio runtime, through [`Repoll`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Executor;

impl<F> hyper::rt::Executor<F> for Executor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Repoll::new(Box::pin(fut)));
    }
}

struct Shared {
    state: AtomicU8,
    /// The task's waker from its last poll.
    outer: AtomicWaker,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // During a poll, the poll loop sees it and polls again.
        match self
            .state
            .compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) | Err(WOKEN) => {}
            Err(_) => self.outer.wake(),
        }
    }
}

/// `fut`, polled again at once when it wakes itself while being polled.
pub struct Repoll<F> {
    fut: F,
    shared: Arc<Shared>,
    waker: Waker,
}

impl<F> Repoll<F> {
    pub fn new(fut: F) -> Repoll<F> {
        let shared = Arc::new(Shared {
            state: AtomicU8::new(IDLE),
            outer: AtomicWaker::new(),
        });
        let waker = Waker::from(shared.clone());
        Repoll { fut, shared, waker }
    }
}

impl<F: Future<Output = ()> + Unpin> Future for Repoll<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        this.shared.outer.register(cx.waker());
        let mut inner = Context::from_waker(&this.waker);
        for _ in 0..REPOLLS {
            this.shared.state.store(POLLING, Ordering::Release);
            let done = Pin::new(&mut this.fut).poll(&mut inner).is_ready();
            let state = this.shared.state.swap(IDLE, Ordering::AcqRel);
            if done {
                return Poll::Ready(());
            }
            if state != WOKEN {
                return Poll::Pending;
            }
        }
        // Woken during every one of those polls: a yield, through tokio.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the wakes of the outer task.
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Wakes itself during its first `n` polls, then is ready.
    struct SelfWaking {
        n: usize,
        polls: usize,
    }
    impl Future for SelfWaking {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls += 1;
            if self.polls > self.n {
                return Poll::Ready(());
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn outer() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        (count, waker)
    }

    #[test]
    fn a_task_that_wakes_itself_is_polled_again_without_the_scheduler() {
        let (count, waker) = outer();
        let mut cx = Context::from_waker(&waker);
        let mut f = Repoll::new(SelfWaking { n: 2, polls: 0 });
        assert!(Pin::new(&mut f).poll(&mut cx).is_ready());
        assert_eq!(f.fut.polls, 3);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_task_that_keeps_waking_itself_yields_to_the_scheduler() {
        let (count, waker) = outer();
        let mut cx = Context::from_waker(&waker);
        let mut f = Repoll::new(SelfWaking {
            n: usize::MAX,
            polls: 0,
        });
        assert!(Pin::new(&mut f).poll(&mut cx).is_pending());
        assert_eq!(f.fut.polls, REPOLLS);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_wake_from_elsewhere_reaches_the_scheduler() {
        let (count, waker) = outer();
        let mut cx = Context::from_waker(&waker);
        // Pending without waking itself.
        let mut f = Repoll::new(std::future::poll_fn(|_| Poll::<()>::Pending));
        assert!(Pin::new(&mut f).poll(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        let inner = f.waker.clone();
        std::thread::spawn(move || inner.wake())
            .join()
            .expect("waking thread");
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }
}
