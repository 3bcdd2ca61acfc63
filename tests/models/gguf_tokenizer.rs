//! The tokenizer in a GGUF file against transformers' tokenizer from the same file
//! (tests/fixtures/gguf/tokenizer-*.gguf and tokenizer-expected.json, made by
//! `scripts/make_gguf_fixtures.py --tokenizer`): the same ids for every text (byte-level BPE,
//! transformers' split regex for `llama-bpe`, the byte-level default for `smollm`, control and
//! user-defined tokens kept whole, BOS where the file asks for it) and the same decoding.

use std::path::Path;

use tch_peft::models::gguf::GgufTokenizer;
use tch_peft::quant::gguf::GgufFile;
use tch_peft::Error;

fn dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf")
}

#[test]
fn gguf_tokenizers_give_transformers_ids_and_text() {
    let text = std::fs::read_to_string(dir().join("tokenizer-expected.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (key, case) in expected.as_object().unwrap() {
        let file = GgufFile::open(dir().join(format!("tokenizer-{key}.gguf"))).unwrap();
        let tok = GgufTokenizer::from_gguf(&file).unwrap();
        let texts = case["texts"].as_array().unwrap();
        for (i, t) in texts.iter().enumerate() {
            let t = t.as_str().unwrap();
            let want: Vec<u32> = case["ids"][i]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let got = tok.encode(t).unwrap();
            assert_eq!(got, want, "{key}: {t:?}");
            assert_eq!(tok.decode(&got).unwrap(), case["decoded"][i].as_str().unwrap(), "{key}");
        }
        assert_eq!((tok.bos_token_id(), tok.eos_token_id()), (Some(1), Some(2)));
    }
    // the two split rules differ on digit runs, so the test tells them apart
    assert_ne!(expected["llama-bpe"]["ids"][2], expected["smollm"]["ids"][2]);
}

#[test]
fn a_file_without_a_byte_level_tokenizer_is_refused_by_name() {
    // llama.gguf carries no tokenizer metadata
    let file = GgufFile::open(dir().join("llama.gguf")).unwrap();
    assert!(matches!(GgufTokenizer::from_gguf(&file), Err(Error::Unsupported { .. })));
    // beside_or_from_gguf falls back to the metadata without a tokenizer.json
    assert!(matches!(GgufTokenizer::beside_or_from_gguf(&file), Err(Error::Unsupported { .. })));
}
