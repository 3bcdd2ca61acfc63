//! Text data for the method comparison: the three real tasks of `docs/results.md` (files
//! fetched by `scripts/fetch-assets.sh`), seeded splits and shuffling, and batches tokenised
//! with the `tokenizers` crate with dynamic (longest-in-batch) padding.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{Device, Tensor};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::{config_error, Error, Result};

/// One labelled sentence and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The text.
    pub text: String,
    /// The class (0 or 1).
    pub label: i64,
    /// The source domain or group (`"amazon"`, `"tweets"`, `"spam-2"`, …).
    pub domain: String,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.into(), source: e })
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::CorruptFile { file: path.to_path_buf(), reason: reason.into() }
}

/// Kotzias et al. 2015 sentences of one domain (`amazon`, `imdb`, `yelp`): `dir/<domain>.json`,
/// `[{"text", "class"}]`; records with a null class are dropped.
pub fn kotzias(dir: impl AsRef<Path>, domain: &str) -> Result<Vec<Example>> {
    let path = dir.as_ref().join(format!("{domain}.json"));
    let v: serde_json::Value =
        serde_json::from_str(&read(&path)?).map_err(|e| corrupt(&path, e.to_string()))?;
    let rows = v.as_array().ok_or_else(|| corrupt(&path, "not a JSON array"))?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let text = r.get("text")?.as_str()?.trim();
            let label = r.get("class")?.as_i64()?;
            (!text.is_empty()).then(|| Example {
                text: text.to_string(),
                label,
                domain: domain.into(),
            })
        })
        .collect())
}

/// VADER's human-rated sentences of one domain (`movieReviewSnippets`, `tweets`,
/// `amazonReviewSnippets`, `nytEditorialSnippets`): `id \t mean rating \t text`; rows with
/// `|rating| < 0.5` are dropped, label = rating > 0 (REAL-DATA's rule).
pub fn vader(dir: impl AsRef<Path>, domain: &str) -> Result<Vec<Example>> {
    let path = dir.as_ref().join(format!("{domain}_GroundTruth.txt"));
    let text = read(&path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.splitn(3, '\t');
        let (_, rating, sentence) = (parts.next(), parts.next(), parts.next());
        let (Some(rating), Some(sentence)) = (rating, sentence) else {
            return Err(corrupt(&path, format!("line {} has no rating and text", i + 1)));
        };
        let r: f64 = rating
            .trim()
            .parse()
            .map_err(|_| corrupt(&path, format!("line {}: rating `{rating}`", i + 1)))?;
        if r.abs() >= 0.5 {
            out.push(Example {
                text: sentence.trim().to_string(),
                label: (r > 0.0) as i64,
                domain: domain.into(),
            });
        }
    }
    Ok(out)
}

/// The text of a raw RFC-822 message: its subject and the body after the headers, HTML tags
/// stripped and whitespace collapsed (enough for the first 64 tokens a classifier sees).
pub fn email_text(raw: &str) -> String {
    let (headers, body) = raw.split_once("\n\n").unwrap_or((raw, ""));
    let subject = headers
        .lines()
        .find_map(|l| l.strip_prefix("Subject:").or_else(|| l.strip_prefix("subject:")))
        .unwrap_or("")
        .trim();
    let mut text = String::with_capacity(body.len());
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                text.push(' ');
            }
            _ if !in_tag => text.push(c),
            _ => {}
        }
    }
    let body: Vec<&str> = text.split_whitespace().collect();
    format!("{subject} {}", body.join(" ")).trim().to_string()
}

/// SpamAssassin messages of one group (`easy-ham-1`, `easy-ham-2`, `hard-ham-1`, `spam-1`,
/// `spam-2`): `dir/<group>/*.json` with a raw `text`; label 1 for spam. Sorted by file name.
pub fn spam(dir: impl AsRef<Path>, group: &str) -> Result<Vec<Example>> {
    let d = dir.as_ref().join(group);
    let mut files: Vec<_> = std::fs::read_dir(&d)
        .map_err(|e| Error::Io { path: d.clone(), source: e })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let label = group.starts_with("spam") as i64;
    files
        .iter()
        .map(|p| {
            let v: serde_json::Value =
                serde_json::from_str(&read(p)?).map_err(|e| corrupt(p, e.to_string()))?;
            let raw =
                v.get("text").and_then(|t| t.as_str()).ok_or_else(|| corrupt(p, "no `text`"))?;
            Ok(Example { text: email_text(raw), label, domain: group.into() })
        })
        .collect()
}

/// Shuffles in place with a seeded generator (the same order for the same seed).
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    items.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
}

/// A seeded class-balanced sample of up to `per_class` examples of each label, shuffled.
pub fn balanced(examples: &[Example], per_class: usize, seed: u64) -> Vec<Example> {
    let mut out = Vec::new();
    for label in [0, 1] {
        let mut of: Vec<Example> = examples.iter().filter(|e| e.label == label).cloned().collect();
        shuffle(&mut of, seed ^ (label as u64 + 1));
        out.extend(of.into_iter().take(per_class));
    }
    shuffle(&mut out, seed);
    out
}

/// A tokenizer set up for batches: longest-in-batch padding (MiniLM's file hard-codes a fixed
/// 128) and truncation to `max_length`.
#[derive(Debug, Clone)]
pub struct TextBatcher {
    tokenizer: Tokenizer,
}

/// A tokenised batch on a device.
#[derive(Debug)]
pub struct Batch {
    /// Token ids `[batch, len]` (i64).
    pub input_ids: Tensor,
    /// 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// Non-padding tokens per row (including `[CLS]`/`[SEP]`).
    pub lengths: Vec<i64>,
    /// The labels `[batch]` (i64).
    pub labels: Tensor,
}

impl TextBatcher {
    /// Loads `tokenizer.json` and overrides its padding and truncation.
    pub fn from_file(path: impl AsRef<Path>, max_length: usize) -> Result<Self> {
        let path = path.as_ref();
        let tokenizer = Tokenizer::from_file(path).map_err(|e| corrupt(path, e.to_string()))?;
        Self::new(tokenizer, max_length)
    }

    /// Wraps a tokenizer, overriding its padding and truncation.
    pub fn new(mut tokenizer: Tokenizer, max_length: usize) -> Result<Self> {
        let pad = tokenizer.get_padding().cloned().unwrap_or_default();
        tokenizer
            .with_padding(Some(PaddingParams { strategy: PaddingStrategy::BatchLongest, ..pad }));
        tokenizer
            .with_truncation(Some(TruncationParams { max_length, ..Default::default() }))
            .map_err(|e| config_error("max_length", e.to_string()))?;
        Ok(TextBatcher { tokenizer })
    }

    /// Tokenises `examples` into one padded batch on `device`.
    pub fn batch(&self, examples: &[Example], device: Device) -> Result<Batch> {
        let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
        let enc = self
            .tokenizer
            .encode_batch(texts, true)
            .map_err(|e| config_error("text", e.to_string()))?;
        let len = enc.first().map_or(0, |e| e.get_ids().len());
        let mut ids = Vec::with_capacity(enc.len() * len);
        let mut mask = Vec::with_capacity(enc.len() * len);
        let mut lengths = Vec::with_capacity(enc.len());
        for e in &enc {
            ids.extend(e.get_ids().iter().map(|&i| i as i64));
            mask.extend(e.get_attention_mask().iter().map(|&m| m as i64));
            lengths.push(e.get_attention_mask().iter().filter(|&&m| m == 1).count() as i64);
        }
        let shape = [enc.len() as i64, len as i64];
        let labels: Vec<i64> = examples.iter().map(|e| e.label).collect();
        Ok(Batch {
            input_ids: Tensor::from_slice(&ids).view(shape).to_device(device),
            attention_mask: Tensor::from_slice(&mask).view(shape).to_device(device),
            lengths,
            labels: Tensor::from_slice(&labels).to_device(device),
        })
    }
}
