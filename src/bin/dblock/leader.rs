//! `dblock leader NAME [--json] [--watch [--every DUR]]`: who leads an
//! election (`dblock::Election`).

use std::ffi::OsString;
use std::io::Write;
use std::time::Duration;

use dblock::Leader;

use crate::connect::{self, Session, Target};
use crate::exit::{CliResult, Failure};
use crate::report::{also_look, no_schema_is_empty, to_json};
use crate::{parse_duration, parse_name};

/// `dblock leader`: 0 if someone leads, 1 if nobody does. With `--watch`
/// (`every` is its period) it prints a line per change until interrupted.
pub async fn leader(
    target: Target,
    timeout: Duration,
    name: OsString,
    json: bool,
    every: Option<String>,
) -> CliResult<u8> {
    let name = parse_name(name)?;
    let every = every
        .map(|e| {
            parse_duration(
                "--every",
                &e,
                Duration::from_millis(100),
                Duration::from_secs(3600),
            )
        })
        .transpose()?;
    let session = connect::open(target, "dblock", timeout).await?;
    let Some(every) = every else {
        let found = read(&session, &name).await?;
        print(&name, found.as_ref(), json, false)?;
        return Ok(if found.is_some() { 0 } else { 1 });
    };
    let mut shown: Option<Option<(String, u64)>> = None;
    loop {
        let found = read(&session, &name).await?;
        let key = found.as_ref().map(|(_, l)| (l.identity.clone(), l.term));
        if shown.as_ref() != Some(&key) {
            if print(&name, found.as_ref(), json, true).is_err() {
                // The reader went away (`| head -1`): nothing more to say.
                return Ok(0);
            }
            shown = Some(key);
        }
        tokio::time::sleep(every).await;
    }
}

/// The leader of `name` through the first mechanism that has one (on
/// PostgreSQL: advisory locks, then leases, or the other way round with
/// `--backend lease`), with that mechanism's name.
async fn read(session: &Session, name: &str) -> CliResult<Option<(&'static str, Leader)>> {
    for (i, (backend, locks)) in session.all_locks()?.into_iter().enumerate() {
        let found = also_look(i, backend, no_schema_is_empty(locks.leader(name).await))?;
        if let Some(leader) = found.flatten() {
            return Ok(Some((backend, leader)));
        }
    }
    Ok(None)
}

/// Prints the leader (or its absence): a block of text, a JSON object, or
/// one line per change with `--watch`. Fails only when stdout does.
fn print(
    name: &str,
    found: Option<&(&'static str, Leader)>,
    json: bool,
    watch: bool,
) -> CliResult<()> {
    let mut out = std::io::stdout().lock();
    let text = if json {
        let mut value = serde_json::json!({ "name": name, "leader": null });
        if let Some((backend, leader)) = found {
            value["leader"] = serde_json::to_value(leader)
                .map_err(|e| Failure::new(1, format!("cannot print JSON: {e}")))?;
            value["backend"] = (*backend).into();
        }
        to_json(&value)?
    } else {
        match (found, watch) {
            (None, _) => format!("{name}: no leader"),
            (Some((_, l)), true) => format!(
                "{name}: {} leads (term {}, since {})",
                l.identity,
                l.term,
                opt_time(l.since)
            ),
            (Some((backend, l)), false) => {
                let expires = match l.expires_at {
                    Some(at) => format!("{} (unless renewed)", at.to_rfc3339()),
                    None => "when the leader's database session ends".to_owned(),
                };
                format!(
                    "{name}: led by {}\n  term:     {}\n  since:    {}\n  expires:  {expires}\n  backend:  {backend}",
                    l.identity,
                    l.term,
                    opt_time(l.since)
                )
            }
        }
    };
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(|e| Failure::new(1, format!("cannot write to stdout: {e}")))
}

fn opt_time(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".to_owned())
}
