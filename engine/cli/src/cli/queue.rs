//! `keyvex queue …`: create the AI-processing queues, submit a job, show a job's state.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use keyvex::{AppError, Config, ProcessEnv};
use keyvex_server::queue::{self, JobRequest, JobsCtx, Priority, admin};

#[derive(Debug, clap::Args)]
pub struct QueueArgs {
    #[command(subcommand)]
    command: QueueCommand,
}

#[derive(Debug, clap::Subcommand)]
enum QueueCommand {
    /// Create the queue and its dead-letter queue (visibility 300 s, retention 14 days, DLQ after
    /// 3 receives); idempotent. Prints the queue URL for SQS_AI_PROCESSING_QUEUE_URL.
    Create {
        #[arg(long, default_value = admin::DEFAULT_QUEUE)]
        name: String,
        #[arg(long, default_value = admin::DEFAULT_DLQ)]
        dlq_name: String,
    },
    /// Submit a job (an agent process key, or `pipeline`) and print its id.
    Enqueue {
        /// magicSpark, logicArchitect, contentCrafter, styleMaster (or a slug), or pipeline.
        target: String,
        /// The input as inline JSON.
        #[arg(long)]
        json: String,
        #[arg(long, default_value = "cli")]
        user: String,
        #[arg(long, value_parser = parse_priority, default_value = "normal")]
        priority: Priority,
        #[arg(long)]
        session: Option<String>,
    },
    /// Print a job's state as JSON.
    Status { job_id: String },
}

fn parse_priority(s: &str) -> Result<Priority, String> {
    Priority::parse(s).ok_or_else(|| format!("{s:?}: expected high, normal or low"))
}

/// The queue and its job store, as the configuration names them.
async fn jobs_ctx(config: &Config) -> anyhow::Result<JobsCtx> {
    let queue = config.queue.as_ref().ok_or(AppError::NoQueue)?;
    let jobs = config
        .store
        .open_jobs()
        .await
        .context("opening the job store")?;
    Ok(JobsCtx::connect(queue, jobs).await)
}

pub async fn run(args: QueueArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&ProcessEnv, None).context("reading configuration")?;
    let mut stdout = std::io::stdout();
    match args.command {
        QueueCommand::Create { name, dlq_name } => {
            let client = queue::client(config.sqs_endpoint.as_deref(), &config.sqs_timeouts).await;
            let urls = admin::create_queues(&client, &name, &dlq_name)
                .await
                .context("creating the queues")?;
            eprintln!("keyvex: dead-letter queue {}", urls.dlq_url);
            writeln!(stdout, "{}", urls.queue_url)?;
        }
        QueueCommand::Enqueue {
            target,
            json,
            user,
            priority,
            session,
        } => {
            let ctx = jobs_ctx(&config).await?;
            let input = serde_json::from_str(&json).context("--json is not valid JSON")?;
            let accepted = queue::enqueue(
                &ctx,
                &user,
                JobRequest {
                    target,
                    input,
                    priority,
                    session_id: session,
                },
            )
            .await?;
            writeln!(stdout, "{}", accepted.job_id)?;
        }
        QueueCommand::Status { job_id } => {
            let ctx = jobs_ctx(&config).await?;
            let Some(view) = queue::job_status(&ctx, &job_id).await? else {
                eprintln!("keyvex: no job {job_id}");
                return Ok(ExitCode::FAILURE);
            };
            writeln!(stdout, "{}", serde_json::to_string_pretty(&view)?)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
