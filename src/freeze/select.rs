//! [`Select`]: which variables of a store a freeze plan or schedule acts on (PEFT-style targets,
//! block indices, a predicate), and the block index of a variable name.

use std::ops::Range;

use crate::target::{TargetModules, Targets};
use crate::{Error, Result};

/// Which variables a plan acts on, by the module they belong to (a variable `a.b.weight` is in
/// module `a.b`).
pub enum Select {
    /// Every variable.
    All,
    /// PEFT's `target_modules` rules on the module names (exact or `.suffix` list, full-match
    /// regex); a listed name that matches nothing is an error.
    Targets(TargetModules),
    /// Modules whose block index (the first numeric path component, or the one
    /// after one of `layers_pattern`) is in the range.
    Layers {
        /// The indices.
        range: Range<i64>,
        /// The path component before the index (`"layers"`, `"h"`); empty for PEFT's default.
        layers_pattern: Vec<String>,
    },
    /// Variables whose full name satisfies the predicate.
    Predicate(Box<dyn Fn(&str) -> bool + Send + Sync>),
    /// Variables selected by the first and not by the second.
    Except(Box<Select>, Box<Select>),
    /// Variables selected by any.
    Any(Vec<Select>),
}

impl std::fmt::Debug for Select {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Select::All => write!(f, "All"),
            Select::Targets(t) => write!(f, "Targets({t:?})"),
            Select::Layers { range, layers_pattern } => {
                write!(f, "Layers({range:?}, {layers_pattern:?})")
            }
            Select::Predicate(_) => write!(f, "Predicate(..)"),
            Select::Except(a, b) => write!(f, "Except({a:?}, {b:?})"),
            Select::Any(v) => write!(f, "Any({v:?})"),
        }
    }
}

/// The module a variable belongs to: its name without the last component.
pub(super) fn module_of(var: &str) -> &str {
    var.rsplit_once('.').map_or("", |(m, _)| m)
}

impl Select {
    /// Modules listed by name (exact or `.suffix`, PEFT's list rules).
    pub fn modules<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Select::Targets(TargetModules::list(names))
    }

    /// Blocks with an index in `range` (PEFT's default index rule).
    pub fn layers(range: Range<i64>) -> Self {
        Select::Layers { range, layers_pattern: Vec::new() }
    }

    /// The first `n` blocks.
    pub fn first_layers(n: i64) -> Self {
        Select::layers(0..n)
    }

    /// Variables whose name satisfies `f`.
    pub fn predicate(f: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Select::Predicate(Box::new(f))
    }

    /// This selection without what `other` selects.
    pub fn except(self, other: Select) -> Self {
        Select::Except(Box::new(self), Box::new(other))
    }

    /// The names of `names` this selects, in order. Errors: an invalid regex or layer pattern;
    /// a listed target, or a layer range, that matches nothing.
    pub fn resolve(&self, names: &[String]) -> Result<Vec<String>> {
        let mask = self.mask(names)?;
        Ok(names.iter().zip(mask).filter(|(_, m)| *m).map(|(n, _)| n.clone()).collect())
    }

    fn mask(&self, names: &[String]) -> Result<Vec<bool>> {
        Ok(match self {
            Select::All => vec![true; names.len()],
            Select::Targets(t) => {
                if *t == TargetModules::all_linear() {
                    return Err(Error::Unsupported {
                        field: "target_modules".into(),
                        reason: "`all-linear` needs module types, which a VarStore does not \
                                 have; list the modules"
                            .into(),
                    });
                }
                let targets = Targets::new(Some(t), None, None, None)?;
                let mask: Vec<bool> = names.iter().map(|n| targets.matches(module_of(n))).collect();
                targets.check_all_matched()?;
                mask
            }
            Select::Layers { range, layers_pattern } => {
                let mut mask = Vec::with_capacity(names.len());
                for n in names {
                    let idx = block_index(n, layers_pattern);
                    mask.push(idx.is_some_and(|i| range.contains(&i)));
                }
                if !range.is_empty() && !mask.iter().any(|&m| m) {
                    return Err(Error::UnmatchedTarget {
                        field: "layers".into(),
                        target: format!("{range:?}"),
                        checked: names.len(),
                    });
                }
                mask
            }
            Select::Predicate(f) => names.iter().map(|n| f(n)).collect(),
            Select::Except(a, b) => {
                let (ma, mb) = (a.mask(names)?, b.mask(names)?);
                ma.into_iter().zip(mb).map(|(x, y)| x && !y).collect()
            }
            Select::Any(v) => {
                let mut out = vec![false; names.len()];
                for s in v {
                    for (o, m) in out.iter_mut().zip(s.mask(names)?) {
                        *o |= m;
                    }
                }
                out
            }
        })
    }
}

/// The block index of a variable: the first numeric component of its module path, or the
/// component after one of `layers_pattern` (`h` in `transformer.h.3.attn.weight`). Unlike
/// PEFT's module-key regex, a block index right at the start (`layers.0.fc.weight`, `0.conv`)
/// counts too, since VarStore names have no wrapper prefix.
pub(crate) fn block_index(var: &str, layers_pattern: &[String]) -> Option<i64> {
    let parts: Vec<&str> = module_of(var).split('.').collect();
    if layers_pattern.is_empty() {
        return parts.iter().find_map(|p| p.parse().ok());
    }
    parts
        .windows(2)
        .find(|w| layers_pattern.iter().any(|p| p == w[0]) && w[1].parse::<i64>().is_ok())
        .and_then(|w| w[1].parse().ok())
}

#[cfg(test)]
mod tests {
    use super::block_index;

    #[test]
    fn block_index_finds_the_first_numeric_component_or_the_pattern() {
        assert_eq!(block_index("layers.3.fc.weight", &[]), Some(3));
        assert_eq!(block_index("model.layers.11.mlp.up_proj.weight", &[]), Some(11));
        assert_eq!(block_index("transformer.h.2.attn.weight", &["h".into()]), Some(2));
        assert_eq!(block_index("transformer.wte.weight", &["h".into()]), None);
        assert_eq!(block_index("head.weight", &[]), None);
        assert_eq!(block_index("fc.7", &[]), None, "the parameter name is not a block");
    }
}
