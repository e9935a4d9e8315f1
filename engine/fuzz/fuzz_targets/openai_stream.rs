//! The SSE framer and the OpenAI chunk decoder on any bytes, delivered whole and in pieces.
//!
//! Input: 4 header bytes, then the body. Header: the largest piece (1..=64 bytes), the cap
//! (0..128: the default 1 MiB, else a small cap so the limit path runs), and 2 bytes of the
//! seed that picks the cuts.
#![no_main]

use keyvex_engine::fuzz_support::{check_sequence, frame, openai_events, split};
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
    let seed = u64::from(u16::from_le_bytes([header[2], header[3]]));
    let pieces = split(body, seed, max_piece);

    // Framing: never more than the cap held, and the same events and error however cut.
    let whole = frame(&[body], cap);
    let cut = frame(&pieces, cap);
    for framed in [&whole, &cut] {
        assert!(
            framed.max_line <= cap,
            "held a line of {} > {cap}",
            framed.max_line
        );
        assert!(
            framed.max_data <= cap,
            "held data of {} > {cap}",
            framed.max_data
        );
        assert!(framed.events.iter().all(|(_, data)| data.len() <= cap));
    }
    assert_eq!(cut.events, whole.events);
    assert_eq!(cut.error, whole.error);

    // Decoding: one terminal event, last, and the same events however cut.
    let events = openai_events(&[body], cap);
    if let Err(breach) = check_sequence(&events) {
        panic!("{breach}: {events:?}");
    }
    assert_eq!(
        format!("{:?}", openai_events(&pieces, cap)),
        format!("{events:?}")
    );
});
