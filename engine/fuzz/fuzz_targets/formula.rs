//! The formula parser on any text: an accepted formula evaluates, prints and reads back the same.
#![no_main]

use std::collections::HashMap;

use agents::formula::Expr;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(expr) = Expr::parse(text) else {
        return;
    };
    let vars: HashMap<&str, f64> = expr
        .references()
        .into_iter()
        .map(|name| (name, 1.5))
        .collect();
    let value = expr.eval(&vars);
    let printed = expr.to_string();
    // Printing adds parentheses, so a formula near the nesting limit may not read back; one that
    // does is the same formula.
    if let Ok(again) = Expr::parse(&printed) {
        assert_eq!(again, expr, "{text:?} printed as {printed:?}");
        assert_eq!(again.eval(&vars), value);
    }
});
