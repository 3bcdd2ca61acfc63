fn main() {
    // tch-peft exports the libtorch directory: an rpath, so the binary runs without LD_LIBRARY_PATH
    if let Ok(lib) = std::env::var("DEP_TCH_PEFT_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
