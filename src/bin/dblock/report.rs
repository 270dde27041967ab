//! `dblock migrate`, `list`, `status` and `release`.

use std::time::Duration;

use dblock::LockInfo;
use serde::Serialize;

use crate::connect::{self, Session, Target};
use crate::exit::{CliResult, Failure};
use crate::parse_name;

/// Opens the target for an operator command.
async fn open(target: Target, timeout: Duration) -> CliResult<Session> {
    connect::open(target, "dblock", timeout).await
}

/// A read that finds no schema has found no locks: reads never create it.
pub(crate) fn no_schema_is_empty<T: Default>(r: dblock::Result<T>) -> CliResult<T> {
    match r {
        Err(dblock::Error::SchemaMissing { .. }) => Ok(T::default()),
        r => r.map_err(Failure::from),
    }
}

/// `dblock migrate`.
pub async fn migrate(target: Target, timeout: Duration) -> CliResult<u8> {
    let session = open(target, timeout).await?;
    session.migrate().await?;
    println!("dblock schema is up to date in {}", session.target.shown);
    Ok(0)
}

/// `dblock list`: every lock held now on the database, by every mechanism
/// it offers (on PostgreSQL: advisory locks and leases).
pub async fn list(target: Target, timeout: Duration, json: bool) -> CliResult<u8> {
    let session = open(target, timeout).await?;
    let mut all = Vec::new();
    for (i, (backend, locks)) in session.all_locks()?.into_iter().enumerate() {
        let Some(infos) = also_look(i, backend, no_schema_is_empty(locks.list().await))? else {
            continue;
        };
        for info in infos {
            all.push(Listed { backend, info });
        }
    }
    if json {
        println!("{}", to_json(&all)?);
    } else if all.is_empty() {
        println!("no locks held");
    } else {
        print_table(&all);
    }
    Ok(0)
}

/// The outcome of looking through the `i`th mechanism of
/// [`Session::all_locks`]: the chosen one's errors are the command's; the
/// other one (the lease table beside advisory locks, say) may be out of
/// the user's reach, which is said on stderr and skipped (`None`).
pub(crate) fn also_look<T>(i: usize, backend: &str, r: CliResult<T>) -> CliResult<Option<T>> {
    match r {
        Ok(found) => Ok(Some(found)),
        Err(f) if i == 0 => Err(f),
        Err(f) => {
            eprintln!(
                "{}",
                crate::message(&format!("not showing {backend} locks: {}", f.message))
            );
            Ok(None)
        }
    }
}

/// A lock and the mechanism that holds it, as `list` and `status` print it.
#[derive(Serialize)]
struct Listed {
    backend: &'static str,
    #[serde(flatten)]
    info: LockInfo,
}

pub(crate) fn to_json<T: Serialize + ?Sized>(value: &T) -> CliResult<String> {
    serde_json::to_string(value).map_err(|e| Failure::new(1, format!("cannot print JSON: {e}")))
}

fn to_value<T: Serialize + ?Sized>(value: &T) -> CliResult<serde_json::Value> {
    serde_json::to_value(value).map_err(|e| Failure::new(1, format!("cannot print JSON: {e}")))
}

/// `dblock status`: 0 if held, 1 if free. On PostgreSQL both advisory locks
/// and leases are looked at, since the two never exclude each other.
pub async fn status(
    target: Target,
    timeout: Duration,
    name: std::ffi::OsString,
    json: bool,
) -> CliResult<u8> {
    let name = parse_name(name)?;
    let session = open(target, timeout).await?;
    let mut held = Vec::new();
    for (i, (backend, locks)) in session.all_locks()?.into_iter().enumerate() {
        let found = also_look(i, backend, no_schema_is_empty(locks.inspect(&name).await))?;
        if let Some(info) = found.flatten() {
            held.push(Listed { backend, info });
        }
    }
    let first = held.first();
    if json {
        // The lock's fields (as `list --json` prints them), then the
        // name asked about and whether it is held.
        let mut status = match first {
            Some(listed) => to_value(listed)?,
            None => serde_json::json!({}),
        };
        status["name"] = name.as_str().into();
        status["held"] = first.is_some().into();
        if held.len() > 1 {
            // Holders through other mechanisms, which do not exclude it.
            status["also"] = to_value(&held[1..])?;
        }
        println!("{}", to_json(&status)?);
    } else if held.is_empty() {
        println!("{name}: free");
    } else {
        for listed in &held {
            print_status(&name, listed);
        }
        if held.len() > 1 {
            println!(
                "warning: {name} is held through {} different mechanisms, which do not exclude \
                 each other; use one backend per name",
                held.len()
            );
        }
    }
    Ok(if held.is_empty() { 1 } else { 0 })
}

/// `dblock release --force`: 0 if a lock was broken, 1 if none was held.
pub async fn release(
    target: Target,
    timeout: Duration,
    name: std::ffi::OsString,
    force: bool,
) -> CliResult<u8> {
    let name = parse_name(name)?;
    if !force {
        return Err(Failure::usage(format!(
            "refusing to break lock {name:?} without --force. Breaking a lock takes it away \
             from its holder mid-work: a lease is ended, and for an advisory lock the holder's \
             database session is terminated; a `dblock run` holding it stops its command and \
             exits 76. Check `dblock status {name}` first, then run `dblock release {name} --force`."
        )));
    }
    let session = open(target, timeout).await?;
    let locks = session.locks()?;
    let broken = no_schema_is_empty(locks.force_release(&name).await)?;
    if broken {
        println!("{name}: broken; its holder has lost it");
        Ok(0)
    } else {
        println!("{name}: not held; nothing to break");
        Ok(1)
    }
}

fn label(info: &LockInfo) -> String {
    match (&info.name, info.key) {
        (Some(name), _) => name.clone(),
        (None, Some(key)) => format!("(advisory key {key})"),
        (None, None) => "(unnamed)".to_owned(),
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".to_owned())
}

fn print_status(name: &str, listed: &Listed) {
    let info = &listed.info;
    println!("{name}: held");
    println!("  backend:  {}", listed.backend);
    println!("  mode:     {}", info.mode);
    if info.holders > 1 {
        println!("  holders:  {}", info.holders);
    }
    println!("  holder:   {}", info.holder);
    if let Some(token) = info.token {
        println!("  token:    {token}");
    }
    if let Some(at) = info.acquired_at {
        println!("  acquired: {}", at.to_rfc3339());
    }
    match info.expires_at {
        Some(at) => println!("  expires:  {} (unless renewed)", at.to_rfc3339()),
        None => println!("  expires:  when the holder's database session ends"),
    }
    if let Some(key) = info.key {
        println!("  key:      {key} (PostgreSQL advisory key)");
    }
    if let Some(waiters) = info.waiters {
        println!("  waiters:  {waiters}");
    }
}

fn print_table(all: &[Listed]) {
    let rows = all.iter().map(|Listed { backend, info: i }| {
        [
            label(i),
            (*backend).to_owned(),
            i.mode.to_string(),
            i.holders.to_string(),
            opt(i.waiters),
            opt(i.token),
            opt(i.expires_at.map(|t| t.to_rfc3339())),
            i.holder.clone(),
        ]
    });
    println!("{}", table(rows));
}

/// Plain columns, left-aligned, two spaces apart, under a header line;
/// no borders, no trailing spaces.
fn table(rows: impl IntoIterator<Item = [String; 8]>) -> String {
    let mut table = comfy_table::Table::new();
    table
        .load_style(comfy_table::presets::NOTHING)
        .set_header([
            "NAME", "BACKEND", "MODE", "HOLDERS", "WAITERS", "TOKEN", "EXPIRES", "HOLDER",
        ])
        .add_rows(rows);
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table.trim_fmt()
}

#[cfg(test)]
mod tests {
    use super::table;

    #[test]
    fn tables_are_plain_aligned_columns() {
        let row = |name: &str, holder: &str| {
            [name, "lease", "exclusive", "1", "-", "7", "-", holder].map(str::to_owned)
        };
        let out = table([row("a-long-name", "h:1"), row("b", "host:22")]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "NAME         BACKEND  MODE       HOLDERS  WAITERS  TOKEN  EXPIRES  HOLDER",
                "a-long-name  lease    exclusive  1        -        7      -        h:1",
                "b            lease    exclusive  1        -        7      -        host:22",
            ]
        );
    }
}
