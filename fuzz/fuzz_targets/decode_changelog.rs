//! Fuzzes the change-log decoder: any bytes must decode to an error or to a valid log that
//! survives encode + decode unchanged. Never a panic, never an allocation beyond the limits.
//!
//! The first input byte picks the mode: bit 0 set frames the rest as a body (so the fuzzer
//! gets past the header and body check straight into the parser), bit 1 set decodes a single
//! transaction instead of a log.
#![no_main]
#![allow(dead_code, unused_imports)]

#[path = "../../src/changelog/mod.rs"]
mod changelog;

use changelog::encoding::{frame, CHANGELOG_MAGIC, TRANSACTION_MAGIC};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let single_transaction = mode & 2 != 0;
    let input = if mode & 1 == 0 {
        rest.to_vec()
    } else if single_transaction {
        frame(TRANSACTION_MAGIC, rest)
    } else {
        frame(CHANGELOG_MAGIC, rest)
    };
    if single_transaction {
        if let Ok(transaction) = changelog::decode_transaction(&input) {
            let again = changelog::decode_transaction(&changelog::encode_transaction(&transaction))
                .expect("a decoded transaction re-encodes to something that decodes");
            assert_eq!(again, transaction);
        }
    } else if let Ok(log) = changelog::decode_changelog(&input) {
        let again = changelog::decode_changelog(&changelog::encode_changelog(&log))
            .expect("a decoded log re-encodes to something that decodes");
        assert_eq!(again, log);
    }
});
