//! Packaging, checked with the real tools: the .deb built by `packaging/build-deb.sh` from
//! the binary under test (its file list, its metadata), its systemd units verified by
//! `systemd-analyze verify`, the mount(8) helper driven through `mount -t fuse.deltadrive`
//! (installed to /sbin, as the package does) and `umount`, the sd_notify protocol of
//! `deltadrive server` and `deltadrive mount --foreground`, and shellcheck on the scripts.
//!
//! Needs root and what `packaging/install-deps.sh` installs (systemd, dpkg-dev, cargo-deb,
//! shellcheck, fuse3, the `tests` user, /dev/fuse usable by users). A missing tool fails the
//! test with that hint; nothing is skipped.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const HELPER_DST: &str = "/sbin/mount.fuse.deltadrive";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_deltadrive")
}

/// Runs a command, failing the test with a hint if the tool is not installed.
fn run(cmd: &mut Command) -> Output {
    let name = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| {
        panic!("cannot run {name}: {e} (install it: bash packaging/install-deps.sh)")
    })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// A temp folder others may enter (the helper test runs the daemon as the `tests` user).
fn open_tempdir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// The packages `packaging/build-deb.sh` makes: the .deb and its -dbgsym .ddeb.
struct Debs {
    deb: PathBuf,
    dbgsym: PathBuf,
}

/// The packages of the binary under test, built once for all the tests of this file (into
/// cargo's temp folder for integration tests, emptied first).
fn debs() -> &'static Debs {
    static DEBS: std::sync::OnceLock<Debs> = std::sync::OnceLock::new();
    DEBS.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("packaging-debs");
        let _ = std::fs::remove_dir_all(&out);
        build_deb(&out)
    })
}

/// Builds the .deb (and the .ddeb) from the binary under test into `out`.
fn build_deb(out: &Path) -> Debs {
    let o = run(Command::new("bash")
        .arg(Path::new(REPO).join("packaging/build-deb.sh"))
        .arg("--bin")
        .arg(bin())
        .arg("-o")
        .arg(out));
    assert_ok("packaging/build-deb.sh", &o);
    let find = |ext: &str| {
        std::fs::read_dir(out)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == ext))
            .unwrap_or_else(|| panic!("no .{ext} in {}: {}", out.display(), text(&o.stdout)))
    };
    let debs = Debs {
        deb: find("deb"),
        dbgsym: find("ddeb"),
    };
    // The script's last line names the .deb (scripts and docs rely on it).
    assert_eq!(
        text(&o.stdout).lines().last().map(PathBuf::from),
        Some(debs.deb.clone()),
        "{}",
        text(&o.stdout)
    );
    debs
}

/// The names of the ELF sections of `file` (`readelf -S`).
fn elf_sections(file: &Path) -> Vec<String> {
    let o = run(Command::new("readelf").arg("-S").arg("-W").arg(file));
    assert_ok("readelf -S", &o);
    text(&o.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l.strip_prefix('[')?.split_once(']')?.1;
            rest.split_whitespace().next().map(str::to_string)
        })
        .collect()
}

/// The GNU build id of an ELF file, in hex (`readelf -n`).
fn build_id(file: &Path) -> String {
    let o = run(Command::new("readelf").arg("-n").arg(file));
    assert_ok("readelf -n", &o);
    text(&o.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: ").map(str::to_string))
        .unwrap_or_else(|| panic!("{} has no build id", file.display()))
}

/// `systemd-analyze [--user] verify UNIT` must exit 0 and say nothing: it exits 0 also when
/// it ignores a line it cannot parse, so silence is the real check.
fn verify_unit(unit: &Path, user: bool, manpath: &Path, scratch: &Path) -> Result<(), String> {
    let runtime = scratch.join("xdg-runtime");
    std::fs::create_dir_all(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut cmd = Command::new("systemd-analyze");
    if user {
        cmd.arg("--user");
    }
    cmd.arg("verify")
        .arg(unit)
        .current_dir(unit.parent().unwrap())
        // `Documentation=man:...` is checked with man(1): point it at the packaged pages.
        .env("MANPATH", manpath)
        .env("XDG_RUNTIME_DIR", &runtime)
        .env("SYSTEMD_LOG_COLOR", "0");
    let o = run(&mut cmd);
    if o.status.success() && o.stderr.is_empty() && o.stdout.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "systemd-analyze verify {} ({}):\n{}{}",
            unit.display(),
            o.status,
            text(&o.stdout),
            text(&o.stderr)
        ))
    }
}

/// Copies a unit from the extracted package with `/usr/bin/deltadrive` replaced by the
/// packaged binary's extracted path (verify checks that ExecStart's program exists, and
/// nothing is installed into /usr by the tests). Nothing else is changed.
fn unit_for_verify(src: &Path, root: &Path, dst_dir: &Path, name: &str) -> PathBuf {
    let unit = std::fs::read_to_string(src).unwrap();
    assert!(
        unit.contains("/usr/bin/deltadrive"),
        "{} does not run /usr/bin/deltadrive",
        src.display()
    );
    let packaged = root.join("usr/bin/deltadrive");
    let unit = unit.replace("/usr/bin/deltadrive", &packaged.display().to_string());
    let dst = dst_dir.join(name);
    std::fs::write(&dst, unit).unwrap();
    dst
}

#[test]
fn the_deb_holds_everything_and_its_units_verify_clean() {
    let dir = tempfile::tempdir().unwrap();
    let deb = &debs().deb;

    let list = run(Command::new("dpkg-deb").arg("-c").arg(deb));
    assert_ok("dpkg-deb -c", &list);
    let list = text(&list.stdout);
    let files: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    let expected = [
        "./usr/bin/deltadrive",
        "./sbin/mount.fuse.deltadrive",
        "./lib/systemd/system/deltadrive-server.service",
        "./usr/lib/systemd/user/deltadrive@.service",
        "./usr/share/man/man1/deltadrive.1.gz",
        "./usr/share/man/man1/deltadrive-mount.1.gz",
        "./usr/share/man/man1/deltadrive-server.1.gz",
        "./usr/share/man/man1/deltadrive-unmount.1.gz",
        "./usr/share/bash-completion/completions/deltadrive",
        "./usr/share/doc/deltadrive/README.md",
        "./usr/share/doc/deltadrive/install.md",
        "./usr/share/doc/deltadrive/img/file-manager.png",
        "./usr/share/doc/deltadrive/packaging.md",
        "./usr/share/doc/deltadrive/architecture.md",
        "./usr/share/doc/deltadrive/copyright",
        "./usr/share/nautilus-python/extensions/deltadrive-emblems.py",
        "./usr/share/nemo-python/extensions/deltadrive-emblems.py",
        "./usr/share/caja-python/extensions/deltadrive-emblems.py",
    ];
    for f in expected {
        assert!(files.contains(&f), "{f} is not in the package:\n{list}");
    }
    for l in list.lines() {
        let name = l.split_whitespace().nth(5).unwrap_or("");
        if name == "./usr/bin/deltadrive" || name == "./sbin/mount.fuse.deltadrive" {
            assert!(l.starts_with("-rwxr-xr-x 0/0"), "{name}: {l}");
        }
    }

    let depends = run(Command::new("dpkg-deb").arg("-f").arg(deb).arg("Depends"));
    assert_ok("dpkg-deb -f", &depends);
    let depends = text(&depends.stdout);
    // fuse3 to mount; ca-certificates because the client's HTTP stack refuses to start
    // without the system's CA certificates (found by test-clean-root.sh on a minimal Debian).
    for dep in ["fuse3", "ca-certificates"] {
        assert!(
            depends.split(',').any(|d| d.trim() == dep),
            "Depends lacks {dep}: {depends}"
        );
    }

    // What is in the package is what is in the repository, and the binary is the one tested.
    let root = dir.path().join("root");
    assert_ok(
        "dpkg-deb -x",
        &run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root)),
    );
    assert_eq!(
        std::fs::read(root.join("sbin/mount.fuse.deltadrive")).unwrap(),
        std::fs::read(Path::new(REPO).join("mount-helper/mount.fuse.deltadrive")).unwrap()
    );
    let v = run(Command::new(root.join("usr/bin/deltadrive")).arg("--version"));
    assert_ok("packaged deltadrive --version", &v);
    assert_eq!(
        text(&v.stdout).trim(),
        format!("deltadrive {}", env!("CARGO_PKG_VERSION"))
    );
    let page = run(Command::new("man")
        .arg("-l")
        .arg(root.join("usr/share/man/man1/deltadrive-mount.1.gz"))
        .env("MANWIDTH", "100"));
    assert_ok("man -l deltadrive-mount.1.gz", &page);
    // Without a terminal man may still overstrike for bold (`c\bc`): keep the last char.
    let mut plain = String::new();
    for c in text(&page.stdout).chars() {
        if c == '\u{8}' {
            plain.pop();
        } else {
            plain.push(c);
        }
    }
    let page = plain;
    assert!(
        page.contains("--foreground") && page.contains("--home"),
        "{page}"
    );

    // The packaged units, verified against the packaged binary and man pages.
    let units = dir.path().join("units");
    std::fs::create_dir_all(&units).unwrap();
    let manpath = root.join("usr/share/man");
    let server = unit_for_verify(
        &root.join("lib/systemd/system/deltadrive-server.service"),
        &root,
        &units,
        "deltadrive-server.service",
    );
    let user = unit_for_verify(
        &root.join("usr/lib/systemd/user/deltadrive@.service"),
        &root,
        &units,
        "deltadrive@.service",
    );
    let instance = units.join("deltadrive@Drive.service");
    std::fs::copy(&user, &instance).unwrap();
    let mut errors = Vec::new();
    errors.extend(verify_unit(&server, false, &manpath, dir.path()).err());
    errors.extend(verify_unit(&instance, true, &manpath, dir.path()).err());
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// The .deb ships a stripped binary, and its debug information goes to `deltadrive-dbgsym`,
/// in the file the binary's build id names, as Debian's dbgsym packages do.
#[test]
fn the_deb_ships_a_stripped_binary_and_its_debug_info_in_a_dbgsym_package() {
    let dir = tempfile::tempdir().unwrap();
    let Debs { deb, dbgsym } = debs();
    let root = dir.path().join("root");
    assert_ok(
        "dpkg-deb -x",
        &run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root)),
    );
    let packaged = root.join("usr/bin/deltadrive");
    let sections = elf_sections(&packaged);
    // `.debug_gdb_scripts` is no debug information: Rust's 34-byte pointer to gdb's pretty
    // printers, an allocated (loaded) section, which strip rightly keeps.
    let debug: Vec<&String> = sections
        .iter()
        .filter(|s| s.starts_with(".debug_") && *s != ".debug_gdb_scripts")
        .collect();
    assert!(
        debug.is_empty(),
        "the packaged binary keeps debug sections {debug:?}"
    );
    assert!(
        !sections.iter().any(|s| s == ".symtab"),
        "the packaged binary keeps its symbol table: {sections:?}"
    );
    assert!(
        sections.iter().any(|s| s == ".gnu_debuglink"),
        "the packaged binary does not point at its debug file: {sections:?}"
    );
    // What is tested is what was built: the same build, only stripped.
    let tested = Path::new(bin());
    assert_eq!(build_id(&packaged), build_id(tested));
    assert!(
        elf_sections(tested).iter().any(|s| s == ".debug_line"),
        "the binary under test has no line tables to move"
    );

    let field = |f: &str| {
        let o = run(Command::new("dpkg-deb").arg("-f").arg(dbgsym).arg(f));
        assert_ok("dpkg-deb -f", &o);
        text(&o.stdout).trim().to_string()
    };
    assert_eq!(field("Package"), "deltadrive-dbgsym");
    let version = run(Command::new("dpkg-deb").arg("-f").arg(deb).arg("Version"));
    let version = text(&version.stdout).trim().to_string();
    assert_eq!(field("Recommends"), format!("deltadrive (= {version})"));
    assert_eq!(field("Auto-Built-Package"), "debug-symbols");
    let dbg_root = dir.path().join("dbgsym");
    assert_ok(
        "dpkg-deb -x (dbgsym)",
        &run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(dbgsym)
            .arg(&dbg_root)),
    );
    let id = build_id(&packaged);
    let debug_file = dbg_root.join(format!(
        "usr/lib/debug/.build-id/{}/{}.debug",
        &id[..2],
        &id[2..]
    ));
    assert!(
        debug_file.is_file(),
        "no {} in deltadrive-dbgsym",
        debug_file.display()
    );
    let dbg_sections = elf_sections(&debug_file);
    for s in [".debug_line", ".symtab"] {
        assert!(
            dbg_sections.iter().any(|x| x == s),
            "the debug file lacks {s}: {dbg_sections:?}"
        );
    }
}

/// The check above is only as good as `systemd-analyze` is strict: a unit with a bad line
/// must not pass it.
#[test]
fn systemd_analyze_verify_rejects_a_broken_unit() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::copy(bin(), root.join("usr/bin/deltadrive")).unwrap();
    let src = Path::new(REPO).join("packaging/systemd/deltadrive-server.service");
    let unit = unit_for_verify(&src, &root, dir.path(), "deltadrive-server.service");
    let broken = std::fs::read_to_string(&unit)
        .unwrap()
        .replace("Type=notify", "Type=notfiy");
    std::fs::write(&unit, broken).unwrap();
    let man = dir.path().join("man");
    assert_ok(
        "deltadrive man",
        &run(Command::new(bin()).arg("man").arg(man.join("man1"))),
    );
    let err = verify_unit(&unit, false, &man, dir.path()).expect_err("a broken unit passed");
    assert!(err.contains("notfiy"), "{err}");
}

/// Tests that install the helper to /sbin or mount through it run one at a time.
fn helper_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let src = Path::new(REPO).join("mount-helper/mount.fuse.deltadrive");
    let tmp = format!("{HELPER_DST}.tmp{}", std::process::id());
    std::fs::copy(&src, &tmp).unwrap_or_else(|e| {
        panic!("cannot install the mount helper to {HELPER_DST}: {e} (the test needs root)")
    });
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, HELPER_DST).unwrap();
    guard
}

/// A mount through `mount -t fuse.deltadrive`, its home, and a world-readable copy of the
/// binary under test (the daemon may run as another user, who cannot enter a root-only
/// build folder). Cleans up on drop and prints the mount log if the test failed.
struct HelperMount {
    dir: tempfile::TempDir,
    bin: PathBuf,
    home: PathBuf,
    mp: PathBuf,
}

impl HelperMount {
    fn new(owner: Option<(u32, u32)>) -> HelperMount {
        let dir = open_tempdir("deltadrive-helper");
        let bin_dir = dir.path().join("bin");
        std::fs::create_dir_all(&bin_dir).unwrap();
        let copy = bin_dir.join("deltadrive");
        std::fs::copy(bin(), &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        let home = dir.path().join("home");
        let mp = dir.path().join("Drive");
        std::fs::create_dir_all(&mp).unwrap();
        if let Some((uid, gid)) = owner {
            std::fs::create_dir_all(&home).unwrap();
            for p in [&home, &mp] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
            }
        }
        HelperMount {
            dir,
            bin: copy,
            home,
            mp,
        }
    }

    /// `mount -v -t fuse.deltadrive deltadrive MP -o OPTIONS`; returns mount's stderr.
    fn mount(&self, options: &str) -> String {
        self.run_mount(
            Command::new("mount")
                .args(["-v", "-t", "fuse.deltadrive", "deltadrive"])
                .arg(&self.mp)
                .arg("-o")
                .arg(options),
        )
    }

    /// `mount -v MP` with this line in the fstab (`mount -T FILE`: /etc/fstab is left alone).
    fn mount_by_fstab(&self, options: &str) -> String {
        let fstab = self.dir.path().join("fstab");
        let line = format!(
            "# test fstab\ndeltadrive  {}  fuse.deltadrive  {options}  0  0\n",
            self.mp.display()
        );
        std::fs::write(&fstab, line).unwrap();
        self.run_mount(
            Command::new("mount")
                .arg("-v")
                .arg("-T")
                .arg(&fstab)
                .arg(&self.mp),
        )
    }

    fn run_mount(&self, cmd: &mut Command) -> String {
        let o = run(cmd.env("DELTADRIVE_BIN", &self.bin));
        if !o.status.success() {
            self.dump_log();
        }
        assert_ok("mount -t fuse.deltadrive", &o);
        assert!(common::is_mounted(&self.mp), "not mounted after mount(8)");
        text(&o.stderr)
    }

    fn daemon_pid(&self) -> Option<i32> {
        let t = std::fs::read_to_string(self.home.join("mount.pid")).ok()?;
        t.lines().next()?.trim().parse().ok()
    }

    /// `umount MP`, then waits for the daemon to let go of the home.
    fn umount(&self) {
        let pid = self.daemon_pid();
        let o = run(Command::new("umount").arg(&self.mp));
        if !o.status.success() {
            self.dump_log();
        }
        assert_ok("umount", &o);
        assert!(!common::is_mounted(&self.mp), "still mounted after umount");
        if let Some(pid) = pid {
            wait_exit(pid, Duration::from_secs(30));
        }
    }

    fn dump_log(&self) {
        let log = self.home.join("mount.log");
        eprintln!("===== mount log {} =====", log.display());
        eprintln!(
            "{}",
            std::fs::read_to_string(&log).unwrap_or_else(|e| format!("(unreadable: {e})"))
        );
        eprintln!("===== end of mount log =====");
    }
}

impl Drop for HelperMount {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_log();
        }
        if common::is_mounted(&self.mp) {
            let pid = self.daemon_pid();
            let _ = Command::new("umount").arg("-l").arg(&self.mp).status();
            if let Some(pid) = pid {
                if !gone_within(pid, Duration::from_secs(10)) {
                    // SAFETY: kill the daemon this test started that did not stop.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

/// Whether process `pid` ended (or is a zombie nobody reaped yet) within `limit`.
fn gone_within(pid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(") ").next().map(|r| r.chars().next()));
        if matches!(state, None | Some(Some('Z')) | Some(Some('X'))) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(pid: i32, limit: Duration) {
    assert!(
        gone_within(pid, limit),
        "mount daemon {pid} still running after {limit:?}"
    );
}

/// The mountinfo line of `mp`.
fn mountinfo_line(mp: &Path) -> String {
    let mp = mp.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(mp.as_str()))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn fstab_style_mount_through_the_helper_keeps_files_across_umount() {
    let _lock = helper_lock();
    let m = HelperMount::new(None);
    let opts = format!(
        "home={},_netdev,nofail,x-systemd.automount,noauto,rw",
        m.home.display()
    );
    let said = m.mount(&opts);
    // mount(8) really went through our helper (-v is passed on to it).
    assert!(
        said.contains("mount.fuse.deltadrive: running:"),
        "mount(8) did not run the helper: {said}"
    );
    let line = mountinfo_line(&m.mp);
    assert!(line.contains(" deltadrive "), "{line}");
    std::fs::write(m.mp.join("hello.txt"), b"through fstab\n").unwrap();
    m.umount();
    assert!(!m.mp.join("hello.txt").exists());

    // The line of docs/install.md, in an fstab.
    let said = m.mount_by_fstab(&format!(
        "_netdev,nofail,x-systemd.automount,home={}",
        m.home.display()
    ));
    assert!(said.contains("mount.fuse.deltadrive: running:"), "{said}");
    assert_eq!(
        std::fs::read(m.mp.join("hello.txt")).unwrap(),
        b"through fstab\n"
    );
    // fusermount3 -u unmounts it too.
    let pid = m.daemon_pid();
    assert_ok(
        "fusermount3 -u",
        &run(Command::new("fusermount3").arg("-u").arg(&m.mp)),
    );
    if let Some(pid) = pid {
        wait_exit(pid, Duration::from_secs(30));
    }
    assert!(!common::is_mounted(&m.mp));
}

#[test]
fn helper_run_as_root_mounts_as_the_owner_of_the_home() {
    let _lock = helper_lock();
    let pw = run(Command::new("getent").args(["passwd", "tests"]));
    assert_ok(
        "getent passwd tests (bash packaging/install-deps.sh creates the user)",
        &pw,
    );
    let pw = text(&pw.stdout);
    let f: Vec<&str> = pw.trim().split(':').collect();
    let (uid, gid): (u32, u32) = (f[2].parse().unwrap(), f[3].parse().unwrap());
    let fuse_mode = std::fs::metadata("/dev/fuse").unwrap().mode();
    assert!(
        fuse_mode & 0o006 == 0o006,
        "/dev/fuse is mode {:o}: users cannot mount (bash packaging/install-deps.sh opens it, as udev does on Debian)",
        fuse_mode & 0o777
    );

    let m = HelperMount::new(Some((uid, gid)));
    m.mount(&format!("home={},_netdev,nofail", m.home.display()));
    let pid = m.daemon_pid().expect("daemon pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let uids: Vec<u32> = uid_line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    assert!(
        uids.iter().all(|u| *u == uid),
        "daemon runs as {uid_line}, want {uid}"
    );
    assert!(
        mountinfo_line(&m.mp).contains(&format!("user_id={uid}")),
        "{}",
        mountinfo_line(&m.mp)
    );
    assert_eq!(
        std::fs::metadata(m.home.join("mount.log")).unwrap().uid(),
        uid
    );

    // Without allow_other the folder is the user's alone: not even root gets in.
    assert!(
        !mountinfo_line(&m.mp).contains("allow_other"),
        "{}",
        mountinfo_line(&m.mp)
    );
    let e = std::fs::write(m.mp.join("mine.txt"), b"x").expect_err("root is kept out");
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    m.umount();
    m.mount(&format!("home={},allow_other", m.home.display()));
    assert!(
        mountinfo_line(&m.mp).contains("allow_other"),
        "{}",
        mountinfo_line(&m.mp)
    );
    std::fs::write(m.mp.join("mine.txt"), b"owned by the user's daemon\n").unwrap();
    m.umount();
    m.mount(&format!("home={},allow_other", m.home.display()));
    assert_eq!(
        std::fs::read(m.mp.join("mine.txt")).unwrap(),
        b"owned by the user's daemon\n"
    );
    m.umount();
}

/// Runs the helper directly, as mount(8) would.
fn helper(args: &[&str], bin: &Path) -> Output {
    run(Command::new("sh")
        .arg(Path::new(REPO).join("mount-helper/mount.fuse.deltadrive"))
        .args(args)
        .env("DELTADRIVE_BIN", bin))
}

#[test]
fn helper_refuses_bad_options_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mp");
    std::fs::create_dir_all(&mp).unwrap();
    let mp_s = mp.display().to_string();
    let home = format!("home={}", dir.path().join("home").display());
    let b = Path::new(bin());

    for (opts, want) in [
        (format!("{home},ro"), "read-write"),
        (format!("{home},bogus=1"), "unknown option bogus=1"),
        ("home=".to_string(), "home= needs a folder"),
    ] {
        let o = helper(&["deltadrive", &mp_s, "-o", &opts], b);
        assert_eq!(o.status.code(), Some(1), "{opts}: {}", text(&o.stderr));
        let err = text(&o.stderr);
        assert!(
            err.starts_with("mount.fuse.deltadrive: ") && err.contains(want),
            "{opts}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let o = helper(&["deltadrive"], b);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("usage"));

    // -s (sloppy) ignores unknown options; -f (fake) stops before mounting.
    let o = helper(
        &[
            "deltadrive",
            &mp_s,
            "-sfv",
            "-o",
            &format!("{home},bogus=1"),
        ],
        b,
    );
    assert_ok("helper -sfv", &o);
    assert!(
        text(&o.stderr).contains("would run:"),
        "{}",
        text(&o.stderr)
    );

    // A mount point that is not a folder: mount failure (32), one line.
    let o = helper(
        &["deltadrive", &dir.path().join("nope").display().to_string()],
        b,
    );
    assert_eq!(o.status.code(), Some(32), "{}", text(&o.stderr));
    assert!(!common::is_mounted(&mp));
    assert!(
        !dir.path().join("home").exists(),
        "a refused mount left a home"
    );
}

/// Collects sd_notify messages sent to a socket of our own.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    sock: UnixDatagram,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        NotifySocket {
            _dir: dir,
            path,
            sock,
        }
    }

    /// Waits up to `limit` for a message holding `what`; returns everything received.
    fn wait_for(&self, what: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let mut all = String::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = text(&buf[..n]);
                all.push_str(&msg);
                all.push('\n');
                if msg.lines().any(|l| l == what) {
                    return all;
                }
            }
        }
        panic!("no {what} within {limit:?}; got: {all:?}");
    }
}

#[test]
fn server_notifies_systemd_when_listening_and_when_stopping() {
    let notify = NotifySocket::new();
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin())
        .args(["server", "--listen", "127.0.0.1:0", "--data"])
        .arg(data.path())
        .env("NOTIFY_SOCKET", &notify.path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let kill = scopeguard(child.id());
    notify.wait_for("READY=1", Duration::from_secs(60));
    // Ready means listening: the address is printed before READY=1 is sent.
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line.trim().rsplit("://").next().unwrap().to_string();
    std::net::TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    notify.wait_for("STOPPING=1", Duration::from_secs(30));
    let status = child.wait().unwrap();
    drop(kill);
    assert!(status.success(), "server exited {status}");
}

/// The command lines of the shipped user unit, `%h` and `%I` filled in and
/// `/usr/bin/deltadrive` replaced by the binary under test: (ignore failure, argv).
fn user_unit_commands(key: &str, home: &Path, instance: &str) -> Vec<(bool, Vec<String>)> {
    let unit =
        std::fs::read_to_string(Path::new(REPO).join("packaging/systemd/deltadrive@.service"))
            .unwrap();
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|cmd| {
            let (ignore, cmd) = match cmd.strip_prefix('-') {
                Some(c) => (true, c),
                None => (false, cmd),
            };
            let argv = cmd
                .split_whitespace()
                .map(|w| {
                    w.replace("/usr/bin/deltadrive", bin())
                        .replace("%h", &home.display().to_string())
                        .replace("%I", instance)
                })
                .collect();
            (ignore, argv)
        })
        .collect()
}

/// Runs `systemctl --user start deltadrive@Drive` the way systemd would: the ExecStartPre
/// lines, then ExecStart with NOTIFY_SOCKET, waiting for READY=1.
fn start_user_unit(home: &Path, notify: &NotifySocket) -> std::process::Child {
    for (ignore, argv) in user_unit_commands("ExecStartPre", home, "Drive") {
        let o = run(Command::new(&argv[0]).args(&argv[1..]).env("HOME", home));
        if !ignore {
            assert_ok(&argv.join(" "), &o);
        }
    }
    let start = user_unit_commands("ExecStart", home, "Drive");
    assert_eq!(start.len(), 1);
    let argv = &start[0].1;
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .env("HOME", home)
        .env_remove("XDG_DATA_HOME")
        .env_remove("DELTADRIVE_HOME")
        .env("NOTIFY_SOCKET", &notify.path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    notify.wait_for("READY=1", Duration::from_secs(60));
    child
}

#[test]
fn user_unit_commands_mount_notify_stop_and_recover_from_a_crash() {
    let notify = NotifySocket::new();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("user");
    std::fs::create_dir_all(&home).unwrap();
    let mp = home.join("Drive");
    let state = home.join(".local/share/deltadrive");

    let mut child = start_user_unit(&home, &notify);
    let mut kill = scopeguard(child.id());
    assert!(common::is_mounted(&mp), "READY=1 before the mount");
    // The process systemd started is the daemon itself, so NotifyAccess=main holds.
    let pid_file = std::fs::read_to_string(state.join("mount.pid")).unwrap();
    assert_eq!(
        pid_file.lines().next().unwrap().trim(),
        child.id().to_string()
    );
    std::fs::write(mp.join("note.txt"), b"kept\n").unwrap();

    // A crash: Restart=on-failure runs the unit again over the dead mount.
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    drop(kill);
    child = start_user_unit(&home, &notify);
    kill = scopeguard(child.id());
    assert_eq!(std::fs::read(mp.join("note.txt")).unwrap(), b"kept\n");

    // systemctl --user stop: ExecStop, then the daemon exits by itself, successfully.
    // Reaped at once as systemd would (`deltadrive unmount` waits for the pid to go away).
    let waiter = std::thread::spawn(move || child.wait());
    for (ignore, argv) in user_unit_commands("ExecStop", &home, "Drive") {
        let o = run(Command::new(&argv[0]).args(&argv[1..]).env("HOME", &home));
        if !ignore {
            assert_ok(&argv.join(" "), &o);
        }
    }
    let status = waiter.join().unwrap().unwrap();
    drop(kill);
    assert!(status.success(), "mount daemon exited {status}");
    assert!(!common::is_mounted(&mp));
}

/// Kills a child on drop (a failed test must not leave a server or daemon running).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // SAFETY: plain kill of our own child.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

fn scopeguard(pid: u32) -> KillOnDrop {
    KillOnDrop(pid)
}

/// The .deb as a user gets it: `apt install ./deltadrive_*.deb` on a clean Debian root made by
/// debootstrap, used, its units run by the root's own systemd (`systemd-nspawn -b`), removed
/// and purged. `packaging/test-clean-root.sh` does it and prints each check it made.
#[test]
#[ignore = "minutes long (a debootstrap root, a booted systemd): run before each release with \
            `cargo test --test packaging -- --ignored clean_debian` (docs/install.md)"]
fn the_deb_installs_runs_under_systemd_and_purges_clean_on_a_clean_debian() {
    let Debs { deb, dbgsym } = debs();
    let o = run(Command::new("bash")
        .arg(Path::new(REPO).join("packaging/test-clean-root.sh"))
        .arg("--boot")
        .arg(deb)
        .arg(dbgsym));
    eprintln!("{}", text(&o.stdout));
    assert_ok("packaging/test-clean-root.sh --boot", &o);
    let said = text(&o.stdout);
    assert!(
        said.lines().last().is_some_and(|l| l.starts_with("PASS: ")),
        "{said}"
    );
}

#[test]
fn shell_scripts_pass_shellcheck() {
    let scripts = [
        "mount-helper/mount.fuse.deltadrive",
        "packaging/build-deb.sh",
        "packaging/install-deps.sh",
        "packaging/debian/postinst",
        "packaging/debian/prerm",
        "packaging/debian/postrm",
        "packaging/test-clean-root.sh",
    ];
    let o = run(Command::new("shellcheck")
        .current_dir(REPO)
        .args(["--severity=style"])
        .args(scripts));
    assert_ok("shellcheck", &o);
}

#[test]
fn a_folder_mounted_through_the_helper_syncs_with_another_device() {
    let _lock = helper_lock();
    let srv = common::server::TestServer::start();
    let m = HelperMount::new(None);
    srv.login(&m.home, "fstab", "desk");
    let mut other = common::Mounted::unmounted(&[]);
    srv.login(&other.home, "fstab", "laptop");
    other.mount();
    m.mount(&format!("home={},_netdev,nofail", m.home.display()));
    std::fs::write(m.mp.join("from-fstab.txt"), b"mounted by mount(8)\n").unwrap();
    std::fs::write(other.path("from-laptop.txt"), b"the other way\n").unwrap();
    let start = std::time::Instant::now();
    loop {
        let there = std::fs::read(other.path("from-fstab.txt")).ok();
        let back = std::fs::read(m.mp.join("from-laptop.txt")).ok();
        if there.as_deref() == Some(&b"mounted by mount(8)\n"[..])
            && back.as_deref() == Some(&b"the other way\n"[..])
        {
            break;
        }
        if start.elapsed() > Duration::from_secs(45) {
            srv.print_logs();
            m.dump_log();
            other.dump_logs();
            panic!("the helper's mount and the other device did not sync within 45 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    m.umount();
}

/// The file-manager extension, loaded with a stand-in for the GObject introspection module
/// (no desktop here), shows the emblem of each file's state on a real mount.
#[test]
fn the_file_manager_extension_shows_each_files_state() {
    let m = common::Mounted::with_args(&["--quiet-ms", "60000"]);
    std::fs::write(m.path("draft.txt"), b"not sealed yet").unwrap();
    std::fs::write(m.path("notes.swp"), b"an editor's swap file").unwrap();
    let stub = open_tempdir("deltadrive-gi");
    let gi = stub.path().join("gi");
    std::fs::create_dir_all(gi.join("repository")).unwrap();
    std::fs::write(
        gi.join("__init__.py"),
        "def require_version(name, version):\n    if name != 'Nautilus' or version != '4.0':\n        raise ValueError(name)\n",
    )
    .unwrap();
    std::fs::write(
        gi.join("repository").join("__init__.py"),
        "class _GObject:\n    class GObject:\n        pass\nGObject = _GObject\nclass Nautilus:\n    class InfoProvider:\n        pass\n",
    )
    .unwrap();
    let script = format!(
        r#"
import importlib.util, urllib.parse
spec = importlib.util.spec_from_file_location("ext", "{ext}")
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
class File:
    def __init__(self, path):
        self.uri = "file://" + urllib.parse.quote(path)
        self.emblems = []
    def get_uri(self):
        return self.uri
    def add_emblem(self, e):
        self.emblems.append(e)
provider = ext.DeltadriveEmblems()
for name in ("draft.txt", "notes.swp"):
    f = File("{mp}/" + name)
    provider.update_file_info(f)
    print(name, ",".join(f.emblems) or "-")
outside = File("/etc/hostname")
provider.update_file_info(outside)
print("outside", ",".join(outside.emblems) or "-")
"#,
        ext = Path::new(REPO)
            .join("packaging/file-manager/deltadrive-emblems.py")
            .display(),
        mp = m.mp.display()
    );
    let o = run(Command::new("python3")
        .arg("-c")
        .arg(&script)
        .env("PYTHONPATH", stub.path()));
    assert_ok("python3 (the extension)", &o);
    let said = text(&o.stdout);
    assert!(said.contains("draft.txt emblem-synchronizing"), "{said}");
    assert!(said.contains("notes.swp -"), "{said}");
    assert!(said.contains("outside -"), "{said}");
}
