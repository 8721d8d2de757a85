//! The store: how a message becomes a line in a rotated file.
//!
//! Workers build [`message`]s and batch their JSON lines in a [`journal`];
//! the batches go over one bounded channel to the [`writer`] thread, which
//! appends them to `messages.jsonl`, rotates and prunes files
//! ([`rotation`]), and hands each rotated file to the `syncer` thread to be
//! fsynced off the traffic path.

pub(crate) mod address;
pub mod journal;
pub mod message;
pub(crate) mod rotation;
pub(crate) mod syncer;
pub mod writer;
