//! Names the engine makes up: conflicted copies (`NAME (conflicted copy DEVICE YYYY-MM-DD
//! HHMMSS).EXT`), and the deterministic random source for ids and backoff jitter.
//!
//! What always holds: every name returned is a valid [`Name`] (1..=255 bytes, no `/`, no NUL,
//! not `.` or `..`), whatever the original name and device name are.

use crate::changelog::Name;

/// SplitMix64: a small deterministic generator, seeded by the caller (the engine has no
/// other source of randomness, so a simulation seed replays exactly).
#[derive(Clone, Debug)]
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> SeededRng {
        SeededRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// 16 random bytes (object and transaction ids).
    pub fn id_bytes(&mut self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        out[8..].copy_from_slice(&self.next_u64().to_le_bytes());
        out
    }

    /// A value in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// `YYYY-MM-DD HHMMSS` (UTC) of a time in milliseconds since the Unix epoch.
pub fn format_timestamp(time_ms: i64) -> String {
    let secs = time_ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}{:02}{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The name of a conflicted copy of `original` made by `device` at `time_ms`; `attempt` > 1
/// adds a counter so that several copies made in the same second get distinct names.
pub fn conflicted_copy_name(original: &Name, device: &str, time_ms: i64, attempt: u32) -> Name {
    let bytes = original.as_bytes();
    // The extension starts at the last dot that is not the first byte.
    let split = bytes
        .iter()
        .rposition(|b| *b == b'.')
        .filter(|i| *i > 0)
        .unwrap_or(bytes.len());
    let (stem, ext) = bytes.split_at(split);
    let device: String = device
        .chars()
        .filter(|c| *c != '/' && *c != '\0')
        .take(64)
        .collect();
    let mut tag = format!(" (conflicted copy {device} {}", format_timestamp(time_ms));
    if attempt > 1 {
        tag.push_str(&format!(" {attempt}"));
    }
    tag.push(')');
    let ext = if ext.len() > 64 { &ext[..0] } else { ext };
    let room = Name::MAX_LEN.saturating_sub(tag.len() + ext.len());
    let mut out = stem[..stem.len().min(room)].to_vec();
    out.extend_from_slice(tag.as_bytes());
    out.extend_from_slice(ext);
    Name(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_is_utc_civil_time() {
        assert_eq!(format_timestamp(0), "1970-01-01 000000");
        // 2024-02-29 13:45:07 UTC
        assert_eq!(format_timestamp(1_709_214_307_000), "2024-02-29 134507");
    }

    #[test]
    fn copy_name_keeps_the_extension() {
        let n = conflicted_copy_name(&Name(b"report.txt".to_vec()), "laptop", 0, 1);
        assert_eq!(
            n.as_bytes(),
            b"report (conflicted copy laptop 1970-01-01 000000).txt"
        );
        let n = conflicted_copy_name(&Name(b".bashrc".to_vec()), "pc", 0, 2);
        assert_eq!(
            n.as_bytes(),
            b".bashrc (conflicted copy pc 1970-01-01 000000 2)"
        );
    }

    #[test]
    fn copy_name_of_a_long_name_is_valid() {
        let long = Name(vec![b'a'; 255]);
        let n = conflicted_copy_name(&long, "d", 0, 1);
        assert!(Name::check(n.as_bytes()).is_ok());
    }
}
