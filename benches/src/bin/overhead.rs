//! `overhead`: measures what the engine adds between a caller and the model, against the
//! simulator directly and against a do-nothing relay (the floor), in one run, in alternating
//! rounds. See `docs/PERFORMANCE.md` ("End-to-end overhead") for how to run and read it.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use benches::overhead::load::{self, Progress, SoakClient, Target, Transport};
use benches::overhead::report::{self, Level, SoakRow, TargetRun};
use benches::overhead::roles::{self, Role, RoleConfig, Running, SimTiming};
use benches::overhead::{
    ENGINE_BASE, ENGINE_KEY, ENGINE_REDIS, SIM_KEY, procfs, round_order, soak,
};
use clap::Parser;
use serde_json::{Value, json};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Engine-overhead benchmark: simulator direct vs a pass-through relay (floor) vs the engine.
#[derive(Debug, Parser)]
#[command(name = "overhead")]
struct Args {
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,32,1000")]
    levels: Vec<usize>,
    /// Rounds per level at concurrency 1 and 32 (each round runs every target once).
    #[arg(long, default_value_t = 8)]
    rounds: usize,
    /// Rounds at concurrency ≥ 100 (shorter: they are CPU-bound).
    #[arg(long, default_value_t = 3)]
    big_rounds: usize,
    /// Streams per round at concurrency 1.
    #[arg(long, default_value_t = 15)]
    streams_c1: usize,
    /// Streams per worker per round at concurrency > 1 and < 100.
    #[arg(long, default_value_t = 5)]
    per_worker: usize,
    /// Simulated time to first token, ms.
    #[arg(long = "sim-ttft-ms", default_value_t = 50)]
    sim_ttft_ms: u64,
    /// Simulated output speed (fixed chunk cadence).
    #[arg(long = "sim-tokens-per-sec", default_value_t = 500.0)]
    sim_tokens_per_sec: f64,
    /// Simulated answer length in tokens.
    #[arg(long = "sim-output-tokens", default_value_t = 64)]
    sim_output_tokens: u32,
    /// A gap between two content chunks longer than this counts as a stall.
    #[arg(long, default_value_t = 250)]
    stall_ms: u64,
    /// Measure an external OpenAI-compatible gateway (base URL with /v1) as the "engine" path
    /// instead of starting the engine; point its OpenAI base URL at `--sim-port`.
    #[arg(long)]
    upstream: Option<String>,
    /// Bearer key sent to `--upstream`.
    #[arg(long, default_value = ENGINE_KEY)]
    upstream_key: String,
    /// Soak instead: hold this many concurrent streams through the floor and the engine and
    /// report memory per stream and stalls. Over HTTP/1.1 a relay needs about 2×N+200 open
    /// files (`ulimit -n`), over h2c about N + N/100 + 200.
    #[arg(long)]
    soak: Option<usize>,
    /// Length of one soak stream, seconds (the simulator paces it); 20 unless both
    /// `--soak-tokens-per-sec` and `--soak-output-tokens` fix it.
    #[arg(long)]
    soak_secs: Option<u64>,
    /// Soak cadence: simulated tokens per second per stream (default: output tokens / secs).
    #[arg(long)]
    soak_tokens_per_sec: Option<f64>,
    /// Soak answer length in tokens (default: 100, or tokens per second × secs).
    #[arg(long)]
    soak_output_tokens: Option<u32>,
    /// How the soak's load client talks to the floor and the engine: 1 = HTTP/1.1, one
    /// connection per stream; 2 = h2c (HTTP/2 cleartext, prior knowledge), streams multiplexed.
    /// The relays' leg to the simulator stays HTTP/1.1.
    #[arg(long, default_value_t = 1)]
    soak_http: u8,
    /// With `--soak-http 2`: streams per connection (at most 200, hyper's server default
    /// `max_concurrent_streams`).
    #[arg(long, default_value_t = 100)]
    soak_streams_per_conn: usize,
    /// Soak streams opened per second (in batches every 10 ms). Opening faster than the
    /// simulator accepts overflows its listen queue and the kernel retries those connections
    /// seconds later.
    #[arg(long, default_value_t = 20_000)]
    soak_open_per_sec: usize,
    /// Also start a second engine that keeps its limits and budgets in this Redis
    /// (`redis://127.0.0.1:6379`), as `keyvex serve` does with `REDIS_URL`, and measure it as
    /// the target `engine-redis` in the same rounds: its added time over `engine` (in-process
    /// limits) is what the round trips to Redis cost. Not with `--soak`.
    #[arg(long)]
    redis_url: Option<String>,
    /// Start the engine children from this build of `overhead` instead of this binary, e.g. one
    /// built with `--features mimalloc`, so a build setting of the engine is measured against
    /// an unchanged floor and simulator.
    #[arg(long)]
    engine_exe: Option<PathBuf>,
    /// Also start an engine from this other build of `overhead` (the "before" of a change) and
    /// measure it as the target `engine-base` in the same rounds as `engine`, so a change's
    /// before and after share one run's conditions. Not with `--soak`.
    #[arg(long)]
    baseline_exe: Option<PathBuf>,
    /// Log filter of the engine child (`keyvex serve` logs at info).
    #[arg(long, default_value = "info")]
    engine_log: String,
    /// Export the engine child's traces over OTLP/HTTP to this base URL (what
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` would be), as `keyvex serve` does with that variable set.
    /// A URL nothing listens on (e.g. http://127.0.0.1:9) measures export against a dead
    /// collector. Off by default: no OpenTelemetry layer at all.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Where to write the JSON results.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Internal: run as one of the servers (the benchmark starts itself with this).
    #[arg(long, hide = true)]
    role: Option<Role>,
    /// Internal: the base URL a floor or engine child forwards to.
    #[arg(long, hide = true)]
    forward_to: Option<String>,
    /// Internal: the children's scratch directory.
    #[arg(long, hide = true)]
    work_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.role {
        Some(role) => roles::run(&RoleConfig {
            role,
            timing: timing(&args),
            upstream: args.forward_to.clone(),
            engine_log: args.engine_log.clone(),
            otlp_endpoint: args.otlp_endpoint.clone(),
            work_dir: args.work_dir.clone().unwrap_or_else(std::env::temp_dir),
            redis_url: args.redis_url.clone(),
            exe: None,
        }),
        None => bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("overhead: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn timing(args: &Args) -> SimTiming {
    SimTiming {
        ttft_ms: args.sim_ttft_ms,
        tokens_per_sec: args.sim_tokens_per_sec,
        output_tokens: args.sim_output_tokens,
    }
}

struct Servers {
    sim: Running,
    floor: Running,
    engine: Option<Running>,
    /// The engine with its limits in Redis (`--redis-url`, latency runs only).
    engine_redis: Option<Running>,
    /// The engine from the build compared with (`--baseline-exe`, latency runs only).
    engine_base: Option<Running>,
}

fn start_servers(
    args: &Args,
    timing: SimTiming,
    work_dir: &std::path::Path,
) -> anyhow::Result<Servers> {
    if args.upstream.is_some() && args.baseline_exe.is_some() {
        anyhow::bail!(
            "--baseline-exe compares two engine builds; it does not apply to --upstream (drop one of the two)"
        );
    }
    // Every child runs from a copy written now, the compared builds included (see
    // `roles::fresh_copy`).
    let own = roles::fresh_copy(None, work_dir, "overhead-bin")?;
    let engine_exe = match &args.engine_exe {
        Some(exe) => roles::fresh_copy(Some(exe), work_dir, "overhead-engine-bin")?,
        None => own.clone(),
    };
    let config = |role, forward_to: Option<String>| RoleConfig {
        role,
        timing,
        upstream: forward_to,
        engine_log: args.engine_log.clone(),
        otlp_endpoint: args.otlp_endpoint.clone(),
        work_dir: work_dir.to_path_buf(),
        redis_url: None,
        exe: Some(own.clone()),
    };
    let sim = roles::spawn(&config(Role::Sim, None))?;
    let floor = roles::spawn(&config(Role::Floor, Some(sim.base_url.clone())))?;
    let engine_config = RoleConfig {
        exe: Some(engine_exe),
        ..config(Role::Engine, Some(sim.base_url.clone()))
    };
    let engine = match args.upstream {
        Some(_) => None,
        None => Some(roles::spawn(&engine_config)?),
    };
    // A second or third engine gets its own directory: its own metrics file and log beside the
    // first engine's.
    let another_engine = |sub: &str, config: RoleConfig| -> anyhow::Result<Running> {
        let dir = work_dir.join(sub);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("could not create {}", dir.display()))?;
        roles::spawn(&RoleConfig {
            work_dir: dir,
            ..config
        })
    };
    let engine_redis = match (&args.upstream, &args.redis_url) {
        (None, Some(url)) => Some(another_engine(
            "redis",
            RoleConfig {
                redis_url: Some(url.clone()),
                ..engine_config.clone()
            },
        )?),
        _ => None,
    };
    // With `--upstream` it was refused above.
    let engine_base = match &args.baseline_exe {
        Some(exe) => Some(another_engine(
            "base",
            RoleConfig {
                exe: Some(roles::fresh_copy(Some(exe), work_dir, "overhead-base-bin")?),
                ..engine_config.clone()
            },
        )?),
        None => None,
    };
    eprintln!(
        "overhead: simulator {} (pid {}), floor {} (pid {}), engine {}",
        sim.base_url,
        sim.pid(),
        floor.base_url,
        floor.pid(),
        engine.as_ref().map_or_else(
            || format!("external {:?}", args.upstream),
            |e| format!("{} (pid {})", e.base_url, e.pid())
        ),
    );
    if let Some(e) = &engine_redis {
        eprintln!(
            "overhead: engine with limits in Redis {} (pid {})",
            e.base_url,
            e.pid()
        );
    }
    if let Some(e) = &engine_base {
        eprintln!("overhead: baseline engine {} (pid {})", e.base_url, e.pid());
    }
    Ok(Servers {
        sim,
        floor,
        engine,
        engine_redis,
        engine_base,
    })
}

fn target(name: &'static str, base: &str, key: &str) -> Target {
    Target {
        name,
        url: format!("{}/chat/completions", base.trim_end_matches('/')),
        bearer: key.to_owned(),
    }
}

fn work_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("keyvex-overhead-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("could not create {}", dir.display()))?;
    Ok(dir)
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned());
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, usize::from),
        "cpu_model": model,
        "loadavg": loadavg.split_whitespace().take(3).collect::<Vec<_>>(),
        "open_files_limit": procfs::open_files_limit(),
    })
}

fn out_path(args: &Args, name: &str) -> PathBuf {
    args.out.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/overhead")
            .join(name)
    })
}

fn write_json(path: &std::path::Path, value: &Value) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("could not write {}", path.display()))
}

fn bench(args: &Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the load client's runtime")?;
    let dir = work_dir()?;
    let result = if let Some(n) = args.soak {
        runtime.block_on(soak(args, n, &dir))
    } else {
        runtime.block_on(latency(args, &dir))
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// CPU time of a child, or `None` when it cannot be read (then no CPU figure is reported).
fn cpu(pid: Option<u32>) -> Option<Duration> {
    pid.and_then(|p| procfs::cpu_time(p).ok())
}

async fn latency(args: &Args, dir: &std::path::Path) -> anyhow::Result<()> {
    let servers = start_servers(args, timing(args), dir)?;
    let machine_before = machine();
    let engine_pid = servers.engine.as_ref().map(Running::pid);
    let engine_idle = engine_pid.and_then(|p| procfs::memory(p).ok());
    let engine_target = match &args.upstream {
        Some(url) => target("engine", url, &args.upstream_key),
        None => match &servers.engine {
            Some(e) => target("engine", &e.base_url, ENGINE_KEY),
            None => anyhow::bail!("no engine and no --upstream"),
        },
    };
    let mut targets = vec![
        (
            target("direct", &servers.sim.base_url, SIM_KEY),
            Some(servers.sim.pid()),
        ),
        (
            target("floor", &servers.floor.base_url, SIM_KEY),
            Some(servers.floor.pid()),
        ),
        (engine_target, engine_pid),
    ];
    if let Some(e) = &servers.engine_redis {
        targets.push((target(ENGINE_REDIS, &e.base_url, ENGINE_KEY), Some(e.pid())));
    }
    if let Some(e) = &servers.engine_base {
        targets.push((target(ENGINE_BASE, &e.base_url, ENGINE_KEY), Some(e.pid())));
    }
    let client = load::client().context("could not build the load client")?;
    let stall = Duration::from_millis(args.stall_ms);
    let sim_pid = Some(servers.sim.pid());
    let mut levels = Vec::new();
    for &c in &args.levels {
        let (rounds, per_worker) = match c {
            1 => (args.rounds, args.streams_c1),
            c if c >= 100 => (args.big_rounds, 1),
            _ => (args.rounds, args.per_worker),
        };
        eprintln!("overhead: concurrency {c}: warming up");
        // Warm-up: open the connections (client → target → simulator) so no round pays for them.
        for (t, _) in &targets {
            let (sample, _) = load::round(&client, t, c, 1, stall).await;
            if sample.failed > 0 {
                anyhow::bail!(
                    "warm-up against {} failed: {}",
                    t.name,
                    sample.first_error.unwrap_or_default()
                );
            }
        }
        let mut runs: Vec<TargetRun> = targets
            .iter()
            .map(|(t, _)| TargetRun::new(t.name))
            .collect();
        for r in 0..rounds {
            for i in round_order(r, targets.len()) {
                let (t, pid) = &targets[i];
                let (cpu0, sim0) = (cpu(*pid), cpu(sim_pid));
                let (sample, wall) = load::round(&client, t, c, per_worker, stall).await;
                let (cpu1, sim1) = (cpu(*pid), cpu(sim_pid));
                let run = &mut runs[i];
                run.round_ttft_p50_ms.push(report::q(&sample.ttft, 0.5));
                run.sample.merge(&sample);
                run.wall += wall;
                if let (Some(a), Some(b)) = (cpu0, cpu1) {
                    run.server_cpu = Some(run.server_cpu.unwrap_or_default() + b.saturating_sub(a));
                }
                if let (Some(a), Some(b)) = (sim0, sim1) {
                    run.sim_cpu = Some(run.sim_cpu.unwrap_or_default() + b.saturating_sub(a));
                }
            }
            eprintln!("overhead: concurrency {c}: round {}/{rounds} done", r + 1);
        }
        let level = Level {
            concurrency: c,
            rounds,
            per_worker,
            targets: runs,
        };
        eprint!("{}", report::level_table(&level));
        levels.push(level);
    }
    // Idle again: what the engine keeps after the load.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let engine_after = engine_pid.and_then(|p| procfs::memory(p).ok());
    let verdicts = report::verdicts(&levels);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let value = json!({
        "kind": "latency",
        "machine": machine_before,
        "machine_after": machine(),
        "sim": { "ttft_ms": args.sim_ttft_ms, "tokens_per_sec": args.sim_tokens_per_sec, "output_tokens": args.sim_output_tokens },
        "engine_external": args.upstream,
        "engine_log": args.engine_log,
        "engine_exe": args.engine_exe,
        "baseline_exe": args.baseline_exe,
        "otlp_endpoint": args.otlp_endpoint,
        "engine_rss_idle_mib": engine_idle.map(|m| mib(m.rss)),
        "engine_rss_after_load_mib": engine_after.map(|m| mib(m.rss)),
        "engine_rss_peak_mib": engine_after.map(|m| mib(m.peak)),
        "levels": levels.iter().map(report::level_json).collect::<Vec<_>>(),
        "verdicts": verdicts.iter().map(report::Verdict::json).collect::<Vec<_>>(),
    });
    let path = out_path(args, "latest.json");
    write_json(&path, &value)?;
    let mut out = std::io::stdout().lock();
    for level in &levels {
        writeln!(out, "{}", report::level_table(level))?;
    }
    if let (Some(idle), Some(after)) = (engine_idle, engine_after) {
        writeln!(
            out,
            "engine RSS: idle {:.1} MiB, after the load {:.1} MiB, peak {:.1} MiB",
            mib(idle.rss),
            mib(after.rss),
            mib(after.peak)
        )?;
    }
    writeln!(out, "{}", report::verdict_table(&verdicts))?;
    if let Some(table) = report::baseline_table(&levels) {
        writeln!(
            out,
            "this build against --baseline-exe, same rounds:\n{table}"
        )?;
    }
    writeln!(out, "results: {}", path.display())?;
    drop(servers);
    Ok(())
}

async fn soak(args: &Args, requested: usize, dir: &std::path::Path) -> anyhow::Result<()> {
    if args.redis_url.is_some() {
        anyhow::bail!(
            "--redis-url measures latency against in-process limits and does not apply to --soak; drop one of the two"
        );
    }
    if args.baseline_exe.is_some() {
        anyhow::bail!(
            "--baseline-exe measures latency in shared rounds and does not apply to --soak; soak each build with --engine-exe instead"
        );
    }
    let transport = soak::transport(args.soak_http, args.soak_streams_per_conn)?;
    let cadence = soak::Cadence::from_flags(
        args.soak_secs,
        args.soak_tokens_per_sec,
        args.soak_output_tokens,
    )?;
    let limit = procfs::open_files_limit().unwrap_or(1024);
    let n = soak::streams(requested, transport, limit);
    if n < requested {
        eprintln!(
            "overhead: open-files limit {limit} allows {n} streams over {}, not {requested} (a relay needs about {} descriptors for them); raise it with `ulimit -n` (see benches/overhead.sh) or use --soak-http 2",
            transport.name(),
            transport.relay_descriptors(requested) as u64 + load::DESCRIPTOR_RESERVE,
        );
    }
    let timing = SimTiming {
        ttft_ms: args.sim_ttft_ms,
        tokens_per_sec: cadence.tokens_per_sec,
        output_tokens: cadence.output_tokens,
    };
    let Servers {
        sim, floor, engine, ..
    } = start_servers(args, timing, dir)?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut results = serde_json::Map::new();
    let mut rows = Vec::new();
    let mut runs: Vec<(&'static str, Target, Running)> =
        vec![("floor", target("floor", &floor.base_url, SIM_KEY), floor)];
    if let Some(e) = engine {
        runs.push(("engine", target("engine", &e.base_url, ENGINE_KEY), e));
    }
    for (name, t, server) in runs {
        let pid = server.pid();
        // A fresh client per target: the previous target's idle connections would otherwise
        // hold this process's descriptors.
        let http1 = load::client().context("could not build the load client")?;
        // One stream first, over the soak's transport, so lazy start-up allocations do not
        // count as per-stream memory; it also measures how many tokens a chunk carries.
        let fresh = procfs::memory(pid)?;
        let warm_client = soak_client(transport, &http1, &t, 1).await?;
        let warm = load::soak(
            &warm_client,
            &t,
            1,
            args.soak_open_per_sec,
            Duration::from_secs(3600),
            Arc::new(Progress::default()),
        )
        .await;
        drop(warm_client);
        let warm_chunks = warm.gap.len() + warm.streams;
        if warm.failed > 0 || warm_chunks == 0 {
            anyhow::bail!(
                "the warm-up stream through {name} failed: {}",
                warm.first_error.unwrap_or_default()
            );
        }
        let tokens_per_chunk = f64::from(cadence.output_tokens) / warm_chunks as f64;
        let stall = cadence.stall_threshold(tokens_per_chunk);
        let nominal_rate = cadence.aggregate_chunks_per_sec(n, tokens_per_chunk);
        let idle = procfs::memory(pid)?;
        let progress = Arc::new(Progress::default());
        let tcp_before = procfs::tcp_counters();
        let client = soak_client(transport, &http1, &t, transport.connections(n)).await?;
        eprintln!(
            "overhead: soak {name}: opening {n} streams over {} ({} connections); a chunk every {:.2} s per stream, {:.0} chunks/s in all; stall > {:.1} s",
            transport.name(),
            transport.connections(n),
            cadence.chunk_cadence(tokens_per_chunk).as_secs_f64(),
            nominal_rate,
            stall.as_secs_f64(),
        );
        let task = tokio::spawn({
            let (client, t, progress) = (client.clone(), t.clone(), Arc::clone(&progress));
            let open_per_sec = args.soak_open_per_sec;
            async move { load::soak(&client, &t, n, open_per_sec, stall, progress).await }
        });
        let mut loaded = None;
        let mut max_rss = idle.rss;
        let opened_at = tokio::time::Instant::now();
        let mut all_flowing_after = None;
        // Content chunks counted from the moment all streams flow to the first one ending.
        let mut window: Option<(tokio::time::Instant, u64)> = None;
        let mut measured_rate = None;
        // Most streams with content and not ended at one reading, when not all were at once.
        let mut peak_open = 0u64;
        while !task.is_finished() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mem = procfs::memory(pid)?;
            max_rss = max_rss.max(mem.rss);
            let flowing = progress.flowing.load(Ordering::Relaxed);
            let ended = progress.ended.load(Ordering::Relaxed);
            let chunks = progress.chunks.load(Ordering::Relaxed);
            peak_open = peak_open.max(flowing.saturating_sub(ended));
            if loaded.is_none() && flowing as usize >= n && ended == 0 {
                loaded = Some(mem);
                all_flowing_after = Some(opened_at.elapsed());
                window = Some((tokio::time::Instant::now(), chunks));
                eprintln!(
                    "overhead: soak {name}: all {n} streams flowing, RSS {:.1} MiB",
                    mib(mem.rss)
                );
            }
            if ended > 0
                && measured_rate.is_none()
                && let Some((since, from)) = window
            {
                let secs = since.elapsed().as_secs_f64();
                measured_rate = (secs > 0.0).then(|| chunks.saturating_sub(from) as f64 / secs);
            }
        }
        let sample = task.await.context("the soak task failed")?;
        drop(client);
        let wall = opened_at.elapsed().as_secs_f64();
        let tcp = procfs::tcp_counters()
            .zip(tcp_before)
            .map(|(after, before)| after.since(before));
        let chunks = progress.chunks.load(Ordering::Relaxed);
        let loaded_rss = loaded.map_or(max_rss, |m| m.rss);
        let per_stream = loaded_rss.saturating_sub(idle.rss) as f64 / n.max(1) as f64;
        let row = SoakRow {
            target: name,
            transport: transport.name(),
            streams: n,
            connections: transport.connections(n),
            completed: sample.streams,
            failed: sample.failed,
            stalls: sample.stalls,
            stall_ms: stall.as_millis() as u64,
            max_gap_ms: sample.max_gap.as_secs_f64() * 1e3,
            rss_fresh_mib: mib(fresh.rss),
            rss_idle_mib: mib(idle.rss),
            rss_all_open_mib: mib(loaded_rss),
            rss_per_stream_kib: per_stream / 1024.0,
            rss_max_mib: mib(max_rss),
            all_flowing_after_s: all_flowing_after.map(|d| d.as_secs_f64()),
            peak_open,
            chunks_per_sec_nominal: nominal_rate,
            chunks_per_sec_measured: measured_rate,
            chunks_per_sec_average: chunks as f64 / wall,
        };
        results.insert(
            name.to_owned(),
            json!({
                "transport": row.transport,
                "streams": n,
                "connections": row.connections,
                "completed": sample.streams,
                "failed": sample.failed,
                "first_error": sample.first_error,
                "warm_up_failed": warm.failed,
                "stalls": sample.stalls,
                "stall_threshold_ms": row.stall_ms,
                "max_gap_ms": row.max_gap_ms,
                "all_flowing_after_s": row.all_flowing_after_s,
                "peak_open_streams": peak_open,
                "open_per_sec": args.soak_open_per_sec,
                "tcp_listen_overflows": tcp.map(|t| t.listen_overflows),
                "tcp_syn_retransmits": tcp.map(|t| t.syn_retransmits),
                "rss_fresh_mib": row.rss_fresh_mib,
                "rss_idle_mib": row.rss_idle_mib,
                "rss_all_open_mib": row.rss_all_open_mib,
                "rss_max_mib": row.rss_max_mib,
                "rss_per_stream_kib": row.rss_per_stream_kib,
                "ttft_p50_ms": report::q(&sample.ttft, 0.5),
                "ttft_p99_ms": report::q(&sample.ttft, 0.99),
                "ttft_max_ms": report::q(&sample.ttft, 1.0),
                "chunk_gap_p50_ms": report::q(&sample.gap, 0.5),
                "chunk_gap_p99_ms": report::q(&sample.gap, 0.99),
                "tokens_per_chunk": tokens_per_chunk,
                "content_chunks": chunks,
                "chunks_per_sec_nominal": nominal_rate,
                "chunks_per_sec_all_flowing": measured_rate,
                "chunks_per_sec_average": row.chunks_per_sec_average,
                "soak_wall_s": wall,
            }),
        );
        if let Some(e) = &sample.first_error {
            eprintln!("overhead: soak {name}: first error: {e}");
        }
        if let Some(t) = tcp.filter(|t| t.listen_overflows > 0 || t.syn_retransmits > 0) {
            eprintln!(
                "overhead: soak {name}: {} connections overflowed a listen queue, {} SYNs were retransmitted (the kernel retries them after 1, 3, 7, 15 s…); lower --soak-open-per-sec",
                t.listen_overflows, t.syn_retransmits
            );
        }
        rows.push((row, sample.first_error));
        // Stop this relay now: its pool keeps one idle keep-alive connection to the simulator
        // per stream, and with the next relay's the simulator would need 2N descriptors and run
        // out at N = 10,000 (the next relay's streams then wait in its accept queue until the
        // engine's time-to-first-token deadline).
        drop(http1);
        server.stop();
    }
    let value = json!({
        "kind": "soak",
        "machine": machine(),
        "requested_streams": requested,
        "streams": n,
        "transport": transport.name(),
        "streams_per_connection": match transport {
            Transport::Http1 => 1,
            Transport::H2c { streams_per_conn } => streams_per_conn,
        },
        "stream_secs": cadence.stream_secs,
        "sim": { "ttft_ms": args.sim_ttft_ms, "tokens_per_sec": cadence.tokens_per_sec, "output_tokens": cadence.output_tokens },
        "engine_log": args.engine_log,
        "engine_exe": args.engine_exe,
        "otlp_endpoint": args.otlp_endpoint,
        "results": results,
    });
    let path = out_path(args, "soak.json");
    write_json(&path, &value)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "soak: {n} streams over {}, {:.1} tokens/s × {} tokens per stream ({:.0} s), TTFT {} ms",
        transport.name(),
        cadence.tokens_per_sec,
        cadence.output_tokens,
        cadence.stream_secs,
        args.sim_ttft_ms,
    )?;
    let (table_rows, errors): (Vec<_>, Vec<_>) = rows.into_iter().unzip();
    writeln!(out, "{}", report::soak_table(&table_rows))?;
    for (row, error) in table_rows.iter().zip(errors) {
        if let Some(e) = error {
            writeln!(out, "  {} first error: {e}", row.target)?;
        }
    }
    writeln!(out, "results: {}", path.display())?;
    drop(sim);
    Ok(())
}

/// A soak client over `transport` with room for `streams` streams (h2c opens its connections
/// now; HTTP/1.1 connects per stream through the pool).
async fn soak_client(
    transport: Transport,
    http1: &reqwest::Client,
    target: &Target,
    connections: usize,
) -> anyhow::Result<SoakClient> {
    Ok(match transport {
        Transport::Http1 => SoakClient::Http1(http1.clone()),
        Transport::H2c { .. } => SoakClient::H2c(
            load::H2Pool::connect(target, connections)
                .await
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("could not open h2c connections to {}", target.name))?,
        ),
    })
}
