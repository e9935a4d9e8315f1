//! The log filter (`RUST_LOG`), as cheap as its directives allow.
//!
//! `EnvFilter` understands span and field directives (`keyvex_engine[route{process=chat}]=debug`)
//! and pays for that on every span, whatever the directives are: each span created, entered,
//! exited, recorded or closed takes a read lock shared by all worker threads and a table lookup.
//! A streaming request polls three nested spans per relayed chunk, so that is a dozen lock
//! round trips per chunk. Directives that only name targets and levels (`info`,
//! `warn,keyvex_engine=debug`: what is set in practice) are kept as a `Targets` filter instead,
//! which decides once per call site and does nothing per span. Anything else stays an
//! `EnvFilter`, meaning what it meant before.

use tracing_subscriber::filter::{EnvFilter, Targets};

/// A log filter parsed from `RUST_LOG`-style directives.
#[derive(Debug)]
pub enum LogFilter {
    /// Targets and levels only.
    Targets(Box<Targets>),
    /// Span or field directives, or directives `Targets` does not read (`EnvFilter` warns
    /// about the ones it cannot read either, and skips them).
    Env(Box<EnvFilter>),
}

impl LogFilter {
    /// Parses `directives` as `RUST_LOG`; an error says which directive could not be read.
    pub fn parse(directives: &str) -> Result<LogFilter, String> {
        // Blank means `EnvFilter`'s default (errors only); `Targets` would read it as "off".
        let per_span = directives.contains(['[', '{']) || directives.trim().is_empty();
        if !per_span && let Ok(targets) = directives.parse::<Targets>() {
            return Ok(LogFilter::Targets(Box::new(targets)));
        }
        EnvFilter::try_new(directives)
            .map(|filter| LogFilter::Env(Box::new(filter)))
            .map_err(|e| format!("`{directives}`: {e}"))
    }

    /// Parses `directives`, skipping what cannot be read (with a warning on stderr).
    pub fn lossy(directives: &str) -> LogFilter {
        LogFilter::parse(directives)
            .unwrap_or_else(|_| LogFilter::Env(Box::new(EnvFilter::new(directives))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::level_filters::LevelFilter;

    #[test]
    fn targets_and_levels_skip_the_per_span_filter_and_span_directives_keep_it() {
        for plain in ["info", "warn,keyvex_engine=debug", "keyvex=trace", "off"] {
            assert!(
                matches!(LogFilter::parse(plain), Ok(LogFilter::Targets(_))),
                "{plain}"
            );
        }
        let Ok(LogFilter::Targets(t)) = LogFilter::parse("warn,keyvex_engine=debug") else {
            unreachable!()
        };
        assert_eq!(t.default_level(), Some(LevelFilter::WARN));
        assert!(t.would_enable("keyvex_engine::router", &tracing::Level::DEBUG));
        assert!(!t.would_enable("keyvex_server", &tracing::Level::INFO));
        for per_span in [
            "keyvex_engine[route]=debug",
            "info,[attempt{model=gpt-5.4}]=trace",
            "",
        ] {
            assert!(
                matches!(LogFilter::parse(per_span), Ok(LogFilter::Env(_))),
                "{per_span}"
            );
        }
        let error = LogFilter::parse("info,keyvex=loud")
            .err()
            .unwrap_or_default();
        assert!(error.contains("loud"), "{error}");
    }
}
