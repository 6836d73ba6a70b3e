//! The matching itself, pure: rule files parsed with gitignore syntax, the built-in patterns,
//! and the scope of rules in force inside one folder.
//!
//! Precedence is git's: inside a folder, the rule files of that folder and of every folder
//! above it apply, each to paths relative to its own folder; the deepest file with a matching
//! pattern decides (within a file the last matching pattern wins, and `!pattern` re-includes);
//! the built-in patterns come last, like git's global excludes file, so a `.deltaignore` can
//! re-include one of them with `!`. Once a folder is ignored, everything below it is ignored,
//! whatever the rules below say (git cannot re-include a file inside an excluded folder
//! either). A file named `.deltaignore` is never ignored by a pattern, only by being inside
//! an ignored folder: every device must see the same rules.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use ignore::Match;

/// The name of a rule file.
pub const RULE_FILE: &[u8] = b".deltaignore";

/// Patterns that always stay on the device: temporary files of editors, desktops and
/// browsers. Each is in `docs/ignore.md` with the program that makes it.
pub const BUILTIN: &[&str] = &[
    // vim: swap files, the swap write test, the write test of a folder ("4913"), backups.
    "*.swp",
    "*.swo",
    "*.swx",
    "4913",
    "*~",
    // emacs: lock links and auto-save files.
    ".#*",
    "\\#*#",
    // kate swap files.
    "*.kate-swp",
    // GIO (gedit, GNOME apps) save through a temp file renamed over the original.
    ".goutputstream-*",
    // LibreOffice lock files.
    ".~lock.*#",
    // Desktop trash folders on this mount (files moved there leave the synced tree).
    ".Trash-*",
    // Partial downloads: Firefox and KDE (`.part`), Chromium (`.crdownload`). The finished
    // file is renamed to its real name and synced whole then.
    "*.part",
    "*.crdownload",
];

/// The patterns of one rule file (or of the built-in list).
#[derive(Debug)]
pub struct RuleFile {
    gi: Gitignore,
}

impl RuleFile {
    /// Parses a rule file's text. Returns the rules and one message per line that cannot be
    /// used (not UTF-8, or a broken glob); the other lines still apply.
    pub fn parse(text: &[u8]) -> (RuleFile, Vec<String>) {
        // Root "." tells the matcher not to strip anything: candidates are passed relative.
        let mut b = GitignoreBuilder::new(".");
        let mut problems = Vec::new();
        for (n, line) in text.split(|&c| c == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            match std::str::from_utf8(line) {
                Ok(l) => {
                    if let Err(e) = b.add_line(None, l) {
                        problems.push(format!("line {}: {e}", n + 1));
                    }
                }
                Err(_) => problems.push(format!("line {}: not UTF-8, skipped", n + 1)),
            }
        }
        let gi = b.build().unwrap_or_else(|e| {
            problems.push(format!("rules unusable: {e}"));
            Gitignore::empty()
        });
        (RuleFile { gi }, problems)
    }

    /// The built-in patterns.
    pub fn builtin() -> RuleFile {
        let (r, problems) = RuleFile::parse(BUILTIN.join("\n").as_bytes());
        debug_assert!(problems.is_empty(), "built-in patterns parse: {problems:?}");
        r
    }

    /// Some(true) when the last matching pattern ignores `rel`, Some(false) when it
    /// re-includes it, None when no pattern matches. `rel` is relative to the file's folder.
    fn decide(&self, rel: &[u8], is_dir: bool) -> Option<bool> {
        match self.gi.matched(Path::new(OsStr::from_bytes(rel)), is_dir) {
            Match::None => None,
            Match::Ignore(_) => Some(true),
            Match::Whitelist(_) => Some(false),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.gi.is_empty()
    }
}

/// The rules in force inside one folder: its path from the root of the synced tree, the rule
/// files of it and of the folders above it, and whether the folder itself is ignored.
#[derive(Clone, Debug)]
pub struct Scope {
    /// The folder's path relative to the root, without leading or trailing `/` ("" = root).
    path: Vec<u8>,
    /// Rule files from the root down: (length of the path of the folder holding it, rules).
    levels: Vec<(usize, Arc<RuleFile>)>,
    ignored: bool,
}

impl Scope {
    /// The root folder's scope, given its rule file.
    pub fn root(rules: Option<Arc<RuleFile>>) -> Scope {
        Scope {
            path: Vec::new(),
            levels: rules.map(|r| vec![(0, r)]).unwrap_or_default(),
            ignored: false,
        }
    }

    /// The folder's path relative to the root.
    pub fn path(&self) -> &[u8] {
        &self.path
    }

    /// Whether this folder, and so everything in it, is ignored.
    pub fn ignored(&self) -> bool {
        self.ignored
    }

    fn child_path(&self, name: &[u8]) -> Vec<u8> {
        let mut p = Vec::with_capacity(self.path.len() + 1 + name.len());
        if !self.path.is_empty() {
            p.extend_from_slice(&self.path);
            p.push(b'/');
        }
        p.extend_from_slice(name);
        p
    }

    /// Whether the entry `name` of this folder is ignored.
    pub fn is_ignored(&self, builtin: &RuleFile, name: &[u8], is_dir: bool) -> bool {
        if self.ignored {
            return true;
        }
        if !is_dir && name == RULE_FILE {
            return false;
        }
        let full = self.child_path(name);
        for (len, rules) in self.levels.iter().rev() {
            let rel = if *len == 0 {
                &full[..]
            } else {
                &full[len + 1..]
            };
            if let Some(d) = rules.decide(rel, is_dir) {
                return d;
            }
        }
        builtin.decide(&full, is_dir).unwrap_or(false)
    }

    /// The scope inside the child folder `name`, whose own rule file is `rules` (callers may
    /// pass None when this scope is ignored: nothing below can be re-included).
    pub fn enter(&self, builtin: &RuleFile, name: &[u8], rules: Option<Arc<RuleFile>>) -> Scope {
        let ignored = self.is_ignored(builtin, name, true);
        let path = self.child_path(name);
        let mut levels = self.levels.clone();
        if let Some(r) = rules.filter(|r| !r.is_empty() && !ignored) {
            levels.push((path.len(), r));
        }
        Scope {
            path,
            levels,
            ignored,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Rule files by folder path, matched the way the store-backed matcher does.
    struct Tree {
        builtin: RuleFile,
        files: HashMap<&'static str, Arc<RuleFile>>,
    }

    impl Tree {
        fn new(files: &[(&'static str, &str)]) -> Tree {
            Tree {
                builtin: RuleFile::builtin(),
                files: files
                    .iter()
                    .map(|(dir, text)| {
                        let (r, problems) = RuleFile::parse(text.as_bytes());
                        assert!(problems.is_empty(), "{problems:?}");
                        (*dir, Arc::new(r))
                    })
                    .collect(),
            }
        }

        /// Whether `path` (relative, `/`-separated; a trailing `/` marks a folder) is ignored.
        fn ignored(&self, path: &str) -> bool {
            let is_dir = path.ends_with('/');
            let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
            let mut scope = Scope::root(self.files.get("").cloned());
            let mut at = String::new();
            for dir in &parts[..parts.len() - 1] {
                at = if at.is_empty() {
                    dir.to_string()
                } else {
                    format!("{at}/{dir}")
                };
                scope = scope.enter(
                    &self.builtin,
                    dir.as_bytes(),
                    self.files.get(at.as_str()).cloned(),
                );
            }
            scope.is_ignored(&self.builtin, parts[parts.len() - 1].as_bytes(), is_dir)
        }
    }

    #[test]
    fn builtin_patterns_catch_temporary_files() {
        let t = Tree::new(&[]);
        for p in [
            ".notes.md.swp",
            "a/b/.x.swx",
            "notes.md~",
            "4913",
            "docs/4913",
            ".#notes.md",
            "#notes.md#",
            ".goutputstream-ABC123",
            "docs/.goutputstream-Q",
            ".~lock.budget.ods#",
            ".Trash-0/",
            ".Trash-1000/files/report.txt",
            ".Trash-0/info/report.txt.trashinfo",
            "video.mp4.part",
            "setup.exe.crdownload",
            "x.kate-swp",
        ] {
            assert!(t.ignored(p), "{p} is ignored");
        }
        for p in [
            "notes.md",
            "swp",
            "a.swp.txt",
            "49134",
            "lock.budget.ods",
            ".Trash/",
            "Trash-0/x",
            "archive.part1.rar",
            "build/",
            "x.log",
        ] {
            assert!(!t.ignored(p), "{p} is not ignored");
        }
    }

    #[test]
    fn rule_files_apply_below_their_folder() {
        let t = Tree::new(&[("", "*.log\nbuild/\n/top-only.txt\n"), ("src", "gen/\n*.o")]);
        assert!(t.ignored("x.log"));
        assert!(t.ignored("a/b/x.log"));
        assert!(t.ignored("build/"));
        assert!(t.ignored("build/out.bin"));
        assert!(t.ignored("a/build/deep/er/out.bin"));
        // `build/` names folders only.
        assert!(!t.ignored("a/build"));
        assert!(t.ignored("top-only.txt"));
        assert!(!t.ignored("a/top-only.txt"));
        assert!(t.ignored("src/gen/x.rs"));
        assert!(t.ignored("src/a/main.o"));
        assert!(!t.ignored("gen/x.rs"));
        assert!(!t.ignored("main.o"));
        assert!(!t.ignored("src/main.rs"));
    }

    #[test]
    fn anchored_patterns_are_relative_to_their_folder() {
        let t = Tree::new(&[("a/b", "/only-here\nsub/*.tmp\n")]);
        assert!(t.ignored("a/b/only-here"));
        assert!(!t.ignored("a/b/c/only-here"));
        assert!(!t.ignored("only-here"));
        assert!(t.ignored("a/b/sub/x.tmp"));
        assert!(!t.ignored("a/b/c/sub/x.tmp"));
    }

    #[test]
    fn deeper_files_override_and_negation_re_includes() {
        let t = Tree::new(&[
            ("", "*.log\n!important.log\n"),
            ("keep", "!*.log\n"),
            ("k2", "important.log\n"),
        ]);
        assert!(t.ignored("x.log"));
        assert!(!t.ignored("important.log"));
        assert!(!t.ignored("a/important.log"));
        assert!(!t.ignored("keep/x.log"));
        assert!(!t.ignored("keep/deep/x.log"));
        assert!(t.ignored("k2/important.log"));
    }

    #[test]
    fn builtins_can_be_re_included_but_not_inside_an_ignored_folder() {
        let t = Tree::new(&[("", "!*.part\n"), ("dl", "*.part\n")]);
        assert!(!t.ignored("movie.part"));
        assert!(t.ignored("dl/movie.part"));
        assert!(t.ignored("x.swp"));
        // An ignored folder's content cannot be re-included from inside it.
        let t = Tree::new(&[("", "build/\n"), ("build", "!*\n")]);
        assert!(t.ignored("build/keep.txt"));
        let t = Tree::new(&[("", "build/\n!build/keep.txt\n")]);
        assert!(t.ignored("build/keep.txt"));
    }

    #[test]
    fn rule_files_are_never_ignored_by_patterns() {
        let t = Tree::new(&[("", ".*\n")]);
        assert!(t.ignored(".hidden"));
        assert!(!t.ignored(".deltaignore"));
        assert!(!t.ignored("a/.deltaignore"));
        // A folder of that name is not a rule file.
        assert!(t.ignored(".deltaignore/"));
        // Inside an ignored folder it is ignored with the rest.
        assert!(t.ignored(".Trash-0/files/.deltaignore"));
    }

    #[test]
    fn broken_lines_are_reported_and_the_rest_applies() {
        let (r, problems) = RuleFile::parse(b"*.log\n[z-a\n\xff\xfe\r\n# comment\n\nbuild/\r\n");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("line 2"), "{problems:?}");
        assert!(problems[1].starts_with("line 3"), "{problems:?}");
        let b = RuleFile::builtin();
        let s = Scope::root(Some(Arc::new(r)));
        assert!(s.is_ignored(&b, b"x.log", false));
        assert!(s.is_ignored(&b, b"build", true));
        assert!(!s.is_ignored(&b, b"# comment", false));
    }

    #[test]
    fn non_utf8_names_match() {
        let t = RuleFile::builtin();
        let s = Scope::root(None);
        assert!(s.is_ignored(&t, b"caf\xe9.swp", false));
        assert!(!s.is_ignored(&t, b"caf\xe9.txt", false));
        let sub = s.enter(&t, b"d\xff", None);
        assert_eq!(sub.path(), b"d\xff");
        assert!(sub.is_ignored(&t, b"x~", false));
    }
}
