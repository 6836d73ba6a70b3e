//! The HTML of every page (maud templates, checked at compile time; every value is escaped).
//! Pages are plain forms and links that work with the keyboard and without the script; the
//! script only asks before deleting and submits the upload form when a file is picked.

use axum::http::StatusCode;
use maud::{html, Markup, DOCTYPE};

/// Where the user is, for the navigation's `aria-current`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Files,
    Devices,
    Shares,
    Password,
}

/// The frame of every page: title, navigation (when signed in), notice, content.
pub fn layout(
    title: &str,
    signed_in: Option<(&str, &str, Nav)>,
    notice: Option<&str>,
    body: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · deltadrive" }
                link rel="stylesheet" href="/web/static/style.css";
                script src="/web/static/app.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    span.brand { "deltadrive" }
                    @if let Some((user, csrf, nav)) = signed_in {
                        nav aria-label="Main" {
                            ul {
                                li { a href="/web/files" aria-current=[(nav == Nav::Files).then_some("page")] { "Files" } }
                                li { a href="/web/devices" aria-current=[(nav == Nav::Devices).then_some("page")] { "Devices" } }
                                li { a href="/web/shares" aria-current=[(nav == Nav::Shares).then_some("page")] { "Links" } }
                                li { a href="/web/password" aria-current=[(nav == Nav::Password).then_some("page")] { "Password" } }
                            }
                        }
                        form.signout method="post" action="/web/logout" {
                            input type="hidden" name="csrf" value=(csrf);
                            span.who { "Signed in as " strong { (user) } }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main #main tabindex="-1" {
                    @if let Some(n) = notice {
                        p.notice role="status" { (n) }
                    }
                    (body)
                }
            }
        }
    }
}

/// An error page with a way back.
pub fn error_page(status: StatusCode, message: &str) -> Markup {
    layout(
        "Error",
        None,
        None,
        html! {
            h1 { "Something went wrong" }
            p.error role="alert" { (message) }
            p.muted { "HTTP " (status.as_u16()) }
            p { a href="/web/files" { "Back to your files" } }
        },
    )
}

/// The sign-in form.
pub fn login(error: Option<&str>, user: &str) -> Markup {
    layout(
        "Sign in",
        None,
        None,
        html! {
            h1 { "Sign in" }
            @if let Some(e) = error {
                p.error role="alert" { (e) }
            }
            form.card method="post" action="/web/login" {
                label for="user" { "User" }
                input #user name="user" type="text" autocomplete="username" required autofocus value=(user);
                label for="password" { "Password" }
                input #password name="password" type="password" autocomplete="current-password" required;
                button type="submit" { "Sign in" }
            }
        },
    )
}

/// Bytes as a short human size.
pub fn size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Milliseconds since the epoch as UTC date and time.
pub fn time(ms: i64) -> String {
    crate::cli::mount::format_ms(ms)
}
