//! Which socket of a connection something is about: the device, or one of
//! its targets.
//!
//! This is the one place where the numbers meet: a [`TargetId`] is target
//! 1, 2 or 3 of the configuration (its `proxy.source`), a [`Side`] is the
//! device (`proxy.source` 0) or a target. Arrays per target or per side are
//! indexed through [`TargetId::index`] and [`Side::index`], so no caller adds
//! or subtracts one.

use std::fmt;

use crate::config::MAX_TARGETS;

/// The device plus every target: the length of arrays kept per side.
pub const SIDES: usize = MAX_TARGETS + 1;

/// One of the configured targets (PROXY_TARGETn), by its number n.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetId(u8);

impl TargetId {
    /// Every target, in number order.
    pub fn all() -> impl Iterator<Item = TargetId> + Clone {
        (0..MAX_TARGETS as u8).map(TargetId)
    }

    /// Target `number` (1..=MAX_TARGETS), or None for any other number.
    pub fn from_number(number: u8) -> Option<TargetId> {
        let index = usize::from(number).checked_sub(1)?;
        (index < MAX_TARGETS).then(|| TargetId(number - 1))
    }

    /// Its number n, 1..=MAX_TARGETS: PROXY_TARGETn and its `proxy.source`.
    pub fn number(self) -> u8 {
        self.0 + 1
    }

    /// Its place in an array of MAX_TARGETS.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl fmt::Display for TargetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}

/// A side of a connection: the device or one of its targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Device,
    Target(TargetId),
}

impl Side {
    /// Its `proxy.source`: 0 for the device, n for target n.
    pub fn source(self) -> u8 {
        match self {
            Side::Device => 0,
            Side::Target(target) => target.number(),
        }
    }

    /// The side whose `proxy.source` is `source`.
    pub fn from_source(source: u8) -> Option<Side> {
        match source {
            0 => Some(Side::Device),
            n => TargetId::from_number(n).map(Side::Target),
        }
    }

    /// Its place in an array of [`SIDES`]: the device first, then the
    /// targets in number order (the same value as [`Side::source`]).
    pub fn index(self) -> usize {
        usize::from(self.source())
    }

    /// The side at `index` of an array of [`SIDES`].
    pub fn from_index(index: usize) -> Option<Side> {
        u8::try_from(index).ok().and_then(Side::from_source)
    }
}

impl TryFrom<u8> for Side {
    type Error = String;

    fn try_from(source: u8) -> Result<Side, String> {
        Side::from_source(source)
            .ok_or_else(|| format!("proxy.source {source} is not 0 to {MAX_TARGETS}"))
    }
}

impl<'de> serde::Deserialize<'de> for Side {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Side, D::Error> {
        let source = u8::deserialize(deserializer)?;
        Side::try_from(source).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_sources_and_indexes_agree() {
        assert_eq!(TargetId::all().count(), MAX_TARGETS);
        for (index, target) in TargetId::all().enumerate() {
            assert_eq!(target.index(), index);
            assert_eq!(usize::from(target.number()), index + 1);
            assert_eq!(TargetId::from_number(target.number()), Some(target));
            let side = Side::Target(target);
            assert_eq!(side.source(), target.number());
            assert_eq!(Side::from_index(side.index()), Some(side));
        }
        assert_eq!(Side::Device.source(), 0);
        assert_eq!(Side::from_source(0), Some(Side::Device));
        assert_eq!(TargetId::from_number(0), None);
        assert_eq!(TargetId::from_number(MAX_TARGETS as u8 + 1), None);
        assert_eq!(Side::from_index(SIDES), None);
    }

    #[test]
    fn a_source_out_of_range_says_so() {
        assert_eq!(
            Side::try_from(4).unwrap_err(),
            "proxy.source 4 is not 0 to 3"
        );
    }
}
