//! Replays the fuzz targets' seeds and every input the fuzzers ever found a failure with
//! (`fuzz/seeds/<target>/`, `fuzz/regressions/<target>/`) through the same target bodies the
//! fuzzers run (`fuzz/src/targets.rs`), on the stable toolchain: each must return, whatever the
//! reader makes of it.

#[path = "../fuzz/src/targets.rs"]
#[allow(dead_code)]
mod targets;

use std::path::Path;

#[test]
fn seeds_and_regressions_replay_without_a_crash() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for target in targets::TARGETS {
        for kind in ["seeds", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(kind).join(target)) else { continue };
            let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            files.sort();
            for f in files {
                let data = std::fs::read(&f).unwrap();
                eprintln!("{target}: {}", f.display());
                targets::run(target, &data);
                replayed += 1;
            }
        }
    }
    assert!(replayed >= targets::TARGETS.len(), "only {replayed} inputs found");
}
