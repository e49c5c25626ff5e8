//! Fuzzes the `.cap` reader; the body lives in `cap_format::fuzzing::fuzz_one`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = cap_format::fuzzing::fuzz_one(data);
});
