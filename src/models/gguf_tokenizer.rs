//! [`GgufTokenizer`]: the tokenizer a GGUF file describes, or a `tokenizer.json` beside it.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::quant::gguf::{GgufFile, GgufValue};
use crate::{Error, Result};

/// The most tokens (and merges) a file may list.
const MAX_TOKENS: usize = 1 << 22;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// transformers' split regex for a `tokenizer.ggml.pre` type (its `GGUF_PRE_TOKENIZER_SPLITS`).
fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// GPT-2's byte alphabet: the character each byte is spelled with in a byte-level vocabulary.
fn byte_alphabet() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        map[b as usize] = if printable {
            char::from(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("below the surrogates")
        };
    }
    map
}

fn bad(file: &GgufFile, key: &str, reason: impl Into<String>) -> Error {
    Error::InvalidConfig {
        field: format!("{key} (in {})", file.path().display()),
        reason: reason.into(),
    }
}

fn tk_error(what: &Path, e: tokenizers::Error) -> Error {
    Error::CorruptFile { file: what.to_path_buf(), reason: format!("tokenizer: {e}") }
}

/// A tokenizer with the special-token rules of its file: the tokenizer a GGUF file describes
/// (`tokenizer.ggml.*`), built as transformers builds it from the same file
/// (`AutoTokenizer.from_pretrained(dir, gguf_file=…)`), or a `tokenizer.json`.
///
/// llama.cpp writes a byte-level BPE vocabulary (`tokenizer.ggml.model` = `"gpt2"`: Llama 3,
/// SmolLM, Qwen 2, …) as its tokens (`tokenizer.ggml.tokens`), their types (3 = control, 4 =
/// user-defined), the merges and the special ids; `tokenizer.ggml.pre` names how text is split
/// before the merges. Built here: a BPE over those tokens (each spelled in GPT-2's byte
/// alphabet), split by transformers' regex for the `pre` types it knows (the Llama 3, Qwen 2,
/// GPT-4o and Tekken families) or by the byte-level default, control tokens added as special
/// tokens, user-defined ones as added tokens, the BOS (and EOS) token added where the file's
/// `add_bos_token` (`add_eos_token`) says so. Other tokenizer models (SentencePiece `"llama"`,
/// …) are a typed error: use the `tokenizer.json` of the original checkpoint
/// ([`GgufTokenizer::from_json`]).
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    tokenizer: Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

impl GgufTokenizer {
    /// The tokenizer in `file`'s metadata (see [`GgufTokenizer`]).
    ///
    /// ```no_run
    /// # fn main() -> tch_peft::Result<()> {
    /// use tch_peft::models::gguf::GgufTokenizer;
    /// use tch_peft::quant::gguf::GgufFile;
    /// let file = GgufFile::open("SmolLM2-135M-Instruct.Q4_1.gguf")?;
    /// let tok = GgufTokenizer::from_gguf(&file)?;
    /// let ids = tok.encode("Hello world")?;
    /// assert_eq!(tok.decode(&ids)?, "Hello world");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// `Unsupported` for a tokenizer model other than `"gpt2"` (byte-level BPE) or a file
    /// without merges; `InvalidConfig` naming the key for missing or malformed metadata (token
    /// types of another count, a merge that is not two tokens, special ids out of range).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let meta = file.metadata();
        let string = |key: &str| match meta.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| bad(file, key, "not a string")),
        };
        let strings = |key: &str| -> Result<Option<Vec<&str>>> {
            match meta.get(key) {
                None => Ok(None),
                Some(GgufValue::Array(a)) if a.len() <= MAX_TOKENS => a
                    .iter()
                    .map(|v| v.as_str().ok_or_else(|| bad(file, key, "holds a non-string")))
                    .collect::<Result<Vec<_>>>()
                    .map(Some),
                Some(_) => {
                    Err(bad(file, key, format!("not an array of at most {MAX_TOKENS} strings")))
                }
            }
        };
        let flag = |key: &str| match meta.get(key) {
            None => Ok(false),
            Some(GgufValue::Bool(b)) => Ok(*b),
            Some(v) => Err(bad(file, key, format!("{v:?} is not a bool"))),
        };
        let model = string("tokenizer.ggml.model")?;
        if model != Some("gpt2") {
            return Err(Error::Unsupported {
                field: "tokenizer.ggml.model".into(),
                reason: format!(
                    "{model:?} in {}: the byte-level BPE (\"gpt2\") is built from a GGUF file; \
                     for another, load the checkpoint's tokenizer.json (GgufTokenizer::from_json)",
                    file.path().display()
                ),
            });
        }
        let tokens = strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| bad(file, "tokenizer.ggml.tokens", "missing"))?;
        let merges = strings("tokenizer.ggml.merges")?.ok_or_else(|| Error::Unsupported {
            field: "tokenizer.ggml.merges".into(),
            reason: format!("{} lists no merges", file.path().display()),
        })?;
        let types: Vec<i64> = match meta.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(GgufValue::Array(a)) if a.len() == tokens.len() => a
                .iter()
                .map(|v| match v {
                    GgufValue::I32(t) => Ok(i64::from(*t)),
                    _ => Err(bad(file, "tokenizer.ggml.token_type", "holds a non-i32")),
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(bad(file, "tokenizer.ggml.token_type", "not one i32 per token")),
        };
        let alphabet = byte_alphabet();
        let spelled_set: std::collections::HashSet<char> = alphabet.iter().copied().collect();
        let in_alphabet = |t: &str| t.chars().all(|c| spelled_set.contains(&c));
        let spell = |t: &str| -> String {
            if in_alphabet(t) {
                t.to_string()
            } else {
                t.bytes().map(|b| alphabet[b as usize]).collect()
            }
        };
        let mut vocab = Vocab::default();
        for (i, t) in tokens.iter().enumerate() {
            // a later duplicate keeps the later id, as a Python dict built in order does
            vocab.insert(spell(t), i as u32);
        }
        let mut pairs = Vec::with_capacity(merges.len());
        for m in &merges {
            let mut parts = m.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                    pairs.push((a.to_string(), b.to_string()))
                }
                _ => {
                    return Err(bad(
                        file,
                        "tokenizer.ggml.merges",
                        format!("{m:?} is not two tokens separated by one space"),
                    ))
                }
            }
        }
        let path = file.path();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, pairs)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(String::new())
            .fuse_unk(false)
            .build()
            .map_err(|e| tk_error(path, e))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let pre = string("tokenizer.ggml.pre")?;
        let pre_tokenizer: PreTokenizerWrapper = match pre.and_then(split_regex) {
            Some(regex) => {
                let split = Split::new(
                    SplitPattern::Regex(regex.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| tk_error(path, e))?;
                Sequence::new(vec![
                    split.into(),
                    ByteLevel::default().add_prefix_space(false).use_regex(false).into(),
                ])
                .into()
            }
            None => ByteLevel::default().add_prefix_space(false).into(),
        };
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        // control tokens spelled in the byte alphabet as special tokens (others are llama.cpp
        // mislabels, skipped as transformers skips them), user-defined ones as added tokens
        let control: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(t, ty)| **ty == 3 && in_alphabet(t))
            .map(|(t, _)| AddedToken::from(t.to_string(), true).normalized(false))
            .collect();
        tokenizer.add_special_tokens(control).map_err(|e| tk_error(path, e))?;
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(t, ty)| **ty == 4 && tokenizer.token_to_id(t).is_some())
            .map(|(t, _)| AddedToken::from(t.to_string(), false).normalized(false))
            .collect();
        tokenizer.add_tokens(user).map_err(|e| tk_error(path, e))?;
        let id = |key: &str| -> Result<Option<u32>> {
            match meta.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .filter(|&i| (i as usize) < tokens.len())
                    .map(|i| Some(i as u32))
                    .ok_or_else(|| bad(file, key, format!("{v:?} is not a token id"))),
            }
        };
        Ok(GgufTokenizer {
            tokenizer,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token")?,
            add_eos: flag("tokenizer.ggml.add_eos_token")?,
        })
    }

    /// A `tokenizer.json` (transformers' fast-tokenizer file; its own post-processor adds the
    /// special tokens).
    ///
    /// # Errors
    /// `Io` for a missing file, `CorruptFile` for one the `tokenizers` crate cannot read.
    pub fn from_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = crate::io::read_capped(path, 1 << 30)?;
        let tokenizer = Tokenizer::from_bytes(&text).map_err(|e| tk_error(path, e))?;
        Ok(GgufTokenizer { tokenizer, bos: None, eos: None, add_bos: false, add_eos: false })
    }

    /// The `tokenizer.json` in the directory of `file`, if there is one; else the tokenizer in
    /// its metadata.
    pub fn beside_or_from_gguf(file: &GgufFile) -> Result<Self> {
        let beside = file.path().parent().map(|d| d.join("tokenizer.json"));
        match beside {
            Some(p) if p.is_file() => Self::from_json(p),
            _ => Self::from_gguf(file),
        }
    }

    /// The ids of `text`, with the BOS/EOS tokens the file asks for.
    ///
    /// # Errors
    /// `CorruptFile` naming the tokenizer where the `tokenizers` crate fails.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc =
            self.tokenizer.encode(text, true).map_err(|e| tk_error(Path::new("tokenizer"), e))?;
        let mut ids = Vec::with_capacity(enc.len() + 2);
        if let (true, Some(b)) = (self.add_bos, self.bos) {
            ids.push(b);
        }
        ids.extend_from_slice(enc.get_ids());
        if let (true, Some(e)) = (self.add_eos, self.eos) {
            ids.push(e);
        }
        Ok(ids)
    }

    /// The text of `ids` (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, false).map_err(|e| tk_error(Path::new("tokenizer"), e))
    }

    /// The `tokenizers` tokenizer (without the BOS/EOS rule of [`encode`](Self::encode)).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The BOS token id the file names.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    /// The EOS token id the file names.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos
    }
}
