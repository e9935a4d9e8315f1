//! The tiny expression language of Logic Architect formulas: parse, list references, evaluate.
//!
//! Grammar (whitespace is free):
//! `expr := term (('+'|'-') term)*`, `term := unary (('*'|'/') unary)*`,
//! `unary := '-' unary | atom`, `atom := number | ident | ident '(' expr (',' expr)* ')' | '(' expr ')'`.
//! Functions: `min(a, b, …)`, `max(a, b, …)`, `round(x)` and `round(x, digits)`.
//! It is deliberately small: enough for calculators and additive quiz scores, and small enough
//! that a validator can check every reference and estimate the score range.

use std::collections::HashMap;
use std::fmt;

/// Names a formula may not use for inputs or intermediate values: they are the functions.
pub const FUNCTIONS: [&str; 3] = ["min", "max", "round"];

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Number(f64),
    Var(String),
    Neg(Box<Expr>),
    Binary(Op, Box<Expr>, Box<Expr>),
    Call(Func, Vec<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    Min,
    Max,
    Round,
}

/// Why an expression could not be parsed; `at` is a byte offset into the expression.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message} at position {at}")]
pub struct ParseError {
    pub at: usize,
    pub message: String,
}

/// Why an expression could not be evaluated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    #[error("unknown identifier `{0}`")]
    Unknown(String),
    #[error("the result is not a finite number (division by zero?)")]
    NotFinite,
}

impl Expr {
    /// Parses a whole expression; trailing text is an error.
    pub fn parse(text: &str) -> Result<Expr, ParseError> {
        let mut parser = Parser {
            text,
            bytes: text.as_bytes(),
            pos: 0,
            nodes: 0,
        };
        let expr = parser.expr(0)?;
        parser.skip_ws();
        if parser.pos < parser.bytes.len() {
            return Err(parser.error(format!(
                "unexpected `{}`",
                parser.rest_char().unwrap_or_default()
            )));
        }
        Ok(expr)
    }

    /// Every identifier the expression reads, in first-use order, without duplicates.
    pub fn references(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.collect_refs(&mut out);
        out
    }

    fn collect_refs<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Expr::Number(_) => {}
            Expr::Var(name) => {
                if !out.contains(&name.as_str()) {
                    out.push(name);
                }
            }
            Expr::Neg(inner) => inner.collect_refs(out),
            Expr::Binary(_, a, b) => {
                a.collect_refs(out);
                b.collect_refs(out);
            }
            Expr::Call(_, args) => args.iter().for_each(|a| a.collect_refs(out)),
        }
    }

    /// Evaluates with the given variable values. Non-finite results (x/0) are errors, so a
    /// validator sees them instead of carrying `inf` into the bands.
    pub fn eval(&self, vars: &HashMap<&str, f64>) -> Result<f64, EvalError> {
        let value = match self {
            Expr::Number(n) => *n,
            Expr::Var(name) => *vars
                .get(name.as_str())
                .ok_or_else(|| EvalError::Unknown(name.clone()))?,
            Expr::Neg(inner) => -inner.eval(vars)?,
            Expr::Binary(op, a, b) => {
                let (a, b) = (a.eval(vars)?, b.eval(vars)?);
                match op {
                    Op::Add => a + b,
                    Op::Sub => a - b,
                    Op::Mul => a * b,
                    Op::Div => a / b,
                }
            }
            Expr::Call(func, args) => {
                let values = args
                    .iter()
                    .map(|a| a.eval(vars))
                    .collect::<Result<Vec<f64>, _>>()?;
                match func {
                    Func::Min => values.iter().copied().fold(f64::INFINITY, f64::min),
                    Func::Max => values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    Func::Round => {
                        let digits = values.get(1).copied().unwrap_or(0.0).clamp(-12.0, 12.0);
                        let scale = 10f64.powi(digits.round() as i32);
                        (values.first().copied().unwrap_or(f64::NAN) * scale).round() / scale
                    }
                }
            }
        };
        if value.is_finite() {
            Ok(value)
        } else {
            Err(EvalError::NotFinite)
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Number(n) => write!(f, "{n}"),
            Expr::Var(name) => f.write_str(name),
            Expr::Neg(inner) => write!(f, "-({inner})"),
            Expr::Binary(op, a, b) => {
                let sym = match op {
                    Op::Add => "+",
                    Op::Sub => "-",
                    Op::Mul => "*",
                    Op::Div => "/",
                };
                write!(f, "({a} {sym} {b})")
            }
            Expr::Call(func, args) => {
                let name = match func {
                    Func::Min => "min",
                    Func::Max => "max",
                    Func::Round => "round",
                };
                write!(f, "{name}(")?;
                for (i, a) in args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{a}")?;
                }
                f.write_str(")")
            }
        }
    }
}

/// Deep nesting is refused rather than risking the stack on hostile model output.
const MAX_DEPTH: usize = 64;

/// Most numbers, names, operators and calls one formula may have. Evaluating, printing, cloning
/// and dropping an [`Expr`] recurse once per level of the tree, and a chain like `1+1+…+1` is as
/// deep as it is long, so the length has to be bounded too: 3,000 terms overflowed a 2 MiB
/// thread stack. A quiz adding 100 weighted answers uses about 400.
pub const MAX_NODES: usize = 1_000;

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    /// Nodes built so far, against [`MAX_NODES`].
    nodes: usize,
}

impl Parser<'_> {
    fn error(&self, message: String) -> ParseError {
        ParseError {
            at: self.pos,
            message,
        }
    }

    /// Counts one more node of the tree, refusing past [`MAX_NODES`].
    fn node(&mut self, expr: Expr) -> Result<Expr, ParseError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(self.error(format!(
                "the formula has more than {MAX_NODES} numbers, names and operators; \
                 split it into intermediate values"
            )));
        }
        Ok(expr)
    }

    fn rest_char(&self) -> Option<char> {
        self.text.get(self.pos..).and_then(|s| s.chars().next())
    }

    fn skip_ws(&mut self) {
        while self
            .bytes
            .get(self.pos)
            .is_some_and(u8::is_ascii_whitespace)
        {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.bytes.get(self.pos).copied()
    }

    fn expr(&mut self, depth: usize) -> Result<Expr, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.error("expression nested too deeply".into()));
        }
        let mut left = self.term(depth)?;
        while let Some(c @ (b'+' | b'-')) = self.peek() {
            self.pos += 1;
            let right = self.term(depth)?;
            let op = if c == b'+' { Op::Add } else { Op::Sub };
            left = self.node(Expr::Binary(op, Box::new(left), Box::new(right)))?;
        }
        Ok(left)
    }

    fn term(&mut self, depth: usize) -> Result<Expr, ParseError> {
        let mut left = self.unary(depth)?;
        while let Some(c @ (b'*' | b'/')) = self.peek() {
            self.pos += 1;
            let right = self.unary(depth)?;
            let op = if c == b'*' { Op::Mul } else { Op::Div };
            left = self.node(Expr::Binary(op, Box::new(left), Box::new(right)))?;
        }
        Ok(left)
    }

    fn unary(&mut self, depth: usize) -> Result<Expr, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.error("expression nested too deeply".into()));
        }
        if self.peek() == Some(b'-') {
            self.pos += 1;
            let inner = self.unary(depth + 1)?;
            return self.node(Expr::Neg(Box::new(inner)));
        }
        self.atom(depth)
    }

    fn atom(&mut self, depth: usize) -> Result<Expr, ParseError> {
        match self.peek() {
            None => {
                Err(self.error("expected a number, a name or `(` but the expression ended".into()))
            }
            Some(b'(') => {
                self.pos += 1;
                let inner = self.expr(depth + 1)?;
                self.expect(b')')?;
                Ok(inner)
            }
            Some(c) if c.is_ascii_digit() || c == b'.' => self.number(),
            Some(c) if c.is_ascii_alphabetic() || c == b'_' => {
                let start = self.pos;
                while self
                    .bytes
                    .get(self.pos)
                    .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
                {
                    self.pos += 1;
                }
                let name = &self.text[start..self.pos];
                if self.peek() != Some(b'(') {
                    return self.node(Expr::Var(name.to_owned()));
                }
                let func = match name {
                    "min" => Func::Min,
                    "max" => Func::Max,
                    "round" => Func::Round,
                    other => {
                        return Err(ParseError {
                            at: start,
                            message: format!(
                                "unknown function `{other}` (only min, max and round exist)"
                            ),
                        });
                    }
                };
                self.pos += 1;
                let mut args = vec![self.expr(depth + 1)?];
                while self.peek() == Some(b',') {
                    self.pos += 1;
                    args.push(self.expr(depth + 1)?);
                }
                self.expect(b')')?;
                let arity_ok = match func {
                    Func::Min | Func::Max => args.len() >= 2,
                    Func::Round => args.len() <= 2,
                };
                if !arity_ok {
                    return Err(ParseError {
                        at: start,
                        message: format!(
                            "`{name}` takes {}, got {} argument(s)",
                            if func == Func::Round {
                                "1 or 2 arguments"
                            } else {
                                "at least 2 arguments"
                            },
                            args.len()
                        ),
                    });
                }
                self.node(Expr::Call(func, args))
            }
            Some(_) => Err(self.error(format!(
                "unexpected `{}`",
                self.rest_char().unwrap_or_default()
            ))),
        }
    }

    fn number(&mut self) -> Result<Expr, ParseError> {
        let start = self.pos;
        while self
            .bytes
            .get(self.pos)
            .is_some_and(|b| b.is_ascii_digit() || *b == b'.')
        {
            self.pos += 1;
        }
        let text = &self.text[start..self.pos];
        match text.parse::<f64>() {
            // Digits alone can still overflow to infinity (`1` and 400 zeros), which no
            // formula means and which would print back as the name `inf`.
            Ok(value) if value.is_finite() => self.node(Expr::Number(value)),
            Ok(_) => Err(ParseError {
                at: start,
                message: format!("`{text}` is too large for a number"),
            }),
            Err(_) => Err(ParseError {
                at: start,
                message: format!("`{text}` is not a number"),
            }),
        }
    }

    fn expect(&mut self, want: u8) -> Result<(), ParseError> {
        if self.peek() == Some(want) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(format!("expected `{}`", want as char)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(text: &str, vars: &[(&str, f64)]) -> f64 {
        let vars: HashMap<&str, f64> = vars.iter().copied().collect();
        Expr::parse(text).unwrap().eval(&vars).unwrap()
    }

    #[test]
    fn precedence_and_functions() {
        assert_eq!(eval("1 + 2 * 3", &[]), 7.0);
        assert_eq!(eval("(1 + 2) * 3", &[]), 9.0);
        assert_eq!(eval("-2 * -3", &[]), 6.0);
        assert_eq!(eval("10 - 4 - 3", &[]), 3.0);
        assert_eq!(eval("12 / 4 / 3", &[]), 1.0);
        assert_eq!(
            eval("max(a, b, 2) + min(a, b)", &[("a", 5.0), ("b", 1.0)]),
            6.0
        );
        assert_eq!(eval("round(2.345, 2)", &[]), 2.35);
        assert_eq!(
            eval("round(hours * rate)", &[("hours", 1.5), ("rate", 3.0)]),
            5.0
        );
    }

    #[test]
    fn references_are_deduplicated_in_order() {
        let e = Expr::parse("b * a + round(b / c)").unwrap();
        assert_eq!(e.references(), vec!["b", "a", "c"]);
    }

    #[test]
    fn errors_say_what_and_where() {
        let err = Expr::parse("a + * b").unwrap_err();
        assert_eq!(err.at, 4);
        assert!(
            Expr::parse("sqrt(a)")
                .unwrap_err()
                .message
                .contains("unknown function `sqrt`")
        );
        assert!(
            Expr::parse("(a + b")
                .unwrap_err()
                .message
                .contains("expected `)`")
        );
        assert!(
            Expr::parse("a b")
                .unwrap_err()
                .message
                .contains("unexpected `b`")
        );
        assert!(
            Expr::parse("1.2.3")
                .unwrap_err()
                .message
                .contains("not a number")
        );
        assert!(Expr::parse("").is_err());
        assert!(
            Expr::parse("min(a)")
                .unwrap_err()
                .message
                .contains("at least 2")
        );
        let deep = "(".repeat(500) + "1" + &")".repeat(500);
        assert!(Expr::parse(&deep).is_err());
        let vars = HashMap::new();
        assert_eq!(
            Expr::parse("1 / 0").unwrap().eval(&vars),
            Err(EvalError::NotFinite)
        );
        assert_eq!(
            Expr::parse("x").unwrap().eval(&vars),
            Err(EvalError::Unknown("x".into()))
        );
        let huge = format!("1{}", "0".repeat(400));
        assert!(
            Expr::parse(&huge)
                .unwrap_err()
                .message
                .contains("too large for a number")
        );
    }

    /// A long chain of terms is as deep a tree as it is long, and evaluating, printing and
    /// dropping recurse per level: 3,000 terms used to parse and then overflow the stack.
    #[test]
    fn a_formula_past_the_node_limit_is_refused_and_the_longest_one_accepted_is_safe() {
        let chain = |terms: usize| "1+".repeat(terms - 1) + "1";
        let err = Expr::parse(&chain(3_000)).unwrap_err();
        assert!(
            err.message.contains("more than 1000") && err.message.contains("intermediate"),
            "{err}"
        );
        // `n` terms make `2n - 1` nodes.
        let longest = chain(MAX_NODES.div_ceil(2));
        assert!(Expr::parse(&(longest.clone() + "+1")).is_err());
        // On a thread with the default test stack, as a request handler might have.
        std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(move || {
                let expr = Expr::parse(&longest).unwrap();
                assert_eq!(expr.eval(&HashMap::new()), Ok(MAX_NODES.div_ceil(2) as f64));
                let printed = expr.to_string();
                assert_eq!(printed.matches('+').count(), MAX_NODES.div_ceil(2) - 1);
                assert_eq!(expr.clone(), expr);
                assert!(expr.references().is_empty());
                drop(expr);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
