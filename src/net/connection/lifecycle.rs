//! A connection's life as explicit states, and the one function that decides
//! from them what the connection does next ([`next_step`]), as nginx's
//! `ngx_stream_proxy_test_finalize` and sozu's `check_connections` do.
//!
//! The device side goes [`Phase::AwaitingHeader`] (only with
//! PROXY_ACCEPT_PROXY_PROTOCOL), [`Phase::Open`], [`Phase::ReadClosed`],
//! [`Phase::Ending`], [`Phase::Closed`], and may jump to `Ending` from any
//! phase before it. Each target link goes [`LinkState::Connecting`],
//! [`LinkState::Open`], [`LinkState::WriteClosed`], and may be dropped
//! (removed) from any of them. Invariants the decision keeps:
//! - nothing is read once the connection is ending: it is only finished,
//!   after the device was given the replies queued for it when it lingers;
//! - a target is sent the device's end of stream only once it is connected
//!   and has been given every byte the device sent;
//! - after the device's end of stream the connection ends, `closed by
//!   peer`, once no target is left.

use std::time::Instant;

use super::header::HeaderWait;
use crate::config::MAX_TARGETS;
use crate::net::reason::Reason;
use crate::net::side::TargetId;

/// Where the device side of a connection is in its life.
///
/// `repr(u8)`: a plain tag byte, so that the checks of every round are one
/// compare (measured: the niche-packed layout cost 60 instructions per
/// request/reply round trip, 3 %).
#[repr(u8)]
pub(super) enum Phase {
    /// Its PROXY protocol header is awaited: nothing is written yet and no
    /// target is connected.
    AwaitingHeader(HeaderWait),
    /// Bytes flow both ways.
    Open,
    /// The device ended its stream: what it sent goes on to the targets,
    /// then its end; their replies are still relayed.
    ReadClosed,
    /// It is decided that the connection ends: nothing more is read.
    Ending(Ending),
    /// Every socket is closed and every event 2 written.
    Closed,
}

impl Phase {
    /// Whether bytes are still relayed (reads and writes go on).
    pub(super) fn relays(&self) -> bool {
        matches!(self, Phase::Open | Phase::ReadClosed)
    }
}

/// Why and how a connection ends.
#[derive(Debug, PartialEq)]
pub(super) struct Ending {
    /// The device's reason.
    pub reason: Reason,
    /// The reason written for the targets still open.
    pub target_reason: Reason,
    /// Deliver what is queued for the device before closing it.
    pub linger: bool,
    /// It ended while its PROXY header was awaited: its event 1 is still
    /// to be written (with the socket's own peer) before its event 2.
    pub unannounced: bool,
}

/// Where one target link is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LinkState {
    /// Its connect has not finished; bytes for it wait in its queue.
    Connecting { since: Instant },
    /// Connected: it gets the device's bytes and its replies are read.
    Open,
    /// The device's end of stream was passed on (our FIN is sent); its
    /// replies are still read.
    WriteClosed,
}

/// What [`next_step`] needs to know of a target link.
pub(super) trait LinkStatus {
    fn state(&self) -> LinkState;
    /// Whether bytes wait in its queue.
    fn queued(&self) -> bool;
}

/// What a connection does next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Read the device's PROXY header, nothing else.
    ReadHeader,
    /// One round of relaying in both directions.
    Relay,
    /// This target has every byte the device sent: send it the device's
    /// end of stream.
    PassEof(TargetId),
    /// The device has ended and no target is left: the exchange is over
    /// (`closed by peer`, lingering for the replies still queued).
    EndExchange,
    /// Ending: deliver the replies queued for the device first.
    Linger,
    /// Close every socket now and write the events 2.
    Finish,
}

/// Decides what a connection in `phase`, with these target links (by
/// [`TargetId::index`]) and replies queued for the device or not, does
/// next. Called before every round: it looks at the links only once the
/// device has ended its stream.
pub(super) fn next_step<L: LinkStatus>(
    phase: &Phase,
    links: &[Option<L>; MAX_TARGETS],
    device_queued: bool,
) -> Next {
    match phase {
        Phase::AwaitingHeader(_) => Next::ReadHeader,
        Phase::Open => Next::Relay,
        Phase::ReadClosed => {
            let delivered = TargetId::all().find(|target| {
                links[target.index()]
                    .as_ref()
                    .is_some_and(|link| link.state() == LinkState::Open && !link.queued())
            });
            match delivered {
                Some(target) => Next::PassEof(target),
                None if links.iter().all(Option::is_none) => Next::EndExchange,
                None => Next::Relay,
            }
        }
        Phase::Ending(ending) if ending.linger && device_queued => Next::Linger,
        // Closed only finishes again, which does nothing.
        Phase::Ending(_) | Phase::Closed => Next::Finish,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link as [`next_step`] sees it, without a socket.
    #[derive(Debug, Clone, Copy)]
    struct LinkView {
        state: LinkState,
        queued: bool,
    }

    impl LinkStatus for LinkView {
        fn state(&self) -> LinkState {
            self.state
        }

        fn queued(&self) -> bool {
            self.queued
        }
    }

    type Links = [Option<LinkView>; MAX_TARGETS];

    fn ending(linger: bool) -> Phase {
        Phase::Ending(Ending {
            reason: Reason::ClosedByPeer,
            target_reason: Reason::ClosedByPeer,
            linger,
            unannounced: false,
        })
    }

    fn link(state: LinkState, queued: bool) -> Option<LinkView> {
        Some(LinkView { state, queued })
    }

    fn target(number: u8) -> TargetId {
        TargetId::from_number(number).unwrap()
    }

    /// Every phase, with the target links that matter to it.
    #[test]
    fn decision_table() {
        let now = Instant::now();
        let connecting = LinkState::Connecting { since: now };
        let (open, write_closed) = (LinkState::Open, LinkState::WriteClosed);
        let none = [None, None, None];
        let table: Vec<(&str, Phase, Links, bool, Next)> = vec![
            (
                "a header is awaited: only the header is read",
                Phase::AwaitingHeader(HeaderWait::new(now)),
                none,
                false,
                Next::ReadHeader,
            ),
            (
                "open: relay, whatever the targets",
                Phase::Open,
                [link(connecting, true), link(open, false), None],
                true,
                Next::Relay,
            ),
            (
                "open with no target left (all non-mandatory ones dropped): relay",
                Phase::Open,
                none,
                false,
                Next::Relay,
            ),
            (
                "device done, a target has all it sent: pass its end on",
                Phase::ReadClosed,
                [link(open, true), link(open, false), None],
                false,
                Next::PassEof(target(2)),
            ),
            (
                "device done, the first delivered target goes first",
                Phase::ReadClosed,
                [link(open, false), None, link(open, false)],
                false,
                Next::PassEof(target(1)),
            ),
            (
                "device done, a target still has bytes queued: relay on",
                Phase::ReadClosed,
                [link(open, true), None, None],
                false,
                Next::Relay,
            ),
            (
                "device done, a target still connecting: relay on",
                Phase::ReadClosed,
                [None, link(connecting, false), None],
                false,
                Next::Relay,
            ),
            (
                "device done, every end passed on: relay the replies",
                Phase::ReadClosed,
                [link(write_closed, false), link(write_closed, false), None],
                true,
                Next::Relay,
            ),
            (
                "device done and no target left: the exchange is over",
                Phase::ReadClosed,
                none,
                true,
                Next::EndExchange,
            ),
            (
                "ending, lingering, replies queued: deliver them",
                ending(true),
                [link(open, true), None, None],
                true,
                Next::Linger,
            ),
            (
                "ending, lingering, nothing queued for the device: finish",
                ending(true),
                [link(open, true), None, None],
                false,
                Next::Finish,
            ),
            (
                "ending without lingering: finish, replies or not",
                ending(false),
                none,
                true,
                Next::Finish,
            ),
            (
                "closed: finishing again does nothing",
                Phase::Closed,
                none,
                false,
                Next::Finish,
            ),
        ];
        for (case, phase, links, device_queued, expected) in table {
            assert_eq!(next_step(&phase, &links, device_queued), expected, "{case}");
        }
    }

    #[test]
    fn only_open_and_read_closed_relay() {
        let now = Instant::now();
        assert!(Phase::Open.relays());
        assert!(Phase::ReadClosed.relays());
        assert!(!Phase::AwaitingHeader(HeaderWait::new(now)).relays());
        assert!(!ending(true).relays());
        assert!(!Phase::Closed.relays());
    }
}
