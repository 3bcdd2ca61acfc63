//! The streamed merge against corrupt headers and careless configs: malformed offsets and
//! overflowing shapes, a config that understates the depth, non-finite or zero-sum weights, and
//! an output directory that is one of the inputs.

use std::path::{Path, PathBuf};

use crate::common::temp_dir;
use tch::{Device, Kind, Tensor};
use tch_peft::merge::{merge_directories, MergeConfig, ModelFiles};
use tch_peft::{io, Error};

/// A model directory: `model.layers.{0..layers}.w` and `embed.w`, all filled with `v`, plus a
/// `config.json` declaring `declared` layers.
fn model(root: &Path, name: &str, v: f64, layers: i64, declared: i64) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut ts: Vec<(String, Tensor)> = (0..layers)
        .map(|i| {
            (format!("model.layers.{i}.w"), Tensor::full([2, 2], v, (Kind::Float, Device::Cpu)))
        })
        .collect();
    ts.push(("embed.w".into(), Tensor::full([3], v, (Kind::Float, Device::Cpu))));
    io::write_safetensors(dir.join("model.safetensors"), &ts, None).unwrap();
    let config = serde_json::json!({"num_hidden_layers": declared, "model_type": "llama"});
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

/// A safetensors file with the raw `header` JSON and `data` bytes.
fn raw_file(dir: &Path, header: &str, data: usize) -> PathBuf {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data));
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    dir.to_path_buf()
}

#[test]
fn malformed_headers_are_errors_not_panics() {
    let root = temp_dir("hostile-merge-headers");
    let headers = [
        r#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": []}}"#,
        r#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}"#,
        r#"{"w": {"dtype": "F32", "shape": [4611686018427387904, 8], "data_offsets": [0, 8]}}"#,
        r#"{"w": {"dtype": "F32", "shape": [0, 18446744073709551615], "data_offsets": [0, 0]}}"#,
        r#"{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}"#,
        r#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}"#,
        r#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 18446744073709551615]}}"#,
        r#"{"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}"#,
        r#"{"w": 5}"#,
        r#"[1, 2]"#,
    ];
    for (i, h) in headers.iter().enumerate() {
        let dir = raw_file(&root.join(i.to_string()), h, 8);
        let e = ModelFiles::open(&dir).unwrap_err();
        assert!(matches!(e, Error::CorruptFile { .. }), "{h}: {e}");
    }
    // a header length past the file
    let dir = root.join("long");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), u64::MAX.to_le_bytes()).unwrap();
    assert!(matches!(ModelFiles::open(&dir).unwrap_err(), Error::CorruptFile { .. }));
}

#[test]
fn a_config_that_understates_the_depth_still_merges() {
    // four layers on disk, `num_hidden_layers: 2`: t = 3 / 1 used to index past the gradient
    let root = temp_dir("hostile-merge-depth");
    let (a, b) = (model(&root, "a", 1.0, 4, 2), model(&root, "b", 3.0, 4, 2));
    let yaml = format!(
        "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: [1.0, 0.0]}}\n  - model: {}\n    parameters: {{weight: [0.0, 1.0]}}\n",
        a.display(),
        b.display()
    );
    let out = root.join("out");
    merge_directories(&MergeConfig::from_yaml(&yaml).unwrap(), &out).unwrap();
    let got: std::collections::HashMap<String, Tensor> =
        io::read_safetensors(out.join("model.safetensors")).unwrap().tensors.into_iter().collect();
    // t = 0 at layer 0 (all a), t = 1 at layer 3 (all b): the depth is the files' 4 layers
    assert_eq!(got["model.layers.0.w"].double_value(&[0, 0]), 1.0);
    assert_eq!(got["model.layers.3.w"].double_value(&[0, 0]), 3.0);
}

#[test]
fn non_finite_and_zero_sum_weights_are_refused() {
    let root = temp_dir("hostile-merge-nan");
    let (a, b) = (model(&root, "a", 1.0, 2, 2), model(&root, "b", 3.0, 2, 2));
    let linear = |wa: &str, wb: &str| {
        format!(
            "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: {wa}}}\n  - model: {}\n    parameters: {{weight: {wb}}}\n",
            a.display(),
            b.display()
        )
    };
    for (wa, wb) in [(".nan", "1.0"), (".inf", "1.0"), ("[0.5, .nan]", "1.0")] {
        let e = MergeConfig::from_yaml(&linear(wa, wb)).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{wa}: {e}");
    }
    let out = root.join("out-zero");
    let e = merge_directories(&MergeConfig::from_yaml(&linear("1.0", "-1.0")).unwrap(), &out)
        .unwrap_err();
    assert!(matches!(&e, Error::InvalidConfig { field, .. } if field == "weight"), "{e}");
    assert!(!out.exists(), "nothing is written when the merge fails");
    let slerp = format!(
        "merge_method: slerp\nbase_model: {}\nmodels:\n  - model: {}\nparameters:\n  t: .nan\n",
        a.display(),
        b.display()
    );
    assert!(matches!(MergeConfig::from_yaml(&slerp).unwrap_err(), Error::InvalidConfig { .. }));
}

#[test]
fn the_output_may_not_be_an_input() {
    let root = temp_dir("hostile-merge-inplace");
    let (a, b) = (model(&root, "a", 1.0, 2, 2), model(&root, "b", 3.0, 2, 2));
    let yaml = format!(
        "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0}}\n",
        a.display(),
        b.display()
    );
    let before = std::fs::read(a.join("config.json")).unwrap();
    let e = merge_directories(&MergeConfig::from_yaml(&yaml).unwrap(), &a).unwrap_err();
    assert!(matches!(&e, Error::InvalidConfig { field, .. } if field == "out"), "{e}");
    assert_eq!(std::fs::read(a.join("config.json")).unwrap(), before);
    // also through a link to it
    let link = root.join("link");
    std::os::unix::fs::symlink(&b, &link).unwrap();
    assert!(merge_directories(&MergeConfig::from_yaml(&yaml).unwrap(), &link).is_err());
}

#[test]
fn a_merge_replaces_the_output_directory_whole() {
    let root = temp_dir("hostile-merge-replace");
    let (a, b) = (model(&root, "a", 1.0, 2, 2), model(&root, "b", 3.0, 2, 2));
    let yaml = format!(
        "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0}}\n  - model: {}\n    parameters: {{weight: 1.0}}\n",
        a.display(),
        b.display()
    );
    let out = root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("README.md"), "mine").unwrap();
    merge_directories(&MergeConfig::from_yaml(&yaml).unwrap(), &out).unwrap();
    assert_eq!(std::fs::read_to_string(out.join("README.md")).unwrap(), "mine");
    assert!(out.join("config.json").is_file());
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("tch-peft"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn extreme_block_indices_do_not_overflow() {
    let root = temp_dir("hostile-merge-blocks");
    let dir = root.join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let t = || Tensor::ones([2], (Kind::Float, Device::Cpu));
    let names = ["model.layers.9223372036854775807.w", "model.layers.-3.w", "model.layers.0.w"];
    let ts: Vec<(String, Tensor)> = names.iter().map(|n| (n.to_string(), t())).collect();
    io::write_safetensors(dir.join("model.safetensors"), &ts, None).unwrap();
    let other = root.join("n");
    std::fs::create_dir_all(&other).unwrap();
    io::write_safetensors(other.join("model.safetensors"), &ts, None).unwrap();
    let yaml = format!(
        "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: [1.0, 2.0]}}\n  - model: {}\n    parameters: {{weight: 1.0}}\n",
        dir.display(),
        other.display()
    );
    merge_directories(&MergeConfig::from_yaml(&yaml).unwrap(), root.join("out")).unwrap();
    // a slice up to the deepest layer iterates only while layers exist: a typed error, no hang
    let yaml = format!(
        "merge_method: passthrough\nslices:\n  - sources: [{{model: {}, layer_range: [0, 9223372036854775807]}}]\n",
        dir.display()
    );
    let e = merge_directories(&MergeConfig::from_yaml(&yaml).unwrap(), root.join("out2"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("has no tensors") || e.contains("more than"), "{e}");
}

#[test]
fn an_earlier_model_s_shards_do_not_survive_into_a_new_merge() {
    let root = temp_dir("hostile-merge-shards");
    let (a, b) = (model(&root, "a", 1.0, 2, 2), model(&root, "b", 3.0, 2, 2));
    let out = root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    for f in
        ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]
    {
        std::fs::write(out.join(f), "old").unwrap();
    }
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let yaml = format!(
        "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0}}\n  - model: {}\n    parameters: {{weight: 1.0}}\n",
        a.display(),
        b.display()
    );
    merge_directories(&MergeConfig::from_yaml(&yaml).unwrap(), &out).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors", "notes.txt"]);
    ModelFiles::open(&out).unwrap();
}
