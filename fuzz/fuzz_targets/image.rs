//! libFuzzer target `image`: the body is asagi_gguf::fuzz (see its docs for the input format and the oracle).
#![no_main]

use std::sync::LazyLock;

use asagi_gguf::fuzz::Fuzzer;
use libfuzzer_sys::fuzz_target;

static FUZZER: LazyLock<Fuzzer> = LazyLock::new(|| Fuzzer::new().expect("a scratch folder"));

fuzz_target!(|data: &[u8]| {
    FUZZER.run("image", data);
});
