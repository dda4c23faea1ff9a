//! `ringpeer` command line: parses arguments, sets up tracing, and calls the
//! library. Every error a person can cause ends as one line on stderr and a
//! non-zero exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ringpeer::config::{AgentConfig, ProxyConfig};
use ringpeer::runtime::Shutdown;
use ringpeer::transport::identity::Role;
use ringpeer::transport::reload::Trigger;
use ringpeer::wire::DialTarget;

/// One line for a person on stderr, outside `tracing` (start-up, `--check`,
/// fatal errors): `ringpeer: …`, or with `--log-format json` a JSON line
/// shaped like the tracing ones.
macro_rules! say {
    ($($arg:tt)+) => { say(&format!($($arg)+)) };
}

static FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

fn say(msg: &str) {
    match FORMAT.get() {
        Some(LogFormat::Json) => {
            let ts = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            let line = serde_json::json!({
                "timestamp": ts,
                "level": "INFO",
                "fields": { "message": msg },
                "target": "ringpeer",
            });
            eprintln!("{line}");
        }
        _ => eprintln!("ringpeer: {msg}"),
    }
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ringpeer",
    version = ringpeer::runtime::build_version(),
    about = "Proxy-peering data plane: agents behind reverse tunnels, reachable through any proxy"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax; default: the config's
    /// log_level, else info); RUST_LOG overrides it.
    #[arg(long, global = true)]
    log: Option<String>,
    /// Log line format on stderr: text, or json (one JSON object a line:
    /// timestamp, level, target, fields).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum ProxyAction {
    /// Tell the proxy running with this config to leave the fleet now
    /// (decommission): its agents move to the other proxies, open streams
    /// finish, then it exits.
    Drain,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a proxy. Started while a proxy with the same config runs, it
    /// takes over that proxy's listeners and the old one drains (upgrade in
    /// place). SIGTERM drains (README, "Upgrades and maintenance"); SIGINT
    /// stops; a second signal exits at once.
    Proxy {
        /// Proxy config file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Check the config (values, addresses, certificates, keys, CRL,
        /// Redis URL) without binding or connecting anything: exit 0 when
        /// good, 2 with one line per problem.
        #[arg(long)]
        check: bool,
        #[command(subcommand)]
        action: Option<ProxyAction>,
    },
    /// Run an agent.
    Agent {
        /// Agent config file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Check the config without connecting anything (as `proxy --check`).
        #[arg(long)]
        check: bool,
    },
    /// Pipe stdin/stdout through the fleet to AGENT[/SERVICE], like nc.
    Dial {
        /// AGENT[/SERVICE]
        target: String,
        #[command(flatten)]
        client: ClientArgs,
        /// Dial deadline, ms.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Listen locally; multiplex every connection over one HTTP/2 connection to AGENT[/SERVICE].
    Forward {
        /// Local listen address.
        #[arg(long)]
        listen: String,
        /// AGENT[/SERVICE]
        #[arg(long)]
        to: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Development certificates.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Run a whole fleet in one process, push traffic through it, print what happened.
    Demo {
        /// Keep the fleet running and print commands to try it.
        #[arg(long)]
        serve: bool,
    },
    /// Read or write the route backend.
    Routes {
        #[command(flatten)]
        store: StoreArgs,
        #[command(subcommand)]
        cmd: RoutesCmd,
    },
    /// List, add, check or revoke grants (who may reach which agents and
    /// services) in the route backend.
    Grants {
        #[command(flatten)]
        store: StoreArgs,
        #[command(subcommand)]
        cmd: GrantsCmd,
    },
    /// Run a test target (echo or sink) as a standalone process, for
    /// side-by-side benchmarks against other proxies.
    Target {
        /// echo or sink.
        kind: String,
        /// Listen address.
        #[arg(long)]
        listen: String,
    },
    /// Load generator: direct TCP vs. through the proxy; JSON out.
    Bench(ringpeer::tools::bench::BenchOpts),
    /// Long mixed load through a running fleet, every byte checked, RSS
    /// watched; exits non-zero on a mismatch or RSS growth (scripts/soak).
    Soak(ringpeer::tools::soak::SoakOpts),
}

/// How `dial` and `forward` reach the fleet.
#[derive(clap::Args)]
struct ClientArgs {
    /// Proxy client address.
    #[arg(long)]
    proxy: String,
    /// Certificates directory (ca.pem, <name>.pem, <name>-key.pem).
    #[arg(long)]
    certs: PathBuf,
    /// Client certificate name in the directory.
    #[arg(long, default_value = "client")]
    name: String,
}

/// The backend `routes` and `grants` read and write, and how to print.
#[derive(clap::Args)]
struct StoreArgs {
    /// Backend URL, e.g. redis://127.0.0.1:6379 (with --cluster).
    #[arg(long, global = true)]
    backend: Option<String>,
    /// Cluster name (with --backend).
    #[arg(long, global = true)]
    cluster: Option<String>,
    /// Take backend and cluster from a proxy config instead.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    redis: RedisArgs,
}

impl StoreArgs {
    /// The backend these flags name (`routes` and `grants` alike).
    fn open(&self) -> anyhow::Result<Box<dyn ringpeer::route::store::RouteStore>> {
        let (b, c, f) = (self.backend.as_deref(), self.cluster.as_deref(), self.config.as_deref());
        ringpeer::tools::routes::open(b, c, f, &self.redis.clone().sources())
    }
}

/// Redis credentials and TLS for commands that name a backend. No flag
/// takes the password itself (argv is visible in `ps`): a file, or
/// RINGPEER_REDIS_PASSWORD.
#[derive(clap::Args, Clone)]
struct RedisArgs {
    /// File holding the Redis password (else RINGPEER_REDIS_PASSWORD).
    #[arg(long, global = true)]
    redis_password_file: Option<PathBuf>,
    /// Redis ACL user (else RINGPEER_REDIS_USERNAME).
    #[arg(long, global = true)]
    redis_username: Option<String>,
    /// PEM CA for a rediss:// backend (else the system roots).
    #[arg(long, global = true)]
    redis_tls_ca: Option<PathBuf>,
    /// PEM client certificate for a rediss:// backend.
    #[arg(long, global = true, requires = "redis_tls_key")]
    redis_tls_cert: Option<PathBuf>,
    /// PEM private key of --redis-tls-cert.
    #[arg(long, global = true, requires = "redis_tls_cert")]
    redis_tls_key: Option<PathBuf>,
    /// File holding the sentinels' password, for a redis+sentinel://
    /// backend (else RINGPEER_REDIS_SENTINEL_PASSWORD).
    #[arg(long, global = true)]
    redis_sentinel_password_file: Option<PathBuf>,
}

impl RedisArgs {
    fn sources(self) -> ringpeer::route::redis_conn::RedisSources {
        ringpeer::route::redis_conn::RedisSources {
            username: self.redis_username,
            password_file: self.redis_password_file,
            tls_ca: self.redis_tls_ca,
            tls_cert: self.redis_tls_cert,
            tls_key: self.redis_tls_key,
            sentinel_password_file: self.redis_sentinel_password_file,
        }
    }
}

#[derive(Subcommand)]
enum RoutesCmd {
    /// Every agent route.
    List,
    /// One agent's routes.
    Get {
        /// Agent id.
        agent: String,
    },
    /// Registered proxies and the strategy.
    Proxies,
    /// Set the cluster's tunnel strategy.
    SetStrategy {
        /// agent_mesh or proxy_peering.
        kind: String,
        /// agent_connection_count (proxy_peering).
        #[arg(long)]
        count: Option<u32>,
    },
}

#[derive(Subcommand)]
enum GrantsCmd {
    /// Every grant.
    List,
    /// Write a grant (replacing one of the same name).
    Add {
        /// Grant name.
        name: String,
        /// Client names or globs (`alice`, `ci-*`); repeat or comma-separate.
        #[arg(long, required = true)]
        clients: Vec<String>,
        /// Agent ids or globs.
        #[arg(long, required = true)]
        agents: Vec<String>,
        /// Service names or globs (`*`: any).
        #[arg(long, required = true)]
        services: Vec<String>,
    },
    /// Remove a grant. Open streams stay up unless --kill-streams.
    Revoke {
        /// Grant name.
        name: String,
        /// Also end the open streams that no remaining grant allows.
        #[arg(long)]
        kill_streams: bool,
    },
    /// Say which grant, if any, lets CLIENT reach AGENT/SERVICE.
    Check {
        /// Client name.
        client: String,
        /// AGENT/SERVICE.
        target: String,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create a cluster CA and certificates for proxy-a/b/c, agent-1/2 and client.
    Init {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// Cluster name (SPIFFE trust domain).
        #[arg(long)]
        cluster: String,
        /// Validity of the CA, days.
        #[arg(long, default_value_t = ringpeer::transport::certs::DEFAULT_CA_DAYS)]
        ca_days: u32,
        /// Validity of the other certificates, days.
        #[arg(long, default_value_t = ringpeer::transport::certs::DEFAULT_LEAF_DAYS)]
        days: u32,
    },
    /// Issue one more certificate from the CA in DIR (or a new one for a
    /// name, to rotate it: running processes reload it on their own).
    Issue {
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long)]
        dir: PathBuf,
        /// proxy, agent or client.
        #[arg(long)]
        role: String,
        /// Name (proxy id, agent id or client name).
        #[arg(long)]
        name: String,
        /// Validity, days.
        #[arg(long, default_value_t = ringpeer::transport::certs::DEFAULT_LEAF_DAYS)]
        days: u32,
    },
    /// Write a CRL, signed by the CA in DIR, revoking certificates by serial
    /// (as `init`/`issue` print them); point `[tls] crl` at it.
    Revoke {
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long)]
        dir: PathBuf,
        /// Serial numbers (hex), repeatable; every serial to revoke, since
        /// the file is written anew.
        #[arg(long = "serial")]
        serials: Vec<String>,
        /// CRL file to write (PEM).
        #[arg(long)]
        out: PathBuf,
        /// Validity of the CRL (next update), days.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
}

/// SIGINT and SIGTERM stop (a second exits at once); SIGHUP reloads the
/// certificates and the config.
fn agent_signals(reload: Reloads) -> anyhow::Result<Shutdown> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let sd = Shutdown::new();
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    let s = sd.clone();
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        for sig in signals.forever() {
            match sig {
                SIGHUP => reload.request(),
                _ if s.is_triggered() => std::process::exit(130),
                _ => s.trigger(),
            }
        }
    })?;
    Ok(sd)
}

/// What one SIGHUP asks for: the certificates (their own thread) and the
/// config file.
#[derive(Clone, Default)]
struct Reloads {
    tls: Trigger,
    config: Trigger,
}

impl Reloads {
    fn request(&self) {
        self.config.request();
        self.tls.request();
    }
}

fn shutdown_on_signals() -> anyhow::Result<Shutdown> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let sd = Shutdown::new();
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let s = sd.clone();
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        for (n, _) in signals.forever().enumerate() {
            if n > 0 {
                std::process::exit(130);
            }
            s.trigger();
        }
    })?;
    Ok(sd)
}

/// SIGTERM drains (the drain protocol), SIGINT stops; a second signal of
/// either kind cuts a drain short, a third exits at once. SIGHUP reloads
/// the certificates and the config.
fn proxy_signals(drain: ringpeer::proxy::drain::Drain, reload: Reloads) -> anyhow::Result<Shutdown> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let sd = Shutdown::new();
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    let s = sd.clone();
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let stops = signals.forever().filter(|sig| {
            if *sig == SIGHUP {
                reload.request();
            }
            *sig != SIGHUP
        });
        for (n, sig) in stops.enumerate() {
            match (n, sig) {
                (0, SIGTERM) => {
                    drain.request();
                }
                (0, _) | (1, _) => s.trigger(),
                _ => std::process::exit(130),
            }
        }
    })?;
    Ok(sd)
}

/// Prints a `--check` report: problems and warnings one a line on stderr.
fn report(path: &std::path::Path, r: ringpeer::config::check::Report) -> ExitCode {
    for w in &r.warnings {
        say!("{}: warning: {w}", path.display());
    }
    for p in &r.problems {
        say!("{}: {p}", path.display());
    }
    if r.ok() {
        say!("{}: OK: {}", path.display(), r.summary);
        ExitCode::SUCCESS
    } else {
        say!("{}: {} problem(s)", path.display(), r.problems.len());
        ExitCode::from(2)
    }
}

fn real_main(cli: Cli, logs: Logs) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Proxy { config, check: true, .. } => return Ok(report(&config, ringpeer::config::check::proxy(&config))),
        Cmd::Agent { config, check: true } => return Ok(report(&config, ringpeer::config::check::agent(&config))),
        Cmd::Proxy { config, action: Some(ProxyAction::Drain), .. } => {
            let cfg = ProxyConfig::load(&config)?;
            let Some(path) = cfg.upgrade_socket_path() else {
                anyhow::bail!("config {}: set upgrade_socket to reach the running proxy", config.display());
            };
            let answer = ringpeer::proxy::upgrade::request_leave(&path)?;
            say!("proxy {}: {answer}", cfg.id);
        }
        Cmd::Proxy { config, action: None, .. } => {
            let cfg = ProxyConfig::load(&config)?;
            logs.start_with(cfg.log_level.as_deref());
            ringpeer::proxy::preflight(&cfg)?;
            let (listeners, from) = ringpeer::proxy::upgrade::acquire(&cfg)?;
            let from = from.map(|b| format!(" (took over from build {b})")).unwrap_or_default();
            say!(
                "proxy {} listening: client {} tunnel {}{from}",
                cfg.id,
                listeners.client_addr(),
                listeners.tunnel_addr()
            );
            let drain = ringpeer::proxy::drain::Drain::new();
            let reload = Reloads::default();
            let opts = ringpeer::proxy::RunOpts {
                drain: Some(drain.clone()),
                took_over: !from.is_empty(),
                reload: Some(reload.tls.clone()),
                reconfig: Some(logs.reconfig(config, reload.config.clone())),
                ..Default::default()
            };
            ringpeer::proxy::run_with(cfg, listeners, proxy_signals(drain, reload)?, opts)?;
        }
        Cmd::Agent { config, check: false } => {
            let cfg = AgentConfig::load(&config)?;
            logs.start_with(cfg.log_level.as_deref());
            let reload = Reloads::default();
            let rc = logs.reconfig(config, reload.config.clone());
            ringpeer::agent::run_with(cfg, agent_signals(reload.clone())?, Some(reload.tls), Some(rc))?;
        }
        Cmd::Dial { target, client: ClientArgs { proxy, certs, name }, timeout_ms } => {
            let t = DialTarget::parse(&target).map_err(|s| anyhow::anyhow!("{target:?}: {}", s.message))?;
            let tls = ringpeer::client::client_tls(&certs, &name)?;
            let status = ringpeer::client::stdio::dial_stdio(proxy, t, tls, Duration::from_millis(timeout_ms))?;
            if !status.is_ok() {
                say!("dial {target}: {status}");
                return Ok(ExitCode::from(1));
            }
        }
        Cmd::Forward { listen, to, client: ClientArgs { proxy, certs, name } } => {
            let target = DialTarget::parse(&to).map_err(|s| anyhow::anyhow!("{to:?}: {}", s.message))?;
            let tls = ringpeer::client::client_tls(&certs, &name)?;
            let opts = ringpeer::client::ForwardOpts { listen, target, proxy, tls, deadline: Duration::from_secs(10) };
            ringpeer::client::forward(opts, shutdown_on_signals()?)?;
        }
        Cmd::Certs { cmd: CertsCmd::Init { dir, cluster, ca_days, days } } => {
            for i in ringpeer::transport::certs::init_with(&dir, &cluster, ca_days, days)? {
                println!("{}", i.summary());
            }
        }
        Cmd::Certs { cmd: CertsCmd::Issue { dir, role, name, days } } => {
            let role: Role = role.parse()?;
            let v = ringpeer::transport::certs::Validity::days(days);
            println!("{}", ringpeer::transport::certs::issue_with(&dir, role, &name, v)?.summary());
        }
        Cmd::Certs { cmd: CertsCmd::Revoke { dir, serials, out, days } } => {
            let n = ringpeer::transport::certs::revoke(&dir, &serials, &out, days)?;
            println!("{}: {n} certificate(s) revoked", out.display());
        }
        Cmd::Demo { serve } => {
            let sd = if serve { shutdown_on_signals()? } else { Shutdown::new() };
            ringpeer::tools::demo::run(serve, sd)?;
        }
        Cmd::Bench(opts) => ringpeer::tools::bench::run(opts)?,
        Cmd::Soak(opts) => {
            if !ringpeer::tools::soak::run(opts)? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Target { kind, listen } => {
            use ringpeer::tools::target::{spawn_at, Kind};
            let kind = match kind.as_str() {
                "echo" => Kind::Echo,
                "sink" => Kind::Sink,
                _ => anyhow::bail!("unknown target {kind:?}: use echo or sink"),
            };
            let addr = ringpeer::runtime::listeners::parse_addr(&listen, "--listen")?;
            let t = spawn_at(kind, addr)?;
            say!("{kind:?} target on {}", t.addr);
            shutdown_on_signals()?.wait_blocking();
        }
        Cmd::Routes { store: args, cmd } => {
            use ringpeer::tools::routes as cli;
            let (mut store, json) = (args.open()?, args.json);
            let out = match cmd {
                RoutesCmd::List => cli::list(store.as_mut(), json)?,
                RoutesCmd::Get { agent } => cli::get(store.as_mut(), &agent, json)?,
                RoutesCmd::Proxies => cli::proxies(store.as_mut(), json)?,
                RoutesCmd::SetStrategy { kind, count } => {
                    let s = cli::parse_strategy(&kind, count)?;
                    store.set_strategy(s)?;
                    format!("strategy set to {s}\n")
                }
            };
            print!("{out}");
        }
        Cmd::Grants { store: args, cmd } => {
            use ringpeer::tools::grants as cli;
            let (mut store, json) = (args.open()?, args.json);
            let out = match cmd {
                GrantsCmd::List => cli::list(store.as_mut(), json)?,
                GrantsCmd::Add { name, clients, agents, services } => {
                    cli::add(store.as_mut(), &name, &clients, &agents, &services)?
                }
                GrantsCmd::Revoke { name, kill_streams } => cli::revoke(store.as_mut(), &name, kill_streams)?,
                GrantsCmd::Check { client, target } => cli::check(store.as_mut(), &client, &target)?,
            };
            print!("{out}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The log filter, replaceable while running (a config reload).
///
/// Precedence at start: `RUST_LOG`, then `--log`, then the config's
/// `log_level`, then `info`. A reload applies a changed `log_level`
/// (removed: back to the start-up filter).
#[derive(Clone)]
struct Logs {
    handle: tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
    /// The filter from RUST_LOG or --log, when one was given.
    forced: Option<String>,
}

impl Logs {
    fn init(cli: &Cli) -> Logs {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let forced = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty()).or_else(|| cli.log.clone());
        let filter = tracing_subscriber::EnvFilter::try_new(forced.as_deref().unwrap_or("info"))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
        let reg = tracing_subscriber::registry().with(filter);
        let stderr = std::io::stderr;
        let _ = FORMAT.set(cli.log_format);
        match cli.log_format {
            LogFormat::Text => reg.with(tracing_subscriber::fmt::layer().with_writer(stderr).with_target(false)).init(),
            LogFormat::Json => reg.with(tracing_subscriber::fmt::layer().json().with_writer(stderr)).init(),
        }
        Logs { handle, forced }
    }

    fn set(&self, level: Option<&str>) -> Result<(), String> {
        let f = level.or(self.forced.as_deref()).unwrap_or("info");
        let filter = tracing_subscriber::EnvFilter::try_new(f).map_err(|e| format!("log filter {f:?}: {e}"))?;
        self.handle.reload(filter).map_err(|e| e.to_string())
    }

    /// The config's `log_level` at start, unless RUST_LOG or --log was given.
    fn start_with(&self, level: Option<&str>) {
        if self.forced.is_none() && level.is_some() {
            let _ = self.set(level);
        }
    }

    fn reconfig(&self, path: PathBuf, trigger: Trigger) -> ringpeer::config::live::Reconfig {
        let me = self.clone();
        let logs: ringpeer::config::live::LogControl = std::sync::Arc::new(move |l| me.set(l));
        ringpeer::config::live::Reconfig { path, trigger, logs: Some(logs) }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = Logs::init(&cli);
    ringpeer::runtime::raise_memlock();
    match real_main(cli, logs) {
        Ok(code) => code,
        Err(e) => {
            say!("{e:#}");
            ExitCode::from(2)
        }
    }
}
