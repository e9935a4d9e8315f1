//! The Anthropic event decoder (framing, then the adapter) on any bytes, whole and in pieces.
//!
//! Input: 4 header bytes, then the body. Header: the largest piece (1..=64 bytes), the cap
//! (0..128: the default 1 MiB, else a small one), flags (bit 0: the request forced a schema
//! tool) and one byte of the seed that picks the cuts.
#![no_main]

use keyvex_engine::fuzz_support::{anthropic_events, check_sequence, split};
use keyvex_engine::provider::DEFAULT_MAX_EVENT_BYTES;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((header, body)) = data.split_first_chunk::<4>() else {
        return;
    };
    let max_piece = usize::from(header[0] % 64) + 1;
    let cap = match header[1] {
        0..128 => DEFAULT_MAX_EVENT_BYTES,
        small => usize::from(small - 127) * 2,
    };
    let forced_tool = header[2] & 1 == 1;
    let seed = u64::from(header[3]);
    let pieces = split(body, seed, max_piece);

    let events = anthropic_events(&[body], cap, forced_tool);
    if let Err(breach) = check_sequence(&events) {
        panic!("{breach}: {events:?}");
    }
    assert_eq!(
        format!("{:?}", anthropic_events(&pieces, cap, forced_tool)),
        format!("{events:?}")
    );
});
