//! `deltadrive admin`: user and device administration through the admin API.

use anyhow::Context;

use super::{AdminArgs, AdminCommand, DeviceCommand, UserCommand};
use crate::client::Client;

/// Reads the first line of a secret file, trimmed.
pub fn read_secret(path: &std::path::Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let line = text.lines().next().unwrap_or("").trim().to_string();
    anyhow::ensure!(!line.is_empty(), "{} is empty", path.display());
    Ok(line)
}

/// Runs one admin command.
pub fn admin(args: AdminArgs) -> anyhow::Result<()> {
    let token = read_secret(&args.admin_token_file)?;
    let client = Client::new(&args.server, Some(token), None)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match args.command {
            AdminCommand::User { command } => match command {
                UserCommand::Add {
                    name,
                    password_file,
                } => {
                    let (password, generated) = match password_file {
                        Some(p) => (read_secret(&p)?, false),
                        None => (crate::server::auth::new_token()[..24].to_string(), true),
                    };
                    client.add_user(&name, &password).await?;
                    if generated {
                        println!("created user {name} with password {password}");
                    } else {
                        println!("created user {name}");
                    }
                }
                UserCommand::List => {
                    for u in client.list_users().await? {
                        println!("{}", u.name);
                    }
                }
                UserCommand::Remove { name } => {
                    client.remove_user(&name).await?;
                    println!("removed user {name}");
                }
                UserCommand::SetPassword {
                    name,
                    password_file,
                } => {
                    client
                        .set_password(&name, &read_secret(&password_file)?)
                        .await?;
                    println!("set the password of {name}; each of its devices must log in again");
                }
            },
            AdminCommand::Device { command } => match command {
                DeviceCommand::List { user } => {
                    for d in client.admin_list_devices(&user).await? {
                        let state = if d.revoked { "revoked" } else { "active" };
                        println!("{}\t{}\t{}", d.name, d.id, state);
                    }
                }
                DeviceCommand::Revoke { user, device } => {
                    client.admin_revoke_device(&user, &device).await?;
                    println!("revoked device {device} of user {user}");
                }
            },
        }
        Ok(())
    })
}
