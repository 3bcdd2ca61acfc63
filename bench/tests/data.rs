//! Data loading: the three task formats on small self-written fixtures
//! (`scripts/make_data_fixtures.py`), seeded shuffling and balancing, and tokenised batches
//! (ids as Python `tokenizers`, longest-in-batch padding instead of the file's fixed 128).

use std::path::{Path, PathBuf};

use tch::{Device, Kind};
use tch_peft_bench::data::{
    balanced, email_text, kotzias, shuffle, spam, vader, Example, TextBatcher,
};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

#[test]
fn loaders_read_the_three_formats() {
    let k = kotzias(dir().join("kotzias"), "amazon").unwrap();
    assert_eq!(k.len(), 4, "the empty trailing record with a null class is dropped");
    assert_eq!((k[0].label, k[1].label, k[0].domain.as_str()), (1, 0, "amazon"));
    let v = vader(dir().join("vader"), "tweets").unwrap();
    assert_eq!(v.len(), 2, "|rating| < 0.5 dropped");
    assert_eq!((v[0].label, v[1].label), (1, 0));
    let s = spam(dir().join("spam"), "spam-1").unwrap();
    assert_eq!(s[0].label, 1);
    assert_eq!(s[0].text, "Great value now Buy two days only");
    let h = spam(dir().join("spam"), "easy-ham-1").unwrap();
    assert_eq!((h[0].label, h[0].text.as_str()), (0, "phone The phone is great."));
    assert_eq!(email_text("Subject: hi\n\n<p>a</p>\n\n  b"), "hi a b");
    assert!(kotzias(dir().join("kotzias"), "yelp").is_err());
    assert!(spam(dir().join("spam"), "nope").is_err());
}

#[test]
fn shuffling_and_balancing_are_seeded() {
    let ex: Vec<Example> = (0..20)
        .map(|i| Example { text: format!("s{i}"), label: (i % 4 == 0) as i64, domain: "d".into() })
        .collect();
    let (mut a, mut b) = (ex.clone(), ex.clone());
    shuffle(&mut a, 3);
    shuffle(&mut b, 3);
    assert_eq!(a, b);
    shuffle(&mut b, 4);
    assert_ne!(a, b);
    let bal = balanced(&ex, 5, 1);
    assert_eq!(bal.len(), 10);
    assert_eq!(bal.iter().filter(|e| e.label == 1).count(), 5);
    assert_eq!(bal, balanced(&ex, 5, 1));
}

#[test]
fn batches_pad_to_the_longest_row_with_pythons_ids() {
    let expected: Vec<Vec<i64>> =
        serde_json::from_str(&std::fs::read_to_string(dir().join("expected_ids.json")).unwrap())
            .unwrap();
    let batcher = TextBatcher::from_file(dir().join("tokenizer.json"), 64).unwrap();
    let ex = kotzias(dir().join("kotzias"), "amazon").unwrap();
    let b = batcher.batch(&ex, Device::Cpu).unwrap();
    assert_eq!(b.input_ids.size(), [4, 9], "longest row, not the file's fixed 128");
    assert_eq!(b.lengths, [7, 8, 9, 9]);
    for (row, exp) in expected.iter().enumerate() {
        let got: Vec<i64> =
            Vec::try_from(b.input_ids.get(row as i64).narrow(0, 0, exp.len() as i64)).unwrap();
        assert_eq!(&got, exp, "row {row}");
    }
    assert_eq!(b.attention_mask.sum(Kind::Int64).int64_value(&[]), 7 + 8 + 9 + 9);
    assert_eq!(Vec::<i64>::try_from(&b.labels).unwrap(), [1, 0, 1, 0]);
    // truncation
    let short = TextBatcher::from_file(dir().join("tokenizer.json"), 5).unwrap();
    assert_eq!(short.batch(&ex, Device::Cpu).unwrap().input_ids.size(), [4, 5]);
    assert!(TextBatcher::from_file(dir().join("nope.json"), 8).is_err());
}
