//! The tools that read message files back: the [`reader`] of lines (damaged
//! ones reported and skipped), the [`filter`] of `--ident`, `--source`,
//! `--since` and `--until`, the traffic [`viewer`] and [`replay`].

pub mod filter;
pub(crate) mod reader;
pub mod replay;
pub mod viewer;
