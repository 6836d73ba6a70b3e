//! Name adaptation: the change log keeps every name as its author wrote it; a watched folder
//! on a file system that cannot hold a name (vfat, exFAT) gets a local name that it can,
//! unique in its folder. Pure: the adapter records the mapping in the store.
//!
//! What always holds (checked by the property tests below):
//! - an adapted name is valid on vfat: no `:*?"<>|\`, no control character, no trailing dot
//!   or space, at most 255 UTF-16 units, not empty, not `.` or `..`;
//! - it is unique in its folder under the folder's comparison (case-insensitive on vfat);
//! - a name that is already valid and free is kept as it is.

use std::collections::HashSet;

/// What the watched folder's file system can hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NameRules {
    /// vfat/exFAT's character set: no `:*?"<>|\`, no control characters, no trailing dot or
    /// space, 255 UTF-16 units, valid UTF-8 only.
    pub restricted: bool,
    /// Names that differ only in case are the same name.
    pub fold_case: bool,
}

/// Longest vfat name, in UTF-16 code units.
const MAX_UTF16: usize = 255;
/// Longest name on Linux file systems, in bytes.
const MAX_BYTES: usize = 255;

fn forbidden(c: char) -> bool {
    matches!(c, ':' | '*' | '?' | '"' | '<' | '>' | '|' | '\\' | '/')
        || (c as u32) < 0x20
        || c == '\u{7f}'
}

/// Whether `name` can be held as it is under `rules`.
pub fn is_valid(name: &[u8], rules: NameRules) -> bool {
    if name.is_empty() || name == b"." || name == b".." || name.len() > MAX_BYTES {
        return false;
    }
    if name.contains(&b'/') || name.contains(&0) {
        return false;
    }
    if !rules.restricted {
        return true;
    }
    let Ok(s) = std::str::from_utf8(name) else {
        return false;
    };
    !s.chars().any(forbidden)
        && !s.ends_with('.')
        && !s.ends_with(' ')
        && s.encode_utf16().count() <= MAX_UTF16
}

/// The key a folder compares names by.
pub fn fold(name: &[u8], rules: NameRules) -> Vec<u8> {
    if rules.fold_case {
        String::from_utf8_lossy(name).to_lowercase().into_bytes()
    } else {
        name.to_vec()
    }
}

/// `name` made valid under `rules`, not yet made unique.
fn sanitize(name: &[u8], rules: NameRules) -> String {
    let s = String::from_utf8_lossy(name);
    let mut out: String = if rules.restricted {
        s.chars()
            .map(|c| if forbidden(c) { '_' } else { c })
            .collect()
    } else {
        s.replace('/', "_")
    };
    if rules.restricted && (out.ends_with('.') || out.ends_with(' ')) {
        out.pop();
        out.push('_');
    }
    if out.is_empty() || out == "." || out == ".." {
        out = "_".repeat(out.len().max(1));
    }
    out
}

/// Cuts `s` so that it fits (bytes and UTF-16 units), keeping `suffix` whole.
fn fit(stem: &str, suffix: &str, rules: NameRules) -> String {
    let fits = |t: &str| {
        t.len() <= MAX_BYTES && (!rules.restricted || t.encode_utf16().count() <= MAX_UTF16)
    };
    let mut stem: String = stem.to_string();
    while !stem.is_empty() && !fits(&format!("{stem}{suffix}")) {
        stem.pop();
    }
    let mut out = format!("{stem}{suffix}");
    if rules.restricted {
        // Cutting may leave a trailing dot or space before an empty suffix.
        while out.ends_with('.') || out.ends_with(' ') {
            out.pop();
            out.push('_');
        }
    }
    out
}

/// Splits `name` at its extension (the last dot that is not the first character).
/// A very long "extension" is not one: it is cut like the rest of the name.
fn split_ext(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(i) if i > 0 && i + 1 < name.len() && name.len() - i <= 16 => (&name[..i], &name[i..]),
        _ => (name, ""),
    }
}

/// The local name for `name` in a folder where `taken` (already folded with [`fold`]) says
/// which names are used: `name` itself when valid and free, else a valid variant, and
/// `NAME (2).EXT`, `NAME (3).EXT`, … until one is free.
pub fn adapt(name: &[u8], rules: NameRules, taken: &dyn Fn(&[u8]) -> bool) -> Vec<u8> {
    if is_valid(name, rules) && !taken(&fold(name, rules)) {
        return name.to_vec();
    }
    let base = sanitize(name, rules);
    let (stem, ext) = split_ext(&base);
    let first = fit(stem, ext, rules);
    if is_valid(first.as_bytes(), rules) && !taken(&fold(first.as_bytes(), rules)) {
        return first.into_bytes();
    }
    let mut n = 2u64;
    loop {
        let candidate = fit(stem, &format!(" ({n}){ext}"), rules);
        if is_valid(candidate.as_bytes(), rules) && !taken(&fold(candidate.as_bytes(), rules)) {
            return candidate.into_bytes();
        }
        n += 1;
    }
}

/// Adapts every name of one folder at once, in the given order (earlier names keep theirs
/// first); returns the local names in the same order.
pub fn adapt_all(names: &[Vec<u8>], rules: NameRules) -> Vec<Vec<u8>> {
    let mut used: HashSet<Vec<u8>> = HashSet::new();
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let local = adapt(n, rules, &|k| used.contains(k));
        used.insert(fold(&local, rules));
        out.push(local);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const VFAT: NameRules = NameRules {
        restricted: true,
        fold_case: true,
    };
    const EXT4: NameRules = NameRules {
        restricted: false,
        fold_case: false,
    };

    fn s(b: &[u8]) -> String {
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn valid_free_names_are_kept() {
        assert_eq!(s(&adapt(b"Readme.txt", VFAT, &|_| false)), "Readme.txt");
        assert_eq!(s(&adapt(b"a:b?.txt", EXT4, &|_| false)), "a:b?.txt");
    }

    #[test]
    fn forbidden_characters_and_trailing_dots_are_replaced() {
        assert_eq!(s(&adapt(b"a:b?.txt", VFAT, &|_| false)), "a_b_.txt");
        assert_eq!(s(&adapt(b"notes.", VFAT, &|_| false)), "notes_");
        assert_eq!(s(&adapt(b"x ", VFAT, &|_| false)), "x_");
        assert_eq!(s(&adapt(b"tab\there", VFAT, &|_| false)), "tab_here");
    }

    #[test]
    fn case_collisions_get_a_number() {
        let out = adapt_all(&[b"Notes.txt".to_vec(), b"notes.txt".to_vec()], VFAT);
        assert_eq!(s(&out[0]), "Notes.txt");
        assert_eq!(s(&out[1]), "notes (2).txt");
        let out = adapt_all(&[b"Notes.txt".to_vec(), b"notes.txt".to_vec()], EXT4);
        assert_eq!(s(&out[1]), "notes.txt");
    }

    #[test]
    fn long_names_are_cut_to_255_utf16_units_keeping_the_extension() {
        let long = format!("{}.txt", "é".repeat(200));
        let out = adapt(long.as_bytes(), VFAT, &|_| false);
        let out = s(&out);
        assert!(out.ends_with(".txt"));
        assert!(out.len() <= 255);
        assert!(is_valid(out.as_bytes(), VFAT));
    }

    fn any_name() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            "[a-zA-Z0-9 ._:*?\"<>|\\\\\\x01-\\x1f-]{1,40}".prop_map(|s| s.into_bytes()),
            "[aA][bB][cC]\\.?[tT]?".prop_map(|s| s.into_bytes()),
            proptest::collection::vec(1u8..=255, 1..300).prop_map(|v| v
                .into_iter()
                .map(|b| if b == b'/' { b'x' } else { b })
                .collect()),
            "[ñé中😀]{1,200}".prop_map(|s| s.into_bytes()),
        ]
        .prop_filter("a log name", |n| n.len() <= 255 && n != b"." && n != b"..")
    }

    proptest! {
        #[test]
        fn adapted_names_are_valid_unique_and_map_back(
            names in proptest::collection::hash_set(any_name(), 1..30)
        ) {
            let names: Vec<Vec<u8>> = names.into_iter().collect();
            for rules in [VFAT, EXT4] {
                let local = adapt_all(&names, rules);
                let mut seen = HashSet::new();
                for l in &local {
                    prop_assert!(is_valid(l, rules), "{:?} invalid", String::from_utf8_lossy(l));
                    prop_assert!(seen.insert(fold(l, rules)), "{:?} not unique", String::from_utf8_lossy(l));
                }
                // The recorded mapping is a bijection: every local name leads back to its
                // original, every original to its local name.
                let back: HashMap<&Vec<u8>, &Vec<u8>> = local.iter().zip(&names).collect();
                prop_assert_eq!(back.len(), names.len());
                for (o, l) in names.iter().zip(&local) {
                    prop_assert_eq!(back[l], o);
                }
                // Names that are valid and free are untouched (on ext4 every log name is).
                if !rules.restricted {
                    prop_assert_eq!(&local, &names);
                }
            }
        }
    }
}
