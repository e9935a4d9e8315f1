//! CPU time and resident memory of a process, read from `/proc/<pid>` (Linux only).

use std::time::Duration;

/// Why a `/proc` reading failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("could not read {path}: {source}; the overhead benchmark needs Linux /proc")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has an unexpected format ({what}); is this Linux?")]
    Format { path: String, what: &'static str },
}

/// Clock ticks per second of `utime`/`stime` in `/proc/<pid>/stat`. Every Linux architecture we
/// run on uses 100 (`getconf CLK_TCK`); reading it would need libc.
const CLK_TCK: u64 = 100;

fn read(path: &str) -> Result<String, ProcError> {
    std::fs::read_to_string(path).map_err(|source| ProcError::Read {
        path: path.to_owned(),
        source,
    })
}

/// User + system CPU time of the whole process (all threads, including exited ones), at 10 ms
/// resolution.
pub fn cpu_time(pid: u32) -> Result<Duration, ProcError> {
    let path = format!("/proc/{pid}/stat");
    let text = read(&path)?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let Some(rest) = text.rfind(')').map(|i| &text[i + 1..]) else {
        return Err(ProcError::Format {
            path,
            what: "no ')' after the command name",
        });
    };
    // After ')' come field 3 (state) onwards; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let (Some(utime), Some(stime)) = (tick(11), tick(12)) else {
        return Err(ProcError::Format {
            path,
            what: "utime/stime missing",
        });
    };
    Ok(Duration::from_millis((utime + stime) * 1000 / CLK_TCK))
}

/// Resident memory now (`VmRSS`) and at its peak (`VmHWM`), in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub rss: u64,
    pub peak: u64,
}

pub fn memory(pid: u32) -> Result<Memory, ProcError> {
    let path = format!("/proc/{pid}/status");
    let text = read(&path)?;
    let kib = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|k| k * 1024)
    };
    match (kib("VmRSS:"), kib("VmHWM:")) {
        (Some(rss), Some(peak)) => Ok(Memory { rss, peak }),
        _ => Err(ProcError::Format {
            path,
            what: "VmRSS/VmHWM missing",
        }),
    }
}

/// The soft limit on open files of this process (children inherit it).
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Kernel TCP counters of this network namespace, from `/proc/net/netstat`: a soak that opens
/// connections faster than a server accepts them shows up here, and explains connects that the
/// kernel retried seconds later.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// Connections dropped because a listen (accept) queue was full.
    pub listen_overflows: u64,
    /// SYNs sent again because the first got no answer.
    pub syn_retransmits: u64,
}

impl TcpCounters {
    /// What happened between `earlier` and `self`.
    pub fn since(self, earlier: TcpCounters) -> TcpCounters {
        TcpCounters {
            listen_overflows: self
                .listen_overflows
                .saturating_sub(earlier.listen_overflows),
            syn_retransmits: self.syn_retransmits.saturating_sub(earlier.syn_retransmits),
        }
    }
}

/// Reads [`TcpCounters`]; `None` when `/proc/net/netstat` is missing or lacks them.
pub fn tcp_counters() -> Option<TcpCounters> {
    parse_netstat(&std::fs::read_to_string("/proc/net/netstat").ok()?)
}

/// `/proc/net/netstat` has pairs of lines per group: `TcpExt: Name…` then `TcpExt: value…`.
fn parse_netstat(text: &str) -> Option<TcpCounters> {
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let field = |name: &str| {
        let i = names.split_whitespace().position(|n| n == name)?;
        values.split_whitespace().nth(i)?.parse::<u64>().ok()
    };
    Some(TcpCounters {
        listen_overflows: field("ListenOverflows")?,
        syn_retransmits: field("TCPSynRetrans")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_cpu_and_memory() {
        let pid = std::process::id();
        let mem = memory(pid).unwrap();
        assert!(mem.rss > 0 && mem.peak >= mem.rss);
        let before = cpu_time(pid).unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(60) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        assert!(cpu_time(pid).unwrap() > before);
        assert!(open_files_limit().unwrap() > 0);
    }

    #[test]
    fn netstat_counters() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPSynRetrans\n\
                    TcpExt: 0 91573 2 17\n\
                    IpExt: InNoRoutes\nIpExt: 0\n";
        let now = parse_netstat(text).unwrap();
        assert_eq!(
            now,
            TcpCounters {
                listen_overflows: 91_573,
                syn_retransmits: 17
            }
        );
        let before = TcpCounters {
            listen_overflows: 91_000,
            syn_retransmits: 20,
        };
        assert_eq!(now.since(before).listen_overflows, 573);
        assert_eq!(now.since(before).syn_retransmits, 0);
        assert_eq!(parse_netstat("IpExt: A\nIpExt: 1\n"), None);
    }
}
