#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tch_peft_fuzz::bnb_checkpoint(data));
