//! Which modules a config selects, with Hugging Face PEFT's matching rules.
//!
//! A module is named by its dotted path (`model.layers.0.self_attn.q_proj`). For a module key `k`
//! (PEFT 0.21 `check_target_module_exists`):
//!
//! 1. `exclude_modules` first: a string is a regex that must match the whole key; a list excludes
//!    `k` when `k` is in the list or ends with `"." + entry`.
//! 2. `target_modules` as a string is a regex that must match the **whole** key (`re.fullmatch`);
//!    the special value `"all-linear"` selects every linear layer except the output head `lm_head`.
//! 3. `target_modules` as a list selects `k` when `k` is in the list or ends with `"." + entry`.
//! 4. With a list and `layers_to_transform`, the layer index is the first numeric path component
//!    after a `layers_pattern` component (or after any component when no pattern is given:
//!    `^.*?\.[^.]*\.(\d+)\.`), and `k` is selected only when that index is listed.
//!
//! Unlike PEFT, which silently ignores a misspelled entry as long as something else matched, a
//! listed target (or listed layer index) that matches nothing is an error naming it:
//! [`Targets::check_all_matched`].
//!
//! ```
//! use tch_peft::target::{TargetModules, Targets};
//! let t = Targets::new(Some(&TargetModules::list(["q_proj", "v_proj"])), None, None, None)?;
//! assert!(t.matches("model.layers.0.self_attn.q_proj"));
//! assert!(!t.matches("model.layers.0.self_attn.k_proj"));
//! assert!(t.check_all_matched().is_err()); // `v_proj` matched nothing yet
//! assert!(t.matches("model.layers.0.self_attn.v_proj"));
//! t.check_all_matched()?;
//! # Ok::<(), tch_peft::Error>(())
//! ```

use std::sync::Mutex;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// `target_modules` / `exclude_modules` as PEFT serialises them: a list of names (exact or
/// `.suffix` match) or one regex string (full match).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Names matched exactly or as a dotted suffix.
    List(Vec<String>),
    /// A regex that must match the whole module name, or `"all-linear"`.
    Regex(String),
}

impl TargetModules {
    /// A list target from anything iterable of strings.
    pub fn list<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        TargetModules::List(names.into_iter().map(Into::into).collect())
    }

    /// A regex target (must match the whole module name).
    pub fn regex(pattern: impl Into<String>) -> Self {
        TargetModules::Regex(pattern.into())
    }

    /// PEFT's `"all-linear"`: every linear layer but the output head.
    pub fn all_linear() -> Self {
        TargetModules::Regex(ALL_LINEAR.to_string())
    }
}

/// PEFT's special `target_modules` value.
pub const ALL_LINEAR: &str = "all-linear";

/// `layers_to_transform`: one layer index or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerIndices {
    /// A single layer.
    One(i64),
    /// Several layers.
    Many(Vec<i64>),
}

impl LayerIndices {
    /// The indices as a list.
    pub fn to_vec(&self) -> Vec<i64> {
        match self {
            LayerIndices::One(i) => vec![*i],
            LayerIndices::Many(v) => v.clone(),
        }
    }
}

/// `layers_pattern`: the name(s) of the component that precedes the layer index (`"layers"`,
/// `"h"`, `"blocks"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersPattern {
    /// One pattern.
    One(String),
    /// Several patterns; the first that matches gives the index.
    Many(Vec<String>),
}

impl LayersPattern {
    /// The patterns as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            LayersPattern::One(s) => vec![s.clone()],
            LayersPattern::Many(v) => v.clone(),
        }
    }
}

/// The layer index of a module key, found as PEFT finds it for `layers_to_transform`.
///
/// ```
/// use tch_peft::target::layer_index;
/// assert_eq!(layer_index("model.layers.3.mlp.up_proj", &[]).unwrap(), Some(3));
/// assert_eq!(layer_index("transformer.h.11.attn.c_attn", &["h".into()]).unwrap(), Some(11));
/// assert_eq!(layer_index("lm_head", &[]).unwrap(), None);
/// # Ok::<(), tch_peft::Error>(())
/// ```
pub fn layer_index(key: &str, layers_pattern: &[String]) -> Result<Option<i64>> {
    let regexes = layer_regexes(layers_pattern)?;
    Ok(layer_index_with(key, &regexes))
}

fn layer_regexes(layers_pattern: &[String]) -> Result<Vec<Regex>> {
    if layers_pattern.is_empty() {
        return Ok(vec![Regex::new(r"^.*?\.[^.]*\.(\d+)\.").expect("static regex")]);
    }
    layers_pattern
        .iter()
        .map(|p| {
            Regex::new(&format!(r"^(?:.*?\.)?(?:{p})\.(\d+)\.")).map_err(|source| {
                Error::InvalidRegex { field: "layers_pattern".into(), pattern: p.clone(), source }
            })
        })
        .collect()
}

fn layer_index_with(key: &str, regexes: &[Regex]) -> Option<i64> {
    regexes.iter().find_map(|re| {
        re.captures(key).and_then(|c| c.get(1)).and_then(|m| m.as_str().parse().ok())
    })
}

fn full_regex(field: &str, pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|source| Error::InvalidRegex {
        field: field.into(),
        pattern: pattern.into(),
        source,
    })
}

#[derive(Debug)]
enum Matcher {
    List(Vec<String>),
    Regex(Regex, String),
    AllLinear,
}

impl Matcher {
    fn new(field: &str, t: &TargetModules) -> Result<Self> {
        Ok(match t {
            TargetModules::List(v) => Matcher::List(v.clone()),
            TargetModules::Regex(s) if s == ALL_LINEAR && field == "target_modules" => {
                Matcher::AllLinear
            }
            TargetModules::Regex(s) => Matcher::Regex(full_regex(field, s)?, s.clone()),
        })
    }

    /// Index of the first list entry that matches, `Some(0)` for a matching regex.
    fn find(&self, key: &str) -> Option<usize> {
        match self {
            Matcher::List(v) => v.iter().position(|t| key == t || suffix_match(key, t)),
            Matcher::Regex(re, _) => re.is_match(key).then_some(0),
            Matcher::AllLinear => (!(key == "lm_head" || key.ends_with(".lm_head"))).then_some(0),
        }
    }

    fn entries(&self) -> Vec<String> {
        match self {
            Matcher::List(v) => v.clone(),
            Matcher::Regex(_, s) => vec![s.clone()],
            Matcher::AllLinear => vec![ALL_LINEAR.into()],
        }
    }
}

fn suffix_match(key: &str, entry: &str) -> bool {
    key.len() > entry.len()
        && key.ends_with(entry)
        && key.as_bytes()[key.len() - entry.len() - 1] == b'.'
}

#[derive(Debug, Default)]
struct Hits {
    checked: usize,
    target: Vec<bool>,
    layers: Vec<bool>,
    selected: usize,
}

/// A compiled target selection that remembers what it matched, so that a target which matched
/// nothing can be reported. Thread-safe (`Sync`): a model may be built from several threads.
#[derive(Debug)]
pub struct Targets {
    target: Matcher,
    exclude: Option<Matcher>,
    layers: Option<Vec<i64>>,
    layer_regexes: Vec<Regex>,
    hits: Mutex<Hits>,
}

impl Targets {
    /// Compiles a selection from PEFT's four fields.
    ///
    /// Errors: an invalid regex; `layers_to_transform` with a regex `target_modules`;
    /// `layers_pattern` without `layers_to_transform` (both as PEFT refuses them).
    pub fn new(
        target_modules: Option<&TargetModules>,
        exclude_modules: Option<&TargetModules>,
        layers_to_transform: Option<&LayerIndices>,
        layers_pattern: Option<&LayersPattern>,
    ) -> Result<Self> {
        let target = match target_modules {
            Some(t) => Matcher::new("target_modules", t)?,
            None => {
                return Err(Error::config(
                    "target_modules",
                    "no target modules given: name the modules to adapt (a list or a regex)",
                ))
            }
        };
        if let Matcher::List(v) = &target {
            if v.is_empty() {
                return Err(Error::config("target_modules", "the list is empty"));
            }
        }
        let exclude = exclude_modules.map(|e| Matcher::new("exclude_modules", e)).transpose()?;
        let layers = layers_to_transform.map(LayerIndices::to_vec);
        if layers.is_some() && !matches!(target, Matcher::List(_)) {
            return Err(Error::config(
                "layers_to_transform",
                "cannot be used when `target_modules` is a regex string",
            ));
        }
        let patterns = layers_pattern.map(LayersPattern::to_vec).unwrap_or_default();
        if !patterns.is_empty() && layers.is_none() {
            return Err(Error::config(
                "layers_pattern",
                "only applies together with `layers_to_transform`",
            ));
        }
        let hits = Hits {
            target: vec![false; target.entries().len()],
            layers: vec![false; layers.as_ref().map_or(0, Vec::len)],
            ..Hits::default()
        };
        Ok(Targets {
            target,
            exclude,
            layers,
            layer_regexes: layer_regexes(&patterns)?,
            hits: Mutex::new(hits),
        })
    }

    /// Whether the module `key` is selected. Records the match for
    /// [`check_all_matched`](Self::check_all_matched).
    pub fn matches(&self, key: &str) -> bool {
        let mut hits = self.hits.lock().unwrap_or_else(|e| e.into_inner());
        hits.checked += 1;
        if let Some(ex) = &self.exclude {
            if ex.find(key).is_some() {
                return false;
            }
        }
        let Some(entry) = self.target.find(key) else { return false };
        hits.target[entry] = true;
        if let Some(layers) = &self.layers {
            let Some(idx) = layer_index_with(key, &self.layer_regexes) else { return false };
            let Some(pos) = layers.iter().position(|&l| l == idx) else { return false };
            hits.layers[pos] = true;
        }
        hits.selected += 1;
        true
    }

    /// Errors with the first listed target (or listed layer index) that has matched nothing so
    /// far; PEFT would silently ignore it.
    pub fn check_all_matched(&self) -> Result<()> {
        let hits = self.hits.lock().unwrap_or_else(|e| e.into_inner());
        for (entry, hit) in self.target.entries().into_iter().zip(&hits.target) {
            if !hit {
                return Err(Error::UnmatchedTarget {
                    field: "target_modules".into(),
                    target: entry,
                    checked: hits.checked,
                });
            }
        }
        if let Some(layers) = &self.layers {
            for (l, hit) in layers.iter().zip(&hits.layers) {
                if !hit {
                    return Err(Error::UnmatchedTarget {
                        field: "layers_to_transform".into(),
                        target: l.to_string(),
                        checked: hits.checked,
                    });
                }
            }
        }
        Ok(())
    }

    /// Number of modules selected so far.
    pub fn num_selected(&self) -> usize {
        self.hits.lock().unwrap_or_else(|e| e.into_inner()).selected
    }

    /// Selects among a complete list of module names, and errors when a listed target matched
    /// none of them.
    pub fn select<I, S>(&self, names: I) -> Result<Vec<String>>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let selected: Vec<String> = names
            .into_iter()
            .filter(|n| self.matches(n.as_ref()))
            .map(|n| n.as_ref().to_string())
            .collect();
        self.check_all_matched()?;
        Ok(selected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: [&str; 8] = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.1.mlp.up_proj",
        "lm_head",
    ];

    fn sel(t: &Targets) -> Vec<String> {
        t.select(LLAMA).unwrap()
    }

    #[test]
    fn list_matches_exact_name_or_dotted_suffix_only() {
        let t = Targets::new(Some(&TargetModules::list(["q_proj", "lm_head"])), None, None, None)
            .unwrap();
        assert_eq!(
            sel(&t),
            ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "lm_head"]
        );
        // `proj` is not a dotted suffix of `q_proj`
        let t = Targets::new(Some(&TargetModules::list(["proj"])), None, None, None).unwrap();
        assert!(matches!(t.select(LLAMA), Err(Error::UnmatchedTarget { .. })));
    }

    #[test]
    fn regex_must_match_the_whole_name() {
        let t =
            Targets::new(Some(&TargetModules::regex(r".*\.(q|v)_proj")), None, None, None).unwrap();
        assert_eq!(sel(&t).len(), 4);
        let t = Targets::new(Some(&TargetModules::regex("q_proj")), None, None, None).unwrap();
        let err = t.select(LLAMA).unwrap_err();
        assert!(err.to_string().contains("`q_proj`"), "{err}");
    }

    #[test]
    fn exclude_list_and_regex() {
        let t = Targets::new(
            Some(&TargetModules::regex(r".*_proj")),
            Some(&TargetModules::list(["mlp.up_proj", "model.layers.0.self_attn.k_proj"])),
            None,
            None,
        )
        .unwrap();
        assert_eq!(sel(&t).len(), 4);
        let t = Targets::new(
            Some(&TargetModules::all_linear()),
            Some(&TargetModules::regex(r"model\.layers\.1\..*")),
            None,
            None,
        )
        .unwrap();
        assert_eq!(sel(&t).len(), 4, "all-linear skips lm_head, exclude drops layer 1");
    }

    #[test]
    fn layers_to_transform_with_and_without_pattern() {
        let t = Targets::new(
            Some(&TargetModules::list(["q_proj", "v_proj"])),
            None,
            Some(&LayerIndices::One(1)),
            None,
        )
        .unwrap();
        assert_eq!(sel(&t), ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]);
        let t = Targets::new(
            Some(&TargetModules::list(["q_proj"])),
            None,
            Some(&LayerIndices::Many(vec![0, 7])),
            Some(&LayersPattern::One("layers".into())),
        )
        .unwrap();
        let err = t.select(LLAMA).unwrap_err();
        assert!(
            matches!(&err, Error::UnmatchedTarget { field, target, .. } if field == "layers_to_transform" && target == "7"),
            "{err}"
        );
    }

    #[test]
    fn layer_index_takes_the_first_numeric_component() {
        assert_eq!(layer_index("model.layers.1.experts.0.w1", &[]).unwrap(), Some(1));
        assert_eq!(layer_index("layers.0.q_proj", &[]).unwrap(), None, "PEFT needs a prefix");
        assert_eq!(layer_index("layers.2.q", &["layers".into()]).unwrap(), Some(2));
        assert_eq!(layer_index("encoder.layer.4.attention.self.query", &[]).unwrap(), Some(4));
    }

    #[test]
    fn invalid_combinations_are_refused() {
        let err = Targets::new(
            Some(&TargetModules::regex(".*")),
            None,
            Some(&LayerIndices::One(0)),
            None,
        )
        .unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig { ref field, .. } if field == "layers_to_transform")
        );
        let err = Targets::new(
            Some(&TargetModules::list(["q"])),
            None,
            None,
            Some(&LayersPattern::One("h".into())),
        )
        .unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { ref field, .. } if field == "layers_pattern"));
        let err = Targets::new(Some(&TargetModules::regex("(")), None, None, None).unwrap_err();
        assert!(matches!(err, Error::InvalidRegex { .. }));
        assert!(Targets::new(None, None, None, None).is_err());
    }

    #[test]
    fn serde_reads_list_and_string_forms() {
        let l: TargetModules = serde_json::from_str(r#"["q_proj","v_proj"]"#).unwrap();
        assert_eq!(l, TargetModules::list(["q_proj", "v_proj"]));
        let r: TargetModules = serde_json::from_str(r#"".*q_proj""#).unwrap();
        assert_eq!(r, TargetModules::regex(".*q_proj"));
        let i: LayerIndices = serde_json::from_str("3").unwrap();
        assert_eq!(i.to_vec(), vec![3]);
    }
}
