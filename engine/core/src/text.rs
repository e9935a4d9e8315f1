//! Bounding text that comes from outside (provider error bodies, stored error messages) before
//! it is quoted in an error or written to a store item with a size limit.

/// Cuts `s` to at most `max` characters, on a character boundary.
pub fn truncate_chars(s: &mut String, max: usize) {
    if let Some((idx, _)) = s.char_indices().nth(max) {
        s.truncate(idx);
    }
}

/// `text` cut to `max` characters, with `…` where something was cut.
pub fn ellipsized(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_on_character_boundaries() {
        let mut s = "héllo".to_owned();
        truncate_chars(&mut s, 2);
        assert_eq!(s, "hé");
        let mut short = "ok".to_owned();
        truncate_chars(&mut short, 5);
        assert_eq!(short, "ok");
        assert_eq!(ellipsized("ñandú", 3), "ñan…");
        assert_eq!(ellipsized("abc", 3), "abc");
    }
}
