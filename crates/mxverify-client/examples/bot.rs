//! A bot that answers every verification request and confirms when its operator says the emoji
//! match. Log the bot in first (`mxverify --state-dir DIR login ...`), then:
//!
//!     cargo run -p mxverify-client --example bot -- DIR
use std::io::BufRead;

use mxverify_client::{Device, DeviceEvent};
use mxverify_proto::{Config, Event};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: bot STATE_DIR")?;
    let device = Device::open(dir.as_ref(), Config::default())?;
    device.start().await?;
    println!("{} is listening on device {}", device.user_id(), device.device_id());
    while let Some(event) = device.next_event().await {
        let DeviceEvent::Verification(event) = event else { continue };
        match event {
            Event::IncomingRequest { flow, .. } => device.accept(&flow).await?,
            Event::Sas { flow, emoji: Some(emoji), .. } => {
                let shown: Vec<String> = emoji.iter().map(|e| format!("{} {}", e.symbol, e.description)).collect();
                println!("Does the other device show: {}? [y/n]", shown.join(", "));
                let answer = tokio::task::spawn_blocking(|| std::io::stdin().lock().lines().next()).await?;
                match answer {
                    Some(Ok(a)) if a.trim() == "y" => device.confirm(&flow).await?,
                    _ => device.mismatch(&flow).await?,
                }
            }
            Event::Done { user_id, device_id, .. } => println!("Verified {user_id} ({device_id})"),
            Event::Cancelled { info, .. } => println!("{}", info.explain()),
            _ => {}
        }
    }
    Ok(())
}
