//! `dblock migrate`, `list`, `status` and `release`.

use std::time::Duration;

use dblock::LockInfo;
use serde_json::{json, Value};

use crate::connect::{self, Session, Target};
use crate::exit::{CliResult, Failure};
use crate::parse_name;

/// Opens the target for an operator command.
async fn open(target: Target, timeout: Duration) -> CliResult<Session> {
    connect::open(target, "dblock", timeout).await
}

/// A read that finds no schema has found no locks: reads never create it.
fn no_schema_is_empty<T: Default>(r: dblock::Result<T>) -> CliResult<T> {
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

/// `dblock list`.
pub async fn list(target: Target, timeout: Duration, json: bool) -> CliResult<u8> {
    let session = open(target, timeout).await?;
    let locks = session.locks()?;
    let infos = no_schema_is_empty(locks.list().await)?;
    if json {
        let all: Vec<Value> = infos.iter().map(to_json).collect();
        println!("{}", Value::Array(all));
    } else if infos.is_empty() {
        println!("no locks held");
    } else {
        print_table(&infos);
    }
    Ok(0)
}

/// `dblock status`: 0 if held, 1 if free.
pub async fn status(
    target: Target,
    timeout: Duration,
    name: std::ffi::OsString,
    json: bool,
) -> CliResult<u8> {
    let name = parse_name(name)?;
    let session = open(target, timeout).await?;
    let locks = session.locks()?;
    let info = no_schema_is_empty(locks.inspect(&name).await)?;
    match (&info, json) {
        (Some(info), true) => {
            let mut value = to_json(info);
            value["name"] = json!(name);
            value["held"] = json!(true);
            println!("{value}");
        }
        (None, true) => println!("{}", json!({ "name": name, "held": false })),
        (Some(info), false) => print_status(&name, info),
        (None, false) => println!("{name}: free"),
    }
    Ok(if info.is_some() { 0 } else { 1 })
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

fn ts(t: Option<chrono::DateTime<chrono::Utc>>) -> Value {
    t.map(|t| json!(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)))
        .unwrap_or(Value::Null)
}

/// A lock as JSON: `LockInfo` has no serde derive, so it is built here.
fn to_json(info: &LockInfo) -> Value {
    json!({
        "name": info.name,
        "key": info.key,
        "mode": info.mode.as_str(),
        "holder": info.holder,
        "holders": info.holders,
        "token": info.token,
        "acquired_at": ts(info.acquired_at),
        "expires_at": ts(info.expires_at),
    })
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

fn print_status(name: &str, info: &LockInfo) {
    println!("{name}: held");
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
}

fn print_table(infos: &[LockInfo]) {
    let rows: Vec<[String; 6]> = infos
        .iter()
        .map(|i| {
            [
                label(i),
                i.mode.to_string(),
                i.holders.to_string(),
                opt(i.token),
                opt(i.expires_at.map(|t| t.to_rfc3339())),
                i.holder.clone(),
            ]
        })
        .collect();
    let header = ["NAME", "MODE", "HOLDERS", "TOKEN", "EXPIRES", "HOLDER"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out
    };
    println!("{}", line(header));
    for row in &rows {
        println!("{}", line(row.each_ref().map(String::as_str)));
    }
}
