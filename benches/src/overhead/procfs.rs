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
}
