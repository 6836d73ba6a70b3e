//! `deltadrive login`: logs this device in and writes `H/device.json` (0600).

use super::admin::read_secret;
use super::LoginArgs;
use crate::client::{Client, DeviceConfig};
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
