//! The end-to-end overhead benchmark behind `cargo run --release -p benches --bin overhead`:
//! the same streaming workload against the simulator directly, a do-nothing relay (the floor of
//! one extra hop) and the engine, in alternating rounds, so what the engine adds is measured
//! against the floor in the same run.
//!
//! Every server runs as a child process of the benchmark binary ([`roles`]), so the CPU time and
//! memory of each can be read from `/proc/<pid>` ([`procfs`]) without the load client's share.
//! [`load`] drives streams and times them; [`report`] turns the histograms into a table and JSON;
//! [`soak`] plans the many-streams soak.

pub mod load;
pub mod procfs;
pub mod report;
pub mod roles;
pub mod soak;

/// The catalog OpenAI model every stream asks for.
pub const MODEL: &str = "gpt-5.4-mini";
/// The provider key the simulator is called with (it checks presence, not value).
pub const SIM_KEY: &str = "sk-overhead-bench";
/// The engine's API key for the load client.
pub const ENGINE_KEY: &str = "kvx-overhead-bench";
/// The target name of the second engine child that `--redis-url` starts: the same engine with
/// its limits and budgets in that Redis, measured in the same run as the in-process one.
pub const ENGINE_REDIS: &str = "engine-redis";
/// The target name of the engine child that `--baseline-exe` starts from another build: the
/// "before" of a change, measured in the same rounds as the "after" (`engine`).
pub const ENGINE_BASE: &str = "engine-base";

/// The order in which round `round` measures `n` targets: a Williams design, so that over `n`
/// rounds (`2n` when `n` is odd) every target runs in every position once and right after every
/// other target equally often. A plain rotation kept the order cyclic, so each target always
/// followed the same one (the engine the floor, `engine-base` the engine), and whatever one
/// round leaves behind (connections closing, a ledger flush) always fell on the same neighbour.
pub fn round_order(round: usize, n: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    // 0, 1, n-1, 2, n-2, …: consecutive pairs differ by every offset once.
    let (mut lo, mut hi) = (1, n - 1);
    let mut first = vec![0];
    while first.len() < n {
        first.push(lo);
        lo += 1;
        if first.len() < n {
            first.push(hi);
            hi -= 1;
        }
    }
    let mut order: Vec<usize> = first.iter().map(|&i| (i + round) % n).collect();
    // With an odd count one square balances positions only; its mirror balances what follows what.
    if n % 2 == 1 && (round / n) % 2 == 1 {
        order.reverse();
    }
    order
}

#[cfg(test)]
mod tests {
    use super::round_order;

    /// Over one full design every target takes every position once and follows every other
    /// target equally often (never always the same one).
    #[test]
    fn every_target_follows_every_other_equally_often() {
        for n in 1..=6 {
            let rounds = if n % 2 == 1 { 2 * n } else { n };
            let mut position = vec![vec![0; n]; n];
            let mut follows = vec![vec![0; n]; n];
            for r in 0..rounds {
                let order = round_order(r, n);
                let mut sorted = order.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "round {r} of {n}");
                for (p, &t) in order.iter().enumerate() {
                    position[t][p] += 1;
                }
                for pair in order.windows(2) {
                    follows[pair[1]][pair[0]] += 1;
                }
            }
            let per_position = rounds / n;
            assert!(
                position.iter().flatten().all(|&k| k == per_position),
                "n={n}: {position:?}"
            );
            let per_pair = if n % 2 == 1 { 2 } else { 1 };
            for (t, row) in follows.iter().enumerate() {
                for (before, &k) in row.iter().enumerate() {
                    let want = if t == before { 0 } else { per_pair };
                    assert_eq!(k, want, "n={n}: {t} after {before}");
                }
            }
        }
    }
}
