//! Saves: adapter directories replaced as a whole (files the save does not own kept), saves of
//! one path from several threads, temporaries of a crashed process cleaned, the finite check.

use crate::common::temp_dir;
use tch::{nn, Device};
use tch_peft::lora::{LoraAdapter, LoraBuilder, LoraConfig, MaybeLoraLinear};
use tch_peft::{io, Error};

fn adapter(vs: &nn::VarStore, base: &nn::VarStore) -> (MaybeLoraLinear, LoraAdapter) {
    let cfg = LoraConfig { r: 2, lora_alpha: 4.0, ..LoraConfig::for_targets(["proj"]) };
    let b = LoraBuilder::new(&vs.root(), cfg).unwrap();
    let layer = b.linear(&(base.root() / "proj"), 6, 4, Default::default()).unwrap();
    (layer, b.finish().unwrap())
}

fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_save_keeps_files_it_does_not_own_and_leaves_no_temporaries() {
    let root = temp_dir("hostile-save-foreign");
    let dir = root.join("adapter");
    std::fs::create_dir_all(dir.join("notes")).unwrap();
    std::fs::write(dir.join("README.md"), "model card").unwrap();
    std::fs::write(dir.join("notes/a.txt"), "a").unwrap();
    let (vs, base) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let (_layer, a) = adapter(&vs, &base);
    a.save_pretrained(&dir).unwrap();
    a.save_pretrained(&dir).unwrap();
    assert_eq!(
        names_in(&dir),
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "notes"]
    );
    assert_eq!(std::fs::read_to_string(dir.join("notes/a.txt")).unwrap(), "a");
    assert_eq!(names_in(&root), ["adapter"]);
}

#[test]
fn several_threads_saving_one_path_do_not_collide() {
    let dir = temp_dir("hostile-save-threads").join("adapter");
    // each thread its own adapter (a `LoraAdapter` is `Send`, not `Sync`), one destination
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let (vs, base) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
                let (_layer, a) = adapter(&vs, &base);
                (0..5).try_for_each(|_| a.save_pretrained(&dir))
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    LoraConfig::from_pretrained(&dir).unwrap();
    io::read_safetensors(dir.join(io::PEFT_WEIGHTS_NAME)).unwrap();
    assert_eq!(names_in(dir.parent().unwrap()), ["adapter"]);
}

#[test]
fn temporaries_of_a_dead_process_are_cleaned() {
    let root = temp_dir("hostile-save-stale");
    // a pid that is surely gone: a child that has exited and been reaped
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale_dir = root.join(format!(".adapter.tch-peft-tmp.{dead}.1.0"));
    std::fs::create_dir_all(&stale_dir).unwrap();
    std::fs::write(stale_dir.join("adapter_model.safetensors"), vec![0u8; 1 << 16]).unwrap();
    let live = root.join(format!(".adapter.tch-peft-tmp.{}.1.0", std::process::id()));
    std::fs::create_dir_all(&live).unwrap();
    let (vs, base) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let (_layer, a) = adapter(&vs, &base);
    a.save_pretrained(root.join("adapter")).unwrap();
    assert!(!stale_dir.exists(), "a dead process's temporary is removed");
    assert!(live.exists(), "a live process's temporary is left alone");
}

#[test]
fn the_finite_check_on_load_is_opt_in() {
    let dir = temp_dir("hostile-finite");
    let (vs, base) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let (layer, a) = adapter(&vs, &base);
    let b = layer.as_lora().unwrap().lora_b().shallow_clone();
    let _ = tch::no_grad(|| b.shallow_clone().fill_(f64::NAN));
    a.save_pretrained(&dir).unwrap();
    a.load_pretrained(&dir).unwrap(); // as PEFT: loads
    io::set_require_finite(true);
    let e = a.load_pretrained(&dir).unwrap_err();
    io::set_require_finite(false);
    assert!(matches!(&e, Error::NonFinite { name, .. } if name.contains("lora_B")), "{e}");
}

#[test]
fn cleaning_spares_other_destinations_temporaries() {
    let root = temp_dir("hostile-save-sibling");
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    // the only copy of `adapter.v2` after a crash in the fallback's two renames
    let sibling = root.join(format!(".adapter.v2.tch-peft-old.{dead}.1.0"));
    std::fs::create_dir_all(&sibling).unwrap();
    let (vs, base) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let (_layer, a) = adapter(&vs, &base);
    a.save_pretrained(root.join("adapter")).unwrap();
    assert!(sibling.exists(), "another destination's aside copy was deleted");
}

#[test]
fn a_directory_named_by_dots_is_saved_into() {
    let root = temp_dir("hostile-save-dots");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    let (vs, base) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    let (_layer, a) = adapter(&vs, &base);
    a.save_pretrained(root.join("sub/..")).unwrap();
    LoraConfig::from_pretrained(&root).unwrap();
    assert!(root.join("sub").is_dir());
}
