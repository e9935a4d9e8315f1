//! The soak's plan: how many streams a run can hold under the open-files limit, the simulator's
//! cadence for them, and what counts as a stall at that cadence.

use std::time::Duration;

use super::load::Transport;

/// Stream length when neither `--soak-secs` nor both cadence flags say otherwise.
pub const DEFAULT_SECS: u64 = 20;
/// Answer length when only the stream length is given (what the soak always used).
pub const DEFAULT_OUTPUT_TOKENS: u32 = 100;
/// hyper's server default for `SETTINGS_MAX_CONCURRENT_STREAMS`: more streams per connection
/// would queue in the client behind the server's limit instead of running.
pub const MAX_STREAMS_PER_CONN: usize = 200;
/// A content gap longer than this many chunk cadences is a stall. The simulator groups one to
/// three words per chunk and varies each stream's rate by ±20 %, so a stream's natural gaps
/// reach about three mean cadences.
pub const STALL_CADENCES: f64 = 5.0;
/// Stalls are never shorter than this, so fast cadences do not count scheduler jitter.
pub const MIN_STALL: Duration = Duration::from_secs(1);

/// Why the soak's flags cannot be run.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SoakArgError {
    #[error(
        "--soak-secs, --soak-tokens-per-sec and --soak-output-tokens were all given; give at most two (the third follows: secs = output tokens / tokens per second)"
    )]
    Overdetermined,
    #[error("--soak-tokens-per-sec must be a positive number, not {0}")]
    TokensPerSec(f64),
    #[error("--soak-output-tokens must be at least 1")]
    OutputTokens,
    #[error("--soak-secs must be at least 1")]
    Secs,
    #[error(
        "--soak-streams-per-conn must be 1 to {MAX_STREAMS_PER_CONN} (the server's max_concurrent_streams), not {0}"
    )]
    StreamsPerConn(usize),
    #[error("--soak-http must be 1 (HTTP/1.1) or 2 (h2c), not {0}")]
    Http(u8),
}

/// What the simulator is told for every soak stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cadence {
    pub tokens_per_sec: f64,
    pub output_tokens: u32,
    /// Nominal length of a stream's content, output tokens / tokens per second.
    pub stream_secs: f64,
}

impl Cadence {
    /// Any two of stream length, rate and answer length fix the third; with fewer, the stream
    /// length defaults to 20 s and the answer to 100 tokens, which is the soak's old cadence.
    pub fn from_flags(
        secs: Option<u64>,
        tokens_per_sec: Option<f64>,
        output_tokens: Option<u32>,
    ) -> Result<Cadence, SoakArgError> {
        if let Some(tps) = tokens_per_sec
            && !(tps.is_finite() && tps > 0.0)
        {
            return Err(SoakArgError::TokensPerSec(tps));
        }
        if output_tokens == Some(0) {
            return Err(SoakArgError::OutputTokens);
        }
        if secs == Some(0) {
            return Err(SoakArgError::Secs);
        }
        let (tps, output) = match (secs, tokens_per_sec, output_tokens) {
            (Some(_), Some(_), Some(_)) => return Err(SoakArgError::Overdetermined),
            (_, Some(tps), Some(output)) => (tps, output),
            (secs, Some(tps), None) => {
                let secs = secs.unwrap_or(DEFAULT_SECS) as f64;
                // Saturates at u32::MAX for absurd rates; at least one token.
                (tps, ((tps * secs).ceil() as u32).max(1))
            }
            (secs, None, output) => {
                let output = output.unwrap_or(DEFAULT_OUTPUT_TOKENS);
                let secs = secs.unwrap_or(DEFAULT_SECS) as f64;
                (f64::from(output) / secs, output)
            }
        };
        Ok(Cadence {
            tokens_per_sec: tps,
            output_tokens: output,
            stream_secs: f64::from(output) / tps,
        })
    }

    /// Mean time between two content chunks of a stream, given how many tokens a chunk carries
    /// (measured on the warm-up stream).
    pub fn chunk_cadence(&self, tokens_per_chunk: f64) -> Duration {
        Duration::from_secs_f64(tokens_per_chunk.max(0.0) / self.tokens_per_sec)
    }

    /// A gap over [`STALL_CADENCES`] chunk cadences, and at least [`MIN_STALL`], is a stall.
    pub fn stall_threshold(&self, tokens_per_chunk: f64) -> Duration {
        self.chunk_cadence(tokens_per_chunk)
            .mul_f64(STALL_CADENCES)
            .max(MIN_STALL)
    }

    /// Content chunks per second over all `streams` while they are all flowing.
    pub fn aggregate_chunks_per_sec(&self, streams: usize, tokens_per_chunk: f64) -> f64 {
        if tokens_per_chunk > 0.0 {
            streams as f64 * self.tokens_per_sec / tokens_per_chunk
        } else {
            f64::NAN
        }
    }
}

/// The load client's transport from `--soak-http` and `--soak-streams-per-conn`.
pub fn transport(http: u8, streams_per_conn: usize) -> Result<Transport, SoakArgError> {
    match http {
        1 => Ok(Transport::Http1),
        2 if (1..=MAX_STREAMS_PER_CONN).contains(&streams_per_conn) => {
            Ok(Transport::H2c { streams_per_conn })
        }
        2 => Err(SoakArgError::StreamsPerConn(streams_per_conn)),
        other => Err(SoakArgError::Http(other)),
    }
}

/// The streams a soak runs: the request, capped to what the open-files limit allows the relay
/// with this transport.
pub fn streams(requested: usize, transport: Transport, open_files_limit: u64) -> usize {
    requested.min(transport.max_streams(open_files_limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_cadence_flags_keep_the_old_soak() {
        let c = Cadence::from_flags(None, None, None).unwrap();
        assert_eq!(c.output_tokens, 100);
        assert!((c.tokens_per_sec - 5.0).abs() < 1e-9);
        assert!((c.stream_secs - 20.0).abs() < 1e-9);
        let c = Cadence::from_flags(Some(40), None, None).unwrap();
        assert!((c.tokens_per_sec - 2.5).abs() < 1e-9);
    }

    #[test]
    fn two_flags_fix_the_third() {
        let c = Cadence::from_flags(None, Some(1.0), None).unwrap();
        assert_eq!(c.output_tokens, 20);
        let c = Cadence::from_flags(Some(30), Some(0.5), None).unwrap();
        assert_eq!(c.output_tokens, 15);
        let c = Cadence::from_flags(None, Some(2.0), Some(50)).unwrap();
        assert!((c.stream_secs - 25.0).abs() < 1e-9);
        let c = Cadence::from_flags(Some(10), None, Some(30)).unwrap();
        assert!((c.tokens_per_sec - 3.0).abs() < 1e-9);
        // A rate so slow that the stream would carry no token still sends one.
        let c = Cadence::from_flags(Some(1), Some(0.01), None).unwrap();
        assert_eq!(c.output_tokens, 1);
    }

    #[test]
    fn bad_cadence_flags_are_refused() {
        assert_eq!(
            Cadence::from_flags(Some(10), Some(1.0), Some(10)),
            Err(SoakArgError::Overdetermined)
        );
        assert!(matches!(
            Cadence::from_flags(None, Some(0.0), None),
            Err(SoakArgError::TokensPerSec(_))
        ));
        assert!(matches!(
            Cadence::from_flags(None, Some(f64::NAN), None),
            Err(SoakArgError::TokensPerSec(_))
        ));
        assert_eq!(
            Cadence::from_flags(None, None, Some(0)),
            Err(SoakArgError::OutputTokens)
        );
        assert_eq!(
            Cadence::from_flags(Some(0), None, None),
            Err(SoakArgError::Secs)
        );
    }

    #[test]
    fn stall_threshold_follows_the_cadence_with_a_floor() {
        let slow = Cadence::from_flags(None, Some(1.0), None).unwrap();
        // Two tokens per chunk at 1 token/s: a chunk every 2 s, a stall after 10 s.
        assert_eq!(slow.chunk_cadence(2.0), Duration::from_secs(2));
        assert_eq!(slow.stall_threshold(2.0), Duration::from_secs(10));
        let fast = Cadence::from_flags(None, Some(500.0), None).unwrap();
        assert_eq!(fast.stall_threshold(2.0), MIN_STALL);
        assert!((slow.aggregate_chunks_per_sec(10_000, 2.0) - 5_000.0).abs() < 1e-6);
        assert!(slow.aggregate_chunks_per_sec(10, 0.0).is_nan());
    }

    #[test]
    fn transport_flags() {
        assert_eq!(transport(1, 100), Ok(Transport::Http1));
        assert_eq!(
            transport(2, 100),
            Ok(Transport::H2c {
                streams_per_conn: 100
            })
        );
        assert_eq!(transport(2, 0), Err(SoakArgError::StreamsPerConn(0)));
        assert_eq!(transport(2, 201), Err(SoakArgError::StreamsPerConn(201)));
        assert_eq!(transport(3, 100), Err(SoakArgError::Http(3)));
    }

    #[test]
    fn descriptor_arithmetic() {
        let h2 = Transport::H2c {
            streams_per_conn: 100,
        };
        // The sandbox's hard limit: HTTP/1.1 stops short of 10,000, h2c does not.
        assert_eq!(streams(10_000, Transport::Http1, 20_000), 9_900);
        assert_eq!(streams(10_000, h2, 20_000), 10_000);
        assert_eq!(h2.connections(10_000), 100);
        assert_eq!(h2.connections(10_001), 101);
        assert_eq!(h2.relay_descriptors(10_000), 10_100);
        assert_eq!(Transport::Http1.relay_descriptors(2_000), 4_000);
        // The cap is the largest n whose descriptors fit the budget.
        for limit in [1_024u64, 4_096, 20_000, 65_536] {
            for t in [
                Transport::Http1,
                h2,
                Transport::H2c {
                    streams_per_conn: 1,
                },
            ] {
                let n = t.max_streams(limit);
                let budget = (limit - 200) as usize;
                assert!(t.relay_descriptors(n) <= budget, "{t:?} {limit}");
                assert!(t.relay_descriptors(n + 1) > budget, "{t:?} {limit}");
            }
        }
        assert_eq!(Transport::Http1.max_streams(100), 0);
    }
}
