//! The presence subscription state machine of RFC 6121 §3 and Appendix A,
//! as pure functions: a roster item's state and a subscription stanza in,
//! the new state and what the server must do out.
//!
//! "Outbound" is a subscription stanza the user sends about a contact,
//! processed by the user's server; "inbound" is one the user receives from
//! a contact, processed by the user's (the recipient's) server.

use serde::{Deserialize, Serialize};

/// The `subscription` attribute of a roster item (RFC 6121 §2.1.2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Subscription {
    #[default]
    None,
    /// The user receives the contact's presence.
    To,
    /// The contact receives the user's presence.
    From,
    Both,
}

impl Subscription {
    pub fn as_str(self) -> &'static str {
        match self {
            Subscription::None => "none",
            Subscription::To => "to",
            Subscription::From => "from",
            Subscription::Both => "both",
        }
    }

    /// The user is subscribed to the contact's presence.
    pub fn has_to(self) -> bool {
        matches!(self, Subscription::To | Subscription::Both)
    }

    /// The contact is subscribed to the user's presence.
    pub fn has_from(self) -> bool {
        matches!(self, Subscription::From | Subscription::Both)
    }

    fn with_to(self, on: bool) -> Subscription {
        Subscription::of(on, self.has_from())
    }

    fn with_from(self, on: bool) -> Subscription {
        Subscription::of(self.has_to(), on)
    }

    fn of(to: bool, from: bool) -> Subscription {
        match (to, from) {
            (false, false) => Subscription::None,
            (true, false) => Subscription::To,
            (false, true) => Subscription::From,
            (true, true) => Subscription::Both,
        }
    }
}

/// The subscription part of a roster item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SubState {
    pub subscription: Subscription,
    /// The user asked to subscribe to the contact (`ask='subscribe'`).
    pub pending_out: bool,
    /// The contact asked to subscribe to the user; not answered yet.
    pub pending_in: bool,
    /// The user pre-approved the contact's future request (§3.4).
    pub approved: bool,
}

/// The four subscription presence types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubKind {
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
}

impl SubKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SubKind::Subscribe => "subscribe",
            SubKind::Subscribed => "subscribed",
            SubKind::Unsubscribe => "unsubscribe",
            SubKind::Unsubscribed => "unsubscribed",
        }
    }

    pub fn parse(s: &str) -> Option<SubKind> {
        Some(match s {
            "subscribe" => SubKind::Subscribe,
            "subscribed" => SubKind::Subscribed,
            "unsubscribe" => SubKind::Unsubscribe,
            "unsubscribed" => SubKind::Unsubscribed,
            _ => return None,
        })
    }
}

/// What the server does after a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub state: SubState,
    /// The roster item changed: store it and push it to the user.
    pub changed: bool,
    /// Outbound: route the stanza to the contact. Inbound: deliver it to the user.
    pub forward: bool,
    /// Inbound only: answer the sender on the user's behalf with this type
    /// (e.g. `subscribed` to a request that is already approved).
    pub auto_reply: Option<SubKind>,
}

fn t(old: SubState, state: SubState, forward: bool, auto_reply: Option<SubKind>) -> Transition {
    Transition {
        state,
        changed: state != old,
        forward,
        auto_reply,
    }
}

/// The user sends `kind` to the contact (RFC 6121 §3.1.2, §3.2.2, §3.3.2, §3.4).
pub fn outbound(old: SubState, kind: SubKind) -> Transition {
    let mut s = old;
    match kind {
        // §3.1.2: mark the request pending unless already subscribed; route
        // it either way (the contact's server answers a duplicate).
        SubKind::Subscribe => {
            if !s.subscription.has_to() {
                s.pending_out = true;
            }
            t(old, s, true, None)
        }
        // §3.1.5 approving a pending request; §3.4 pre-approval otherwise.
        SubKind::Subscribed => {
            if s.pending_in {
                s.pending_in = false;
                s.subscription = s.subscription.with_from(true);
                t(old, s, true, None)
            } else if !s.subscription.has_from() {
                s.approved = true;
                t(old, s, false, None)
            } else {
                t(old, s, false, None)
            }
        }
        // §3.3.2: cancel our subscription; always routed.
        SubKind::Unsubscribe => {
            s.pending_out = false;
            s.subscription = s.subscription.with_to(false);
            t(old, s, true, None)
        }
        // §3.2.2: cancel or deny the contact's subscription; routed only if
        // there was something to cancel.
        SubKind::Unsubscribed => {
            let had = s.subscription.has_from() || s.pending_in;
            s.pending_in = false;
            s.approved = false;
            s.subscription = s.subscription.with_from(false);
            t(old, s, had, None)
        }
    }
}

/// The user receives `kind` from the contact (RFC 6121 §3.1.3, §3.1.6,
/// §3.2.3, §3.3.3).
pub fn inbound(old: SubState, kind: SubKind) -> Transition {
    let mut s = old;
    match kind {
        SubKind::Subscribe => {
            if s.subscription.has_from() {
                // Already subscribed: answer for the user, don't bother them.
                t(old, s, false, Some(SubKind::Subscribed))
            } else if s.approved {
                // §3.4: pre-approved.
                s.approved = false;
                s.subscription = s.subscription.with_from(true);
                t(old, s, false, Some(SubKind::Subscribed))
            } else {
                // Deliver (again, for a duplicate: the user may have missed it).
                s.pending_in = true;
                t(old, s, true, None)
            }
        }
        // §3.1.6: only an answer to our own request counts.
        SubKind::Subscribed => {
            if s.pending_out && !s.subscription.has_to() {
                s.pending_out = false;
                s.subscription = s.subscription.with_to(true);
                t(old, s, true, None)
            } else {
                t(old, s, false, None)
            }
        }
        // §3.3.3: the contact no longer wants our presence.
        SubKind::Unsubscribe => {
            if s.subscription.has_from() || s.pending_in {
                s.pending_in = false;
                s.subscription = s.subscription.with_from(false);
                t(old, s, true, None)
            } else {
                t(old, s, false, None)
            }
        }
        // §3.2.3: our subscription is cancelled or our request denied.
        SubKind::Unsubscribed => {
            if s.subscription.has_to() || s.pending_out {
                s.pending_out = false;
                s.subscription = s.subscription.with_to(false);
                t(old, s, true, None)
            } else {
                t(old, s, false, None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SubKind::*;

    fn st(sub: Subscription, out: bool, inn: bool) -> SubState {
        SubState {
            subscription: sub,
            pending_out: out,
            pending_in: inn,
            approved: false,
        }
    }

    #[test]
    fn full_handshake_reaches_both_on_each_side() {
        // Alice subscribes to Bob; Bob approves and subscribes back; Alice approves.
        let mut alice = SubState::default();
        let mut bob = SubState::default();
        let a = outbound(alice, Subscribe);
        assert!(a.forward && a.changed);
        alice = a.state;
        let b = inbound(bob, Subscribe);
        assert!(b.forward);
        bob = b.state;
        assert_eq!(bob, st(Subscription::None, false, true));
        let b = outbound(bob, Subscribed);
        assert!(b.forward);
        bob = b.state;
        assert_eq!(bob.subscription, Subscription::From);
        let a = inbound(alice, Subscribed);
        alice = a.state;
        assert_eq!(alice, st(Subscription::To, false, false));
        bob = outbound(bob, Subscribe).state;
        alice = inbound(alice, Subscribe).state;
        alice = outbound(alice, Subscribed).state;
        bob = inbound(bob, Subscribed).state;
        assert_eq!(alice.subscription, Subscription::Both);
        assert_eq!(bob.subscription, Subscription::Both);
    }

    #[test]
    fn subscribe_from_an_existing_subscriber_is_auto_approved_not_delivered() {
        let r = inbound(st(Subscription::From, false, false), Subscribe);
        assert!(!r.forward && !r.changed);
        assert_eq!(r.auto_reply, Some(Subscribed));
    }

    #[test]
    fn pre_approval_answers_the_later_request() {
        let pre = outbound(SubState::default(), Subscribed);
        assert!(!pre.forward && pre.state.approved);
        let r = inbound(pre.state, Subscribe);
        assert_eq!(r.auto_reply, Some(Subscribed));
        assert_eq!(r.state.subscription, Subscription::From);
        assert!(!r.state.approved);
    }

    #[test]
    fn stray_subscribed_and_unsubscribe_are_ignored() {
        for kind in [Subscribed, Unsubscribe, Unsubscribed] {
            let r = inbound(SubState::default(), kind);
            assert!(
                !r.forward && !r.changed && r.auto_reply.is_none(),
                "{kind:?}"
            );
        }
        let r = outbound(SubState::default(), Unsubscribed);
        assert!(!r.forward);
    }

    #[test]
    fn cancellations_step_down_one_direction() {
        let both = st(Subscription::Both, false, false);
        assert_eq!(
            outbound(both, Unsubscribe).state.subscription,
            Subscription::From
        );
        assert_eq!(
            outbound(both, Unsubscribed).state.subscription,
            Subscription::To
        );
        assert_eq!(
            inbound(both, Unsubscribe).state.subscription,
            Subscription::To
        );
        assert_eq!(
            inbound(both, Unsubscribed).state.subscription,
            Subscription::From
        );
    }

    #[test]
    fn denial_clears_pending_states() {
        let r = outbound(st(Subscription::None, false, true), Unsubscribed);
        assert!(r.forward && !r.state.pending_in);
        let r = inbound(st(Subscription::None, true, false), Unsubscribed);
        assert!(r.forward && !r.state.pending_out);
    }

    #[test]
    fn duplicate_subscribe_to_a_subscribed_contact_keeps_state() {
        let r = outbound(st(Subscription::To, false, false), Subscribe);
        assert!(r.forward && !r.changed);
    }
}
