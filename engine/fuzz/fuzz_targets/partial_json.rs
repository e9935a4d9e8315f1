//! PartialJson on any text pushed in any deltas.
//!
//! Input: 2 header bytes (the largest delta in bytes, 1..=64, and the seed that picks the cuts),
//! then the text; cuts fall on character boundaries, as model deltas do.
#![no_main]

use agents::PartialJson;
use keyvex_engine::fuzz_support::split;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((header, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let max_piece = usize::from(header[0] % 64) + 1;

    let mut whole = PartialJson::new();
    whole.push(text);

    let mut pieces = PartialJson::new();
    // `cut` is where the byte split put this piece's end; `at` is where the last delta ended after
    // rounding up to a character boundary. Rounding from `cut` (at most the text's length, which is
    // a boundary) ends; rounding from `at + piece.len()` could run past the end and never stop.
    let mut at = 0;
    let mut cut = 0;
    for piece in split(text.as_bytes(), u64::from(header[1]), max_piece) {
        cut += piece.len();
        let mut end = cut.min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        if end <= at {
            continue;
        }
        let Some(delta) = text.get(at..end) else {
            return;
        };
        pieces.push(delta);
        at = end;
    }
    if let Some(tail) = text.get(at..) {
        pieces.push(tail);
    }

    assert_eq!(pieces.text(), text);
    assert_eq!(pieces.is_complete(), whole.is_complete());
    // The scanner reads each byte once and keeps its state, so the value of the whole text is
    // the last value the deltas produced.
    if let Some(value) = whole.value() {
        assert_eq!(pieces.value(), Some(value));
    }
    // A complete document is read exactly.
    if let Ok(parsed) = serde_json::from_str::<serde_json::Value>(text)
        && (parsed.is_object() || parsed.is_array())
    {
        assert!(whole.is_complete(), "{text:?}");
        assert_eq!(whole.value(), Some(&parsed));
    }
});
