//! Fuzzes delta application: any delta applies to any base with an error or a result within
//! the limit, never a panic; and a delta built by each strategy reproduces the new content.
//!
//! Input: two bytes of base length, one mode byte, then the payload.
#![no_main]
#![allow(dead_code, unused_imports)]

#[path = "../../src/changelog/mod.rs"]
mod changelog;
#[path = "../../src/delta/mod.rs"]
mod delta;

use changelog::model::Delta;
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let base_len = usize::from(u16::from_le_bytes([data[0], data[1]])) % (data.len() - 2);
    let mode = data[2];
    let (base, payload) = data[3..].split_at(base_len.min(data.len() - 3));
    match mode % 4 {
        0 => {
            if let Ok(out) = delta::apply(base, &Delta::Rsync(payload.to_vec()), LIMIT) {
                assert!(out.len() <= LIMIT);
            }
        }
        1 => {
            // Ranges: new size (u32 LE), then (offset u16 LE, len u8, bytes) entries.
            if payload.len() < 4 {
                return;
            }
            let new_size = u64::from(u32::from_le_bytes([
                payload[0], payload[1], payload[2], payload[3],
            ]));
            let mut rest = &payload[4..];
            let mut ranges = Vec::new();
            while rest.len() >= 3 {
                let offset = u64::from(u16::from_le_bytes([rest[0], rest[1]]));
                let len = usize::from(rest[2]).min(rest.len() - 3);
                ranges.push((offset, rest[3..3 + len].to_vec()));
                rest = &rest[3 + len..];
            }
            let delta = Delta::Ranges { new_size, ranges };
            if let Ok(out) = delta::apply(base, &delta, LIMIT) {
                assert_eq!(out.len() as u64, new_size);
                let Delta::Ranges { ranges, .. } = &delta else {
                    unreachable!()
                };
                // The last range written is in place.
                if let Some((offset, bytes)) = ranges.last() {
                    let at = *offset as usize;
                    assert_eq!(&out[at..at + bytes.len()], &bytes[..]);
                }
            }
        }
        2 => {
            let out = delta::apply(base, &Delta::Whole(payload.to_vec()), LIMIT);
            assert_eq!(out.expect("within the limit"), payload);
        }
        _ => {
            // Strategy round trip: rsync delta from base to payload, with a fuzzed block size.
            let block_size = u32::from(mode / 4).max(1);
            let signature = delta::BlockSignature::calculate_with_block_size(base, block_size);
            let rsync = delta::rsync_delta(&signature, payload).expect("diff");
            let out = delta::apply(base, &rsync, LIMIT).expect("own delta applies");
            assert_eq!(out, payload);
            let mut dirty = delta::DirtyRanges::new();
            dirty.insert(0, payload.len() as u64);
            let ranges = delta::ranges_delta(&dirty, payload.len() as u64, |offset, buffer| {
                let at = offset as usize;
                buffer.copy_from_slice(&payload[at..at + buffer.len()]);
                Ok(())
            })
            .expect("ranges");
            assert_eq!(
                delta::apply(base, &ranges, LIMIT).expect("ranges apply"),
                payload
            );
        }
    }
});
