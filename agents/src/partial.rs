//! Incremental JSON: the best-effort value of a JSON document that is still streaming in.
//!
//! [`PartialJson::push`] takes each text delta and, when something new became visible, returns
//! the document so far with open strings, arrays and objects closed. A trailing key without a
//! value, a number that may still grow, a half-written `true`/`false`/`null` and a trailing comma
//! are dropped rather than guessed. Prose or a ```json fence before the document and anything
//! after it are ignored (a top-level array must start the text; an object may follow prose).
//!
//! The scanner is resumable: it keeps its state between pushes and reads each byte once, tracking
//! the last point where the text can be cut and closed into valid JSON. Each push then costs one
//! `serde_json` parse of the repaired prefix.

use serde_json::Value;

/// Nesting beyond this is treated as garbage: no model output is this deep, and it bounds memory.
/// It is the deepest `serde_json` parses (its recursion limit of 128 refuses a 128th container),
/// and serde_json parses each snapshot: a deeper document would be scanned to the end and never
/// give a value.
const MAX_DEPTH: usize = 127;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Object,
    Array,
}

/// Where the scanner is inside the innermost container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Before the document: skipping prose or a fence until `{` or `[`.
    Preamble,
    /// After `{`: a key or `}`.
    KeyOrEnd,
    /// After `,` in an object.
    Key,
    /// After a key.
    Colon,
    /// After `:` or `,` in an array, or after `[` (`array_open` tells which).
    Value,
    /// After a complete value.
    CommaOrEnd,
    /// The top-level value is complete; the rest is ignored.
    Done,
    /// Not JSON; nothing more will be produced.
    Broken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    None,
    /// Inside a string; `key` when it is an object key. `safe_end` is the byte offset up to which
    /// the contents are complete characters/escapes.
    Str {
        key: bool,
        escape: u8,
        safe_end: usize,
    },
    Number,
    Literal {
        start: usize,
    },
}

/// Streaming best-effort JSON parser; see the module docs.
#[derive(Debug, Clone)]
pub struct PartialJson {
    buf: String,
    /// Bytes of `buf` already scanned.
    scanned: usize,
    start: Option<usize>,
    stack: Vec<Container>,
    expect: Expect,
    /// After `[` (as opposed to after `,`), `]` may close the array.
    array_open: bool,
    token: Token,
    /// The longest prefix of `buf` known to close into valid JSON, and the closers it needs.
    safe_len: usize,
    safe_closers: String,
    last: Option<Value>,
}

impl Default for PartialJson {
    fn default() -> Self {
        Self::new()
    }
}

impl PartialJson {
    pub fn new() -> Self {
        Self {
            buf: String::new(),
            scanned: 0,
            start: None,
            stack: Vec::new(),
            expect: Expect::Preamble,
            array_open: false,
            token: Token::None,
            safe_len: 0,
            safe_closers: String::new(),
            last: None,
        }
    }

    /// Appends `delta`; returns the best-effort value when it differs from the last one returned.
    pub fn push(&mut self, delta: &str) -> Option<Value> {
        self.append(delta);
        self.snapshot()
    }

    /// Appends `delta` and scans it (each byte once), without building a value. Pair with
    /// [`snapshot`](Self::snapshot) to build values less often than deltas arrive: building one
    /// parses the whole prefix, so doing it on every delta is quadratic in the answer's length.
    pub fn append(&mut self, delta: &str) {
        self.buf.push_str(delta);
        while let Some(&b) = self.buf.as_bytes().get(self.scanned) {
            self.step(b, self.scanned);
            self.scanned += 1;
        }
    }

    /// The best-effort value of everything appended so far, when it differs from the last one
    /// returned.
    pub fn snapshot(&mut self) -> Option<Value> {
        let candidate = self.candidate()?;
        let value: Value = serde_json::from_str(&candidate).ok()?;
        if self.last.as_ref() == Some(&value) {
            return None;
        }
        self.last = Some(value.clone());
        Some(value)
    }

    /// The latest value returned by [`push`](Self::push), if any.
    pub fn value(&self) -> Option<&Value> {
        self.last.as_ref()
    }

    /// True once the top-level value has been closed.
    pub fn is_complete(&self) -> bool {
        self.expect == Expect::Done
    }

    /// All text pushed so far.
    pub fn text(&self) -> &str {
        &self.buf
    }

    fn closers(&self) -> String {
        self.stack
            .iter()
            .rev()
            .map(|c| match c {
                Container::Object => '}',
                Container::Array => ']',
            })
            .collect()
    }

    fn mark_safe(&mut self, len: usize) {
        self.safe_len = len;
        self.safe_closers = self.closers();
    }

    fn candidate(&self) -> Option<String> {
        let start = self.start?;
        if self.expect == Expect::Broken {
            return None;
        }
        if let Token::Str {
            key: false,
            safe_end,
            ..
        } = self.token
        {
            let mut s = self.buf.get(start..safe_end)?.to_owned();
            s.push('"');
            s.push_str(&self.closers());
            return Some(s);
        }
        if self.safe_len <= start {
            return None;
        }
        let mut s = self.buf.get(start..self.safe_len)?.to_owned();
        s.push_str(&self.safe_closers);
        Some(s)
    }

    /// A value just finished ending before byte `end`.
    fn value_done(&mut self, end: usize) {
        self.token = Token::None;
        if self.stack.is_empty() {
            self.expect = Expect::Done;
        } else {
            self.expect = Expect::CommaOrEnd;
        }
        self.mark_safe(end);
    }

    fn open(&mut self, c: Container, pos: usize) {
        if self.stack.len() >= MAX_DEPTH {
            self.expect = Expect::Broken;
            return;
        }
        if self.start.is_none() {
            self.start = Some(pos);
        }
        self.stack.push(c);
        match c {
            Container::Object => self.expect = Expect::KeyOrEnd,
            Container::Array => {
                self.expect = Expect::Value;
                self.array_open = true;
            }
        }
        self.mark_safe(pos + 1);
    }

    fn close(&mut self, c: Container, pos: usize) {
        if self.stack.last() != Some(&c) {
            self.expect = Expect::Broken;
            return;
        }
        self.stack.pop();
        self.value_done(pos + 1);
    }

    fn step(&mut self, b: u8, pos: usize) {
        match self.token {
            Token::Str { key, escape, .. } => {
                self.step_string(b, pos, key, escape);
                return;
            }
            Token::Number => {
                if matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                    return;
                }
                self.value_done(pos);
            }
            Token::Literal { start } => {
                if b.is_ascii_alphabetic() {
                    let word = &self.buf.as_bytes()[start..=pos];
                    const LITERALS: [&[u8]; 3] = [b"true", b"false", b"null"];
                    let complete = LITERALS.iter().find(|lit| lit.starts_with(word));
                    match complete {
                        Some(lit) if lit.len() == word.len() => self.value_done(pos + 1),
                        Some(_) => {}
                        None => self.expect = Expect::Broken,
                    }
                    return;
                }
                // A literal interrupted before it was complete is not JSON.
                self.expect = Expect::Broken;
                return;
            }
            Token::None => {}
        }
        self.step_structural(b, pos);
    }

    fn step_string(&mut self, b: u8, pos: usize, key: bool, escape: u8) {
        let set = |this: &mut Self, escape: u8, safe_end: Option<usize>| {
            if let Token::Str {
                escape: e,
                safe_end: s,
                ..
            } = &mut this.token
            {
                *e = escape;
                if let Some(end) = safe_end {
                    *s = end;
                }
            }
        };
        match escape {
            // 1: just saw `\`.
            1 => {
                if b == b'u' {
                    set(self, 2, None);
                } else {
                    set(self, 0, Some(pos + 1));
                }
            }
            // 2..=5: inside `\uXXXX`, counting hex digits.
            2..=5 => {
                if escape == 5 {
                    set(self, 0, Some(pos + 1));
                } else {
                    set(self, escape + 1, None);
                }
            }
            _ => match b {
                b'\\' => set(self, 1, None),
                b'"' => {
                    if key {
                        self.token = Token::None;
                        self.expect = Expect::Colon;
                    } else {
                        self.value_done(pos + 1);
                    }
                }
                // Continuation bytes of a multi-byte character complete it only at its end;
                // the safe end advances past a character when its last byte is read.
                _ => {
                    let next_is_boundary = self.buf.is_char_boundary(pos + 1);
                    if next_is_boundary {
                        set(self, 0, Some(pos + 1));
                    }
                }
            },
        }
    }

    fn step_structural(&mut self, b: u8, pos: usize) {
        if matches!(self.expect, Expect::Done | Expect::Broken) {
            return;
        }
        if self.expect == Expect::Preamble {
            match b {
                b'{' => self.open(Container::Object, pos),
                // A top-level array only when nothing but whitespace precedes it: in prose,
                // `[` is too common ("see [1]") to mean JSON.
                b'[' if self.buf[..pos].trim().is_empty() => self.open(Container::Array, pos),
                _ => {}
            }
            return;
        }
        if b.is_ascii_whitespace() {
            return;
        }
        match (self.expect, b) {
            (Expect::KeyOrEnd, b'}') => self.close(Container::Object, pos),
            (Expect::KeyOrEnd | Expect::Key, b'"') => {
                self.token = Token::Str {
                    key: true,
                    escape: 0,
                    safe_end: pos + 1,
                };
            }
            (Expect::Colon, b':') => {
                self.expect = Expect::Value;
                self.array_open = false;
            }
            (Expect::Value, b']') if self.array_open => self.close(Container::Array, pos),
            (Expect::Value, _) => self.start_value(b, pos),
            (Expect::CommaOrEnd, b',') => match self.stack.last() {
                Some(Container::Object) => self.expect = Expect::Key,
                _ => {
                    self.expect = Expect::Value;
                    self.array_open = false;
                }
            },
            (Expect::CommaOrEnd, b'}') => self.close(Container::Object, pos),
            (Expect::CommaOrEnd, b']') => self.close(Container::Array, pos),
            _ => self.expect = Expect::Broken,
        }
    }

    fn start_value(&mut self, b: u8, pos: usize) {
        self.array_open = false;
        match b {
            b'{' => self.open(Container::Object, pos),
            b'[' => self.open(Container::Array, pos),
            b'"' => {
                self.token = Token::Str {
                    key: false,
                    escape: 0,
                    safe_end: pos + 1,
                };
            }
            b'-' | b'0'..=b'9' => self.token = Token::Number,
            b't' | b'f' | b'n' => {
                self.token = Token::Literal { start: pos };
            }
            _ => self.expect = Expect::Broken,
        }
    }
}
