//! Which token positions are intervened on: pyreft's `f{p}+l{s}` spec and its truncation rules.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::{Error, Result};

/// The first `first` and last `last` prompt tokens (pyreft's `"f7+l7"`, `"f3"`, `"l1"`).
///
/// For a prompt of `n` tokens, pyreft intervenes on the first `min(p, n/2)` and the last
/// `min(s, n/2)` (integer halves, so the two never overlap) and pads the missing slots; here a
/// padded slot is `-1` and is not intervened on (pyreft points it at a pad token it prepends).
///
/// ```
/// use tch_peft::reft::Positions;
/// let p: Positions = "f7+l7".parse()?;
/// assert_eq!((p.first, p.last), (7, 7));
/// // a 5-token prompt: first 2 and last 2 (5/2 = 2), three pad slots each side
/// assert_eq!(p.locations(5, true), vec![vec![0, 1, 3, 4, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1]]);
/// # Ok::<(), tch_peft::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Positions {
    // both at most MAX_POSITIONS when parsed; `locations` clamps what is set by hand
    /// How many leading prompt tokens.
    pub first: i64,
    /// How many trailing prompt tokens.
    pub last: i64,
}

impl FromStr for Positions {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::config(
                "positions",
                format!("`{s}` is not of the form `f<p>+l<s>`, `f<p>` or `l<s>`"),
            )
        };
        let num = |t: &str, prefix: char| -> Result<i64> {
            let v = t.strip_prefix(prefix).ok_or_else(bad)?;
            let n: i64 = v.parse().map_err(|_| bad())?;
            if !(0..=MAX_POSITIONS).contains(&n) {
                return Err(Error::config(
                    "positions",
                    format!("`{s}`: {n} positions is outside 0..={MAX_POSITIONS}"),
                ));
            }
            Ok(n)
        };
        let (first, last) = match s.split_once('+') {
            Some((f, l)) => (num(f, 'f')?, num(l, 'l')?),
            None if s.starts_with('f') => (num(s, 'f')?, 0),
            None if s.starts_with('l') => (0, num(s, 'l')?),
            None => return Err(bad()),
        };
        if first + last == 0 {
            return Err(Error::config("positions", format!("`{s}` selects no position")));
        }
        Ok(Positions { first, last })
    }
}

/// The most leading or trailing positions a spec may name (pyreft uses a handful).
pub const MAX_POSITIONS: i64 = 1 << 16;

impl TryFrom<String> for Positions {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Positions> for String {
    fn from(p: Positions) -> String {
        p.to_string()
    }
}

impl fmt::Display for Positions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.first, self.last) {
            (p, 0) => write!(f, "f{p}"),
            (0, s) => write!(f, "l{s}"),
            (p, s) => write!(f, "f{p}+l{s}"),
        }
    }
}

impl Positions {
    /// Whether untied interventions split into a first and a last group: pyreft does so only
    /// when both sides are non-empty.
    pub fn splits(&self) -> bool {
        self.first > 0 && self.last > 0
    }

    /// pyreft's `get_intervention_locations` for one prompt of `n` tokens: with `tied` (shared
    /// weights) or one-sided specs a single list of `first + last` slots; untied two-sided specs
    /// give the first-positions list and the last-positions list, padded to equal length.
    /// `first` and `last` count at most [`MAX_POSITIONS`] each (more are dropped), a
    /// negative `n` as 0.
    pub fn locations(&self, n: i64, tied: bool) -> Vec<Vec<i64>> {
        let n = n.max(0);
        let (first, last) = (self.first.clamp(0, MAX_POSITIONS), self.last.clamp(0, MAX_POSITIONS));
        let first_n = first.min(n / 2);
        let last_n = last.min(n / 2);
        let head: Vec<i64> = (0..first_n).collect();
        let tail: Vec<i64> = (n - last_n..n).collect();
        if tied || !self.splits() {
            let mut v = head;
            v.extend(tail);
            v.resize((first + last) as usize, -1);
            vec![v]
        } else {
            let (mut l, mut r) = (head, tail);
            l.resize(first as usize, -1);
            r.resize(last as usize, -1);
            let len = l.len().max(r.len());
            l.resize(len, -1);
            r.resize(len, -1);
            vec![l, r]
        }
    }

    /// The locations of a batch, `[groups, batch, slots]` (int64 on `device`), from each
    /// example's prompt length and where its prompt starts in the padded sequence (`offset`:
    /// the amount of left padding, 0 for right padding). Padded slots are `-1`. A negative
    /// length or offset, or a position past `i64::MAX`, is an error.
    pub fn batch_locations(
        &self,
        prompt_lengths: &[i64],
        offsets: &[i64],
        tied: bool,
        device: Device,
    ) -> Result<Tensor> {
        if prompt_lengths.len() != offsets.len() {
            return Err(Error::ShapeMismatch {
                name: "offsets".into(),
                expected: vec![prompt_lengths.len() as i64],
                actual: vec![offsets.len() as i64],
            });
        }
        if let Some((i, (n, o))) =
            prompt_lengths.iter().zip(offsets).enumerate().find(|(_, (&n, &o))| n < 0 || o < 0)
        {
            return Err(Error::config(
                "prompt_lengths",
                format!(
                    "example {i} has prompt length {n} and offset {o}; neither may be negative"
                ),
            ));
        }
        let mut per: Vec<Vec<Vec<i64>>> = Vec::with_capacity(prompt_lengths.len());
        for (&n, &o) in prompt_lengths.iter().zip(offsets) {
            let mut groups = Vec::new();
            for g in self.locations(n, tied) {
                let shifted: Option<Vec<i64>> = g
                    .into_iter()
                    .map(|p| if p < 0 { Some(-1) } else { p.checked_add(o) })
                    .collect();
                groups.push(shifted.ok_or_else(|| {
                    Error::config("offsets", format!("offset {o} puts a position past i64::MAX"))
                })?);
            }
            per.push(groups);
        }
        let groups = per.first().map_or(1, Vec::len);
        let slots = per.first().and_then(|g| g.first()).map_or(0, Vec::len);
        let mut flat = Vec::with_capacity(groups * per.len() * slots);
        for g in 0..groups {
            for ex in &per {
                flat.extend_from_slice(&ex[g]);
            }
        }
        let shape = [groups as i64, per.len() as i64, slots as i64];
        Ok(Tensor::from_slice(&flat).f_view(shape)?.f_to_device(device)?)
    }
}
