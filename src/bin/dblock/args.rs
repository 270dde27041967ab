//! The command line, as clap sees it.
//!
//! Durations, numbers and names are taken as plain strings here and checked
//! later, with messages that say what range is allowed (exit 64, like
//! clap's own usage errors).

use std::ffi::OsString;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::exit;

const ABOUT: &str = "Run commands under a distributed lock kept in your database";

const LONG_ABOUT: &str = "\
Run commands under a distributed lock kept in the database you already run:
PostgreSQL advisory locks, or lease rows on PostgreSQL, MySQL/MariaDB or an
embedded SQLite file.

The database comes from --url, else $DBLOCK_URL, else $DATABASE_URL, else
the SQLite file $XDG_STATE_HOME/dblock/dblock.db (~/.local/state/dblock/
dblock.db when XDG_STATE_HOME is unset), created on first use. That default
excludes only processes of the same user on this machine: give every host
the same database URL for a lock across machines. The URL's scheme
picks the backend: postgres:// and postgresql:// use advisory locks (or a
lease table with --backend lease); mysql://, mariadb:// and sqlite: use a
lease table. dblock creates its schema on first use (or run `dblock migrate`).

Locks taken through different backends never exclude each other, even on
one PostgreSQL database: an advisory lock and a lease of the same name are
two different locks. Use one backend per name (`dblock status` names the
backend it looked at).

Passwords in URLs are never printed.";

const AFTER_HELP: &str = "\
Examples:
  dblock run reports:nightly -n -- /usr/local/bin/nightly-report
  dblock run deploy:web -w 10m -c './build.sh && ./deploy.sh'
  dblock --url postgres://app@db/app run cron:cleanup -n -E 0 -- ./cleanup
  dblock status deploy:web
  dblock list --json";

/// The `dblock` command line.
#[derive(Debug, Parser)]
#[command(
    name = "dblock",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    after_long_help = format!("{AFTER_HELP}\n\n{}", exit::TABLE),
    propagate_version = true,
    subcommand_required = true,
    arg_required_else_help = true
)]
pub struct Cli {
    /// Options every subcommand takes.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where the locks live.
#[derive(Debug, Args)]
pub struct Global {
    /// Database URL: postgres://, postgresql://, mysql://, mariadb:// or
    /// sqlite:PATH. Without it (and without $DBLOCK_URL or $DATABASE_URL),
    /// the SQLite file ~/.local/state/dblock/dblock.db, which excludes only
    /// on this machine.
    #[arg(
        long,
        global = true,
        env = "DBLOCK_URL",
        hide_env_values = true,
        value_name = "URL",
        display_order = 100
    )]
    pub url: Option<String>,

    /// Lock mechanism: advisory (PostgreSQL only; the default there) or
    /// lease (the only one on MySQL/MariaDB and SQLite).
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "KIND",
        display_order = 101
    )]
    pub backend: Option<BackendKind>,

    /// Give up connecting to the database after this long (exit 69);
    /// 100ms to 1h.
    #[arg(
        long,
        global = true,
        value_name = "DUR",
        default_value = "10s",
        display_order = 102
    )]
    pub connect_timeout: String,
}

/// The lock mechanism asked for with `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// PostgreSQL session-level advisory locks: held as long as dblock's
    /// connection lives.
    Advisory,
    /// A lease row with an expiry, renewed while the command runs.
    Lease,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command while holding a lock.
    #[command(
        long_about = "\
Run CMD while holding the lock NAME, and release the lock when CMD exits:
flock(1) for a fleet, with the same short options (-n, -w, -E, -c, -s).

CMD gets DBLOCK_NAME (the lock's name) and DBLOCK_TOKEN (its fencing token:
strictly greater than every earlier holder's) in its environment.

CMD never outlives the lock:
- CMD runs in its own process group under a small supervisor (this same
  binary). If dblock dies in any way (SIGKILL, the OOM killer, a crash),
  the supervisor kills CMD's whole process group at once. Processes left in
  that group when CMD exits are killed before the lock is released.
  Processes that leave the group (setsid, daemons) are not followed.
- If the lock is lost while CMD runs (its database session ended, its lease
  could not be renewed in time, or an operator broke it), CMD's group gets
  SIGTERM, then SIGKILL after --kill-after, cut so that CMD is dead before
  the lease can run out: a lease is given up a fifth of its ttl before it
  ends, and SIGKILL follows SIGTERM after at most a tenth of the ttl. An
  advisory lock is free as soon as its session ends, so CMD gets SIGKILL
  right after SIGTERM. dblock then exits 76.

SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH and SIGCONT
sent to dblock are forwarded to CMD's group. When dblock runs in the
foreground of a terminal, CMD gets the terminal's foreground (an interactive
CMD can read it; ^C, ^Z and window size changes reach it directly), and when
CMD stops (^Z) dblock stops too, so the shell's fg/bg work; on resuming,
dblock checks that it still holds the lock before CMD continues.

Without --url, $DBLOCK_URL or $DATABASE_URL, the lock lives in an SQLite
file in ~/.local/state/dblock/ and excludes only on this machine.",
        after_long_help = exit::TABLE
    )]
    Run(RunArgs),
    /// Run a command once per slot across every host that runs the same line.
    #[command(
        long_about = "\
Run CMD once per slot of a schedule across every machine that runs the same
line: cron on every host, each job once. Slots follow the database clock
(hosts whose clocks differ agree on them); each slot is claimed with a lease
named schedule:NAME@SLOT that outlives the slot, so a host that comes late
finds it taken. The host that claims a slot runs CMD as `dblock run` would:
in its own process group, with signals forwarded, stopped (SIGTERM, then
SIGKILL after --kill-after) if the lease is lost. CMD gets DBLOCK_SLOT (the
slot's start, RFC 3339 in UTC), DBLOCK_TOKEN (the slot lease's fencing
token), DBLOCK_NAME (the lease's name) and DBLOCK_JOB (NAME).

One line per slot goes to stderr: ran here, taken by another host, skipped
(a run is still going), or missed. SIGTERM or SIGINT stops the schedule:
a command still running gets the signal too, dblock waits for it, and exits
0. Needs a lease backend: on PostgreSQL the lease table is used.",
        after_long_help = "\
Examples:
  dblock cron --every 15m reports:refresh -- /usr/local/bin/refresh-reports
  dblock cron --cron '0 3 * * *' billing:nightly -- ./bill.sh

Exit status: 0 after SIGTERM/SIGINT, 64 usage error (a bad --every, --cron,
name or duration), 69 database unreachable."
    )]
    Cron(CronArgs),
    /// Create or update dblock's schema in the database.
    #[command(long_about = "\
Create or update dblock's schema in the database (a fencing sequence and a
lease table). Idempotent and safe to run from many hosts at once. `dblock
run` does this on first use; run it yourself when the application's user may
not create tables, with a user that may.")]
    Migrate,
    /// List the locks held now.
    #[command(long_about = "\
List the locks held now, as the database sees them, with the backend
holding each: on PostgreSQL both advisory locks and leases.

PostgreSQL keeps only a 64-bit key for an advisory lock, so advisory locks
are listed by key (see `dblock status NAME` to check one name); the holder
column names the session, and a `dblock run` session carries the lock name
in its application_name. WAITERS counts the sessions waiting for an advisory
lock; lease backends cannot see their waiters (-).")]
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show who holds a lock, through which backend; exit 0 if held, 1 if
    /// free.
    #[command(
        long_about = "\
Show who holds a lock, through which backend; exit 0 if held, 1 if free.

On PostgreSQL both advisory locks and leases are looked at, since an
advisory lock and a lease of the same name are two locks that never exclude
each other: each holder is shown with its backend, with a warning when both
hold the name. Advisory locks show their waiters (sessions blocked in
pg_advisory_lock).",
        after_help = "\
Exit status: 0 the lock is held, 1 it is free, 64/69 as for `dblock run`."
    )]
    Status {
        /// The lock's name.
        #[arg(value_name = "NAME")]
        name: OsString,
        /// Print a JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show who leads a leader election (dblock::Election); exit 0 if
    /// someone leads, 1 if nobody does.
    #[command(
        long_about = "\
Show who leads the leader election NAME (a program's dblock::Election): the
leader's identity, its term (its lock's fencing token, which only grows)
and since when it leads. With --watch, follow the election: one line per
change of leader or term, until interrupted.

On PostgreSQL both advisory locks and leases are looked at, as by `dblock
status`: the first that has a leader is shown.",
        after_help = "\
Exit status: 0 someone leads, 1 nobody does (without --watch); 64/69 as for
`dblock run`, and 69 when a read fails while watching."
    )]
    Leader {
        /// The election's name.
        #[arg(value_name = "NAME")]
        name: OsString,
        /// Print JSON (one object per line with --watch) instead of text.
        #[arg(long)]
        json: bool,
        /// Follow changes: one line per new leader, new term or vacancy.
        #[arg(long)]
        watch: bool,
        /// With --watch, read this often; 100ms to 1h [default: 1s].
        #[arg(long, value_name = "DUR", default_value = "1s", requires = "watch")]
        every: String,
    },
    /// Break a stuck lock (requires --force).
    #[command(
        long_about = "\
Break a lock whoever holds it: the lease is ended or, for an advisory lock,
the database session holding it is terminated. The holder loses the lock
mid-work: a `dblock run` holding it stops its command (SIGTERM, then SIGKILL)
and exits 76. Meant for an operator clearing a lock whose holder is stuck;
check `dblock status NAME` first.",
        after_help = "\
Exit status: 0 the lock was broken, 1 nobody held it, 64 without --force
or for a bad name, 69 as for `dblock run`."
    )]
    Release {
        /// The lock's name.
        #[arg(value_name = "NAME")]
        name: OsString,
        /// Really break the lock: the current holder loses it.
        #[arg(long)]
        force: bool,
    },
    /// dblock's own helper: the parent of a `dblock run` command.
    #[command(name = crate::supervisor::SUBCOMMAND, hide = true)]
    Supervise(SuperviseArgs),
}

/// `dblock __supervise --watch-fd N [--foreground] -- CMD [ARGS...]`: only
/// `dblock run` starts it (see the `supervisor` module).
#[derive(Debug, Args)]
pub struct SuperviseArgs {
    /// The inherited read end of the pipe that dblock holds open.
    #[arg(long, value_name = "FD")]
    pub watch_fd: i32,
    /// Put the command in the terminal's foreground.
    #[arg(long)]
    pub foreground: bool,
    /// The command.
    #[arg(last = true, required = true)]
    pub command: Vec<OsString>,
}

/// `dblock run NAME [options] -- CMD [ARGS...]` (or `-c STRING`).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The lock's name: 1 to 255 bytes of UTF-8, no NUL.
    #[arg(value_name = "NAME")]
    pub name: OsString,

    /// Lease length for lease backends, renewed every third of it while CMD
    /// runs; e.g. 30s, 5m, 1h30m; 100ms to 366 days [default: 30s].
    /// Refused for advisory locks, which last as long as dblock's connection.
    #[arg(long, value_name = "DUR")]
    pub ttl: Option<String>,

    /// Wait at most this long for the lock, then exit 75 (default: wait
    /// until it is free); 0 to 366 days.
    #[arg(
        short = 'w',
        long = "timeout",
        visible_alias = "wait",
        value_name = "DUR",
        conflicts_with = "nonblock"
    )]
    pub timeout: Option<String>,

    /// Do not wait: exit 75 at once if the lock is held elsewhere.
    #[arg(short = 'n', long = "nonblock", visible_alias = "no-wait")]
    pub nonblock: bool,

    /// The exit status when the lock is not acquired (--nonblock, or
    /// --timeout elapsed), 0 to 255 [default: 75]: pick one the command
    /// itself never uses.
    #[arg(short = 'E', long, value_name = "N")]
    pub conflict_exit_code: Option<String>,

    /// Take a shared (reader) lock: other shared holders may run at the same
    /// time, exclusive ones may not; a waiting exclusive holder keeps new
    /// shared ones out. Every backend.
    #[arg(short = 's', long)]
    pub shared: bool,

    /// Print nothing when the lock is not acquired (the exit status still
    /// says so): for cron jobs that skip a run while another holds the lock.
    #[arg(short, long)]
    pub quiet: bool,

    /// After the lock is lost, the most time CMD gets between SIGTERM and
    /// SIGKILL; 0 to 1h. It is cut to what is left of the lease's safety
    /// margin (a tenth of the ttl), and to nothing for an advisory lock, so
    /// that CMD is dead before anyone else can be granted the lock.
    #[arg(long, value_name = "DUR", default_value = "10s")]
    pub kill_after: String,

    /// Run this command line through `sh -c` instead of CMD.
    #[arg(
        short = 'c',
        long = "command",
        value_name = "STRING",
        conflicts_with = "cmd"
    )]
    pub shell: Option<OsString>,

    /// The command to run, and its arguments, after `--`.
    #[arg(last = true, required_unless_present = "shell", value_name = "CMD")]
    pub cmd: Vec<OsString>,
}

/// `dblock cron (--every DUR | --cron EXPR) NAME [options] -- CMD [ARGS...]`.
#[derive(Debug, Args)]
pub struct CronArgs {
    /// One slot every DUR, aligned to the Unix epoch (every 15m runs at :00,
    /// :15, :30, :45 UTC); at least 1s.
    #[arg(
        long,
        value_name = "DUR",
        required_unless_present = "cron",
        conflicts_with = "cron"
    )]
    pub every: Option<String>,

    /// One slot per match of a cron expression, in UTC: five fields
    /// (minute hour day-of-month month day-of-week), or six with seconds
    /// first; @hourly, @daily and the like work too.
    #[arg(long, value_name = "EXPR")]
    pub cron: Option<String>,

    /// The job's name, the same on every host: 1 to 200 bytes of UTF-8.
    #[arg(value_name = "NAME")]
    pub name: OsString,

    /// Lease length of a running slot, renewed every third of it while CMD
    /// runs [default: 30s]. A host that dies mid-run keeps the next slots
    /// from starting for at most this long.
    #[arg(long, value_name = "DUR")]
    pub ttl: Option<String>,

    /// After the lease is lost, how long CMD has between SIGTERM and SIGKILL.
    #[arg(long, value_name = "DUR", default_value = "10s")]
    pub kill_after: String,

    /// Start a slot even while the previous slot's command still runs
    /// (default: skip it).
    #[arg(long)]
    pub allow_overlap: bool,

    /// Run the latest slot that nobody ran (every host was down) once, as
    /// soon as a host is back (default: skip missed slots).
    #[arg(long)]
    pub catch_up: bool,

    /// Test hook: pretend this host's clock is off by DUR (e.g. -7s).
    #[arg(long, value_name = "DUR", hide = true, allow_hyphen_values = true)]
    pub clock_skew: Option<String>,

    /// The command to run, and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}
