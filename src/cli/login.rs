//! `deltadrive login`: logs this device in and writes `H/device.json` (0600), refusing a
//! storage URL that would take the token to another host or over plain HTTP; `deltadrive
//! passwd`: changes the password of the device's user (the other devices are logged out).

use super::admin::read_secret;
use super::{LoginArgs, PasswdArgs};
use crate::client::{check_storage_url, Client, DeviceConfig};
use crate::home::Home;

/// Logs in and saves the device's config.
pub fn login(args: LoginArgs) -> anyhow::Result<()> {
    let home = Home::resolve(args.home.home.as_deref())?;
    let password = read_secret(&args.password_file)?;
    let ca = args.ca_cert.as_ref().map(std::path::absolute).transpose()?;
    let client = Client::new(&args.server, None, ca.as_deref())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let info = rt.block_on(client.login(&args.user, &password, &args.device))?;
    // Before anything is saved: a token is never kept for a URL it must not travel to.
    check_storage_url(client.base(), &info.storage_url)?;
    let config = DeviceConfig {
        server_url: client.base().to_string(),
        user: args.user.clone(),
        device: args.device.clone(),
        device_id: info.device_id,
        token: info.token,
        storage_url: info.storage_url,
        ca_cert: ca,
    };
    config.save(&home)?;
    println!(
        "logged in as {} on device {}; wrote {}",
        args.user,
        args.device,
        home.device_file().display()
    );
    Ok(())
}

/// A secret from a file, or typed at the terminal (without echo).
fn secret(file: Option<&std::path::Path>, prompt: &str) -> anyhow::Result<String> {
    match file {
        Some(f) => read_secret(f),
        None => {
            let s = rpassword::prompt_password(prompt)?;
            anyhow::ensure!(!s.is_empty(), "no password given");
            Ok(s)
        }
    }
}

/// Changes the password of the device's user on the device's server.
pub fn passwd(args: PasswdArgs) -> anyhow::Result<()> {
    let home = Home::resolve(args.home.home.as_deref())?;
    let config = DeviceConfig::load(&home)?;
    let old = secret(args.old_password_file.as_deref(), "current password: ")?;
    let new = match args.new_password_file.as_deref() {
        Some(f) => read_secret(f)?,
        None => {
            let a = secret(None, "new password: ")?;
            let b = secret(None, "new password again: ")?;
            anyhow::ensure!(a == b, "the two new passwords differ; nothing changed");
            a
        }
    };
    let client = Client::new(
        &config.server_url,
        Some(config.token.clone()),
        config.ca_cert.as_deref(),
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(client.change_password(&old, &new))?;
    println!(
        "changed the password of {} on {}; the user's other devices must log in again",
        config.user, config.server_url
    );
    Ok(())
}
