//! A desktop notification (org.freedesktop.Notifications on the session bus) when this
//! device keeps its version of a file as a conflicted copy. Sent with `gdbus` (GLib, on every
//! desktop that has the bus) from a thread of its own, so sync never waits on it; nothing
//! happens without a session bus.

use std::process::{Command, Stdio};

/// The session bus address, if there is one.
fn session_bus() -> Option<String> {
    if let Ok(a) = std::env::var("DBUS_SESSION_BUS_ADDRESS") {
        if !a.is_empty() {
            return Some(a);
        }
    }
    let dir = std::env::var("XDG_RUNTIME_DIR").ok()?;
    let bus = std::path::Path::new(&dir).join("bus");
    bus.exists().then(|| format!("unix:path={}", bus.display()))
}

/// A GVariant text-format string literal.
fn gvariant_string(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Tells the desktop that conflicted copies `names` were made.
pub fn conflicts(names: &[String]) {
    let Some(bus) = session_bus() else {
        return;
    };
    if names.is_empty() {
        return;
    }
    let summary = "deltadrive: edited on two devices";
    let body = if names.len() == 1 {
        format!(
            "Another device changed this file at the same time; this device's version is kept as \"{}\".",
            names[0]
        )
    } else {
        format!(
            "Another device changed {} files at the same time; this device's versions are kept as conflicted copies (deltadrive status lists them).",
            names.len()
        )
    };
    let args = [
        "call".to_string(),
        "--session".into(),
        "--dest".into(),
        "org.freedesktop.Notifications".into(),
        "--object-path".into(),
        "/org/freedesktop/Notifications".into(),
        "--method".into(),
        "org.freedesktop.Notifications.Notify".into(),
        gvariant_string("deltadrive"),
        "uint32 0".into(),
        gvariant_string("dialog-warning"),
        gvariant_string(summary),
        gvariant_string(&body),
        "@as []".into(),
        "@a{sv} {}".into(),
        "int32 10000".into(),
    ];
    let spawned = std::thread::Builder::new()
        .name("notify".into())
        .spawn(move || {
            let r = Command::new("gdbus")
                .args(&args)
                .env("DBUS_SESSION_BUS_ADDRESS", &bus)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            match r {
                Ok(s) if s.success() => {}
                Ok(s) => tracing::debug!("desktop notification not shown (gdbus {s})"),
                Err(e) => tracing::debug!("desktop notification not shown (gdbus: {e})"),
            }
        });
    if let Err(e) = spawned {
        tracing::debug!("desktop notification not shown: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::gvariant_string;

    #[test]
    fn strings_are_quoted_for_gvariant() {
        assert_eq!(gvariant_string("a 'b' \\c"), r"'a \'b\' \\c'");
    }
}
