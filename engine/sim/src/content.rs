//! Deterministic answer text: readable prose about the prompt's topics, or JSON that validates
//! against the request's schema, and the split of either into streamable pieces.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use keyvex_engine::provider::ChatMessage;
use keyvex_engine::tokenize::count_tokens;

/// SplitMix64: tiny, fast and stable across platforms and crate versions, so a seed replays the
/// same bytes forever (a `rand` generator's stream may change between releases).
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `lo..=hi` (`lo` when `hi < lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// A uniformly chosen element; `items` must not be empty (all callers pass constants or
    /// checked lists).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next_u64() % items.len() as u64) as usize]
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }
}

/// A request to continue a cut answer: the conversation it continues, and the answer so far.
pub(crate) struct Continuation<'a> {
    pub original: Prompt<'a>,
    pub sent: &'a str,
    /// Sent as an assistant prefill (the model continues it directly), rather than as the cut
    /// answer followed by the continuation instruction (the model restates its last words).
    pub prefill: bool,
}

impl Continuation<'_> {
    /// What the model sends to finish `canonical`, when the answer so far is its start: after
    /// a prefill exactly the rest; after the instruction the rest with the last few words of
    /// the answer so far said again, as models do when they pick a sentence up.
    pub fn rest(&self, canonical: &str) -> Option<String> {
        if !canonical.starts_with(self.sent) {
            return None;
        }
        if self.prefill {
            return Some(canonical[self.sent.len()..].to_owned());
        }
        let mut back = self.sent.len().saturating_sub(12);
        while !self.sent.is_char_boundary(back) {
            back -= 1;
        }
        let from = self.sent[..back].rfind(char::is_whitespace).unwrap_or(0);
        Some(canonical[from..].to_owned())
    }
}

/// The continuation `prompt` asks for, if it is one: it ends with an assistant message (a
/// prefill), or with the engine's continuation instruction right after one.
pub(crate) fn continuation<'a>(prompt: &Prompt<'a>) -> Option<Continuation<'a>> {
    use keyvex_engine::provider::Role;
    let messages = prompt.messages;
    let (last, before) = messages.split_last()?;
    let (kept, sent, prefill) = match last.role {
        Role::Assistant => (before, last.content.as_str(), true),
        Role::User if last.content == keyvex_engine::router::CONTINUE_INSTRUCTION => {
            let (cut, kept) = before.split_last()?;
            if cut.role != Role::Assistant {
                return None;
            }
            (kept, cut.content.as_str(), false)
        }
        Role::User => return None,
    };
    Some(Continuation {
        original: Prompt {
            model: prompt.model,
            system: prompt.system,
            messages: kept,
            schema: prompt.schema,
        },
        sent,
        prefill,
    })
}

/// What the answer depends on. Stream flag and token limit are deliberately absent: a streamed
/// and a non-streamed answer to the same prompt are the same text, and a lower limit cuts the
/// same text shorter.
pub(crate) struct Prompt<'a> {
    pub model: &'a str,
    pub system: Option<&'a str>,
    pub messages: &'a [ChatMessage],
    pub schema: Option<(&'a str, &'a Value)>,
}

impl Prompt<'_> {
    /// A stable 64-bit hash of the request content.
    pub fn hash(&self) -> u64 {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(self.model.as_bytes());
        field(self.system.unwrap_or("").as_bytes());
        for m in self.messages {
            field(format!("{:?}", m.role).as_bytes());
            field(m.content.as_bytes());
        }
        if let Some((name, schema)) = self.schema {
            field(name.as_bytes());
            field(schema.to_string().as_bytes());
        }
        let digest = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }

    pub fn last_user_message(&self) -> &str {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == keyvex_engine::provider::Role::User)
            .map_or("", |m| m.content.as_str())
    }
}

/// The generated answer before any token limit.
pub(crate) enum Answer {
    Text(String),
    Json(Value),
}

/// Produces the answer for `prompt`: JSON when a schema is attached (an agent sample when one
/// exists for the schema name), prose otherwise.
pub(crate) fn answer(prompt: &Prompt<'_>, seed: u64, output_tokens: Option<u32>) -> Answer {
    let mut rng = Rng::new(seed);
    let hint = prompt.last_user_message();
    if let Some((name, schema)) = prompt.schema {
        if let Some(sample) = agents::samples::sample_output(name, seed, hint) {
            return Answer::Json(sample);
        }
        let topics = topics(hint);
        return Answer::Json(from_schema(&mut rng, schema, schema, &topics, None, 0));
    }
    let target = match output_tokens {
        Some(n) => u64::from(n),
        None => rng.range(60, 180),
    };
    Answer::Text(prose(&mut rng, hint, target))
}

const STOPWORDS: &[&str] = &[
    "about", "above", "after", "again", "also", "because", "been", "before", "being", "below",
    "between", "both", "could", "does", "doing", "down", "during", "each", "from", "further",
    "have", "having", "here", "into", "just", "more", "most", "once", "only", "other", "over",
    "please", "same", "should", "some", "such", "than", "that", "their", "them", "then", "there",
    "these", "they", "this", "those", "through", "under", "until", "very", "want", "what", "when",
    "where", "which", "while", "will", "with", "would", "your", "yours", "make", "like", "need",
    "help", "tell", "give", "write", "using", "json", "answer", "respond", "return",
];

/// Up to six distinct content words of the prompt, in order of appearance.
pub(crate) fn topics(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for word in text.split(|c: char| !c.is_ascii_alphabetic()) {
        if word.len() < 4 || word.len() > 20 {
            continue;
        }
        let w = word.to_ascii_lowercase();
        if STOPWORDS.contains(&w.as_str()) || out.contains(&w) {
            continue;
        }
        out.push(w);
        if out.len() == 6 {
            break;
        }
    }
    out
}

const OPENERS: &[&str] = &[
    "In practice",
    "To start",
    "Put simply",
    "From experience",
    "As a rule",
    "In short",
    "Looking closer",
    "On balance",
];
const CONNECTORS: &[&str] = &[
    "After that",
    "At the same time",
    "Beyond that",
    "Just as important",
    "In the meantime",
    "Once that is in place",
    "Over time",
];
const ADJECTIVES: &[&str] = &[
    "clear",
    "steady",
    "simple",
    "practical",
    "focused",
    "measurable",
    "reliable",
    "flexible",
    "honest",
    "modest",
    "consistent",
    "realistic",
];
const NOUNS: &[&str] = &[
    "plan",
    "budget",
    "audience",
    "message",
    "schedule",
    "process",
    "offer",
    "feedback loop",
    "checklist",
    "timeline",
    "price point",
    "first draft",
    "pilot",
    "routine",
    "goal",
];
const VERBS: &[&str] = &[
    "review",
    "test",
    "simplify",
    "measure",
    "refine",
    "share",
    "prioritise",
    "document",
    "validate",
    "adjust",
];
const GERUNDS: &[&str] = &[
    "naming",
    "testing",
    "trimming",
    "measuring",
    "sketching",
    "pricing",
    "sharing",
    "reviewing",
];
const ORDINALS: &[&str] = &["first", "second", "next", "final", "most useful"];
const DEFAULT_TOPICS: &[&str] = &["the idea", "the project", "this question"];

fn sentence(rng: &mut Rng, topic: &str) -> String {
    let adj = *rng.pick(ADJECTIVES);
    let adj2 = *rng.pick(ADJECTIVES);
    let noun = *rng.pick(NOUNS);
    let noun2 = *rng.pick(NOUNS);
    let verb = *rng.pick(VERBS);
    match rng.range(0, 5) {
        0 => format!(
            "{}, {topic} works best when the {noun} stays {adj} and easy to {verb}.",
            rng.pick(OPENERS)
        ),
        1 => format!(
            "A {adj} approach to {topic} starts with {} the {noun} and {} the {noun2}.",
            rng.pick(GERUNDS),
            rng.pick(GERUNDS)
        ),
        2 => format!("Most people find that a {adj} {noun} makes {topic} easier to {verb}."),
        3 => format!(
            "{}, keep the {noun} {adj} so that {topic} stays {adj2}.",
            rng.pick(CONNECTORS)
        ),
        4 => format!(
            "The {} step is to {verb} the {noun} around {topic} before anything else.",
            rng.pick(ORDINALS)
        ),
        _ => format!("If {topic} feels stuck, {verb} one {noun} this week and note what changes."),
    }
}

/// Readable prose about the prompt's topics, at most `target` tokens (and no fewer than
/// `target - 1` unless `target` is tiny).
pub(crate) fn prose(rng: &mut Rng, prompt: &str, target: u64) -> String {
    if target == 0 {
        return String::new();
    }
    let found = topics(prompt);
    let topics: Vec<String> = if found.is_empty() {
        DEFAULT_TOPICS.iter().map(|s| (*s).to_owned()).collect()
    } else {
        found
    };
    let mut text = String::new();
    let mut approx = 0u64;
    let mut in_paragraph = 0;
    while approx <= target + 8 {
        let topic = rng.pick(&topics).clone();
        let s = sentence(rng, &topic);
        if !text.is_empty() {
            if in_paragraph >= 3 && rng.chance(0.4) {
                text.push_str("\n\n");
                in_paragraph = 0;
            } else {
                text.push(' ');
            }
        }
        approx += count_tokens(&s) + 1;
        text.push_str(&s);
        in_paragraph += 1;
    }
    let pieces = split_pieces(&text);
    let keep = longest_prefix_within(&pieces, target);
    pieces[..keep].concat()
}

/// How many leading pieces fit in `limit` tokens, counted on the joined text (BPE counts are not
/// additive across piece boundaries, so each candidate prefix is counted whole).
pub(crate) fn longest_prefix_within(pieces: &[String], limit: u64) -> usize {
    let count = |n: usize| count_tokens(&pieces[..n].concat());
    if count(pieces.len()) <= limit {
        return pieces.len();
    }
    // Binary search for the largest n with count(n) <= limit; counts grow with n (almost
    // strictly), and the final step-down makes the bound hold even where they do not.
    let (mut lo, mut hi) = (0usize, pieces.len());
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if count(mid) <= limit {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    while lo > 0 && count(lo) > limit {
        lo -= 1;
    }
    lo
}

/// Splits text into word-sized pieces (leading whitespace or punctuation attached to the word
/// that follows), roughly one token each. Concatenating them gives the text back.
pub(crate) fn split_pieces(text: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    for c in text.chars() {
        let wordish = c.is_alphanumeric();
        if in_word && !wordish {
            pieces.push(std::mem::take(&mut current));
        }
        in_word = wordish;
        current.push(c);
    }
    if !current.is_empty() {
        pieces.push(current);
    }
    pieces
}

/// Groups pieces into stream chunks of one to three pieces.
pub(crate) fn chunk(rng: &mut Rng, pieces: &[String]) -> Vec<String> {
    let mut chunks = Vec::new();
    let mut i = 0;
    while i < pieces.len() {
        let n = (rng.range(1, 3) as usize).min(pieces.len() - i);
        chunks.push(pieces[i..i + n].concat());
        i += n;
    }
    chunks
}

const MAX_DEPTH: usize = 12;

/// A value that validates against `schema` (`root` resolves `$ref`s). Supports `type` (also as a
/// list), `enum`, `const`, `anyOf`/`oneOf`/`allOf`, `$ref` into `$defs`/`definitions`, object
/// `properties` (all filled), array `items`/`minItems`/`maxItems`/`uniqueItems`, string
/// `minLength`/`maxLength`/`format`/hex-colour `pattern`, number `minimum`/`maximum` (also
/// exclusive) and integer `multipleOf`.
pub(crate) fn from_schema(
    rng: &mut Rng,
    schema: &Value,
    root: &Value,
    topics: &[String],
    key: Option<&str>,
    depth: usize,
) -> Value {
    let Some(obj) = schema.as_object() else {
        // `true` or `{}`: anything goes; a short string reads best.
        return Value::String(phrase(rng, topics, 3));
    };
    if let Some(Value::String(reference)) = obj.get("$ref") {
        let target = reference
            .strip_prefix('#')
            .and_then(|pointer| root.pointer(pointer));
        return match target {
            Some(target) if depth < MAX_DEPTH => {
                from_schema(rng, target, root, topics, key, depth + 1)
            }
            _ => Value::Null,
        };
    }
    if let Some(value) = obj.get("const") {
        return value.clone();
    }
    if let Some(Value::Array(options)) = obj.get("enum")
        && !options.is_empty()
    {
        return rng.pick(options).clone();
    }
    for combinator in ["anyOf", "oneOf"] {
        if let Some(Value::Array(options)) = obj.get(combinator)
            && !options.is_empty()
        {
            // Prefer a branch that carries content over a bare `null`.
            let non_null: Vec<&Value> = options
                .iter()
                .filter(|o| o.get("type").and_then(Value::as_str) != Some("null"))
                .collect();
            let branch = if non_null.is_empty() {
                &options[0]
            } else {
                *rng.pick(&non_null)
            };
            return from_schema(rng, branch, root, topics, key, depth + 1);
        }
    }
    if let Some(Value::Array(parts)) = obj.get("allOf") {
        let mut merged = obj.clone();
        merged.remove("allOf");
        for part in parts {
            merge_schema(&mut merged, part, root);
        }
        return from_schema(rng, &Value::Object(merged), root, topics, key, depth + 1);
    }
    match schema_type(obj) {
        "object" => object(rng, obj, root, topics, depth),
        "array" => array(rng, obj, root, topics, key, depth),
        "integer" => integer(rng, obj),
        "number" => number(rng, obj),
        "boolean" => Value::Bool(rng.chance(0.5)),
        "null" => Value::Null,
        _ => Value::String(string(rng, obj, topics, key)),
    }
}

fn merge_schema(into: &mut Map<String, Value>, part: &Value, root: &Value) {
    let resolved = match part.get("$ref").and_then(Value::as_str) {
        Some(r) => r
            .strip_prefix('#')
            .and_then(|p| root.pointer(p))
            .unwrap_or(part),
        None => part,
    };
    let Some(part) = resolved.as_object() else {
        return;
    };
    for (k, v) in part {
        match (k.as_str(), into.get_mut(k), v) {
            ("properties", Some(Value::Object(existing)), Value::Object(more)) => {
                existing.extend(more.clone());
            }
            ("required", Some(Value::Array(existing)), Value::Array(more)) => {
                existing.extend(more.iter().cloned());
            }
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

fn schema_type(obj: &Map<String, Value>) -> &str {
    match obj.get("type") {
        Some(Value::String(t)) => t,
        Some(Value::Array(types)) => types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .or_else(|| types.first().and_then(Value::as_str))
            .unwrap_or("string"),
        _ if obj.contains_key("properties") => "object",
        _ if obj.contains_key("items") => "array",
        _ => "string",
    }
}

fn object(
    rng: &mut Rng,
    obj: &Map<String, Value>,
    root: &Value,
    topics: &[String],
    depth: usize,
) -> Value {
    let mut out = Map::new();
    if depth >= MAX_DEPTH {
        return Value::Object(out);
    }
    if let Some(Value::Object(properties)) = obj.get("properties") {
        for (name, sub) in properties {
            let value = from_schema(rng, sub, root, topics, Some(name), depth + 1);
            out.insert(name.clone(), value);
        }
    } else if let Some(extra @ Value::Object(_)) = obj.get("additionalProperties") {
        for topic in topics.iter().take(2) {
            let value = from_schema(rng, extra, root, topics, Some(topic), depth + 1);
            out.insert(topic.clone(), value);
        }
    }
    Value::Object(out)
}

fn array(
    rng: &mut Rng,
    obj: &Map<String, Value>,
    root: &Value,
    topics: &[String],
    key: Option<&str>,
    depth: usize,
) -> Value {
    let min = obj.get("minItems").and_then(Value::as_u64).unwrap_or(0);
    let max = obj
        .get("maxItems")
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let wanted = rng.range(2, 4).clamp(min, max.max(min));
    let items = obj.get("items").cloned().unwrap_or(Value::Bool(true));
    let unique = obj.get("uniqueItems").and_then(Value::as_bool) == Some(true);
    let mut out: Vec<Value> = Vec::new();
    if depth >= MAX_DEPTH {
        return Value::Array(out);
    }
    // Unique items may need several draws (e.g. from a small enum); give up on extras rather
    // than loop forever, but always honour `minItems` when the schema allows it at all.
    let mut attempts = 0;
    while (out.len() as u64) < wanted && attempts < wanted * 10 + 10 {
        attempts += 1;
        let value = from_schema(rng, &items, root, topics, key, depth + 1);
        if unique && out.contains(&value) {
            continue;
        }
        out.push(value);
    }
    Value::Array(out)
}

fn bounds(obj: &Map<String, Value>, default_lo: f64, default_hi: f64) -> (f64, f64, bool, bool) {
    let f = |k: &str| obj.get(k).and_then(Value::as_f64);
    // Draft 4 spells exclusivity as booleans next to minimum/maximum; later drafts as numbers.
    let (lo, lo_excl) = match (f("minimum"), f("exclusiveMinimum")) {
        (_, Some(x)) => (x, true),
        (Some(m), None) => (m, obj.get("exclusiveMinimum") == Some(&Value::Bool(true))),
        (None, None) => (default_lo, false),
    };
    let (hi, hi_excl) = match (f("maximum"), f("exclusiveMaximum")) {
        (_, Some(x)) => (x, true),
        (Some(m), None) => (m, obj.get("exclusiveMaximum") == Some(&Value::Bool(true))),
        (None, None) => (default_hi.max(lo + 1.0), false),
    };
    (lo, hi, lo_excl, hi_excl)
}

fn integer(rng: &mut Rng, obj: &Map<String, Value>) -> Value {
    let (lo, hi, lo_excl, hi_excl) = bounds(obj, 1.0, 100.0);
    let mut lo = if lo_excl {
        lo.floor() as i64 + 1
    } else {
        lo.ceil() as i64
    };
    let mut hi = if hi_excl {
        hi.ceil() as i64 - 1
    } else {
        hi.floor() as i64
    };
    if hi < lo {
        hi = lo;
    }
    if let Some(step) = obj
        .get("multipleOf")
        .and_then(Value::as_i64)
        .filter(|s| *s > 0)
    {
        lo = lo.div_euclid(step) * step + if lo.rem_euclid(step) == 0 { 0 } else { step };
        let count = ((hi - lo) / step).max(0) as u64;
        return Value::from(lo + rng.range(0, count) as i64 * step);
    }
    let span = (hi - lo) as u64;
    Value::from(lo + rng.range(0, span) as i64)
}

fn number(rng: &mut Rng, obj: &Map<String, Value>) -> Value {
    let (lo, hi, _, _) = bounds(obj, 0.0, 100.0);
    // Stay strictly inside the bounds so exclusive limits hold, and round to two decimals
    // without leaving the interval.
    let x = lo + (hi - lo) * (0.05 + 0.9 * rng.f64());
    let rounded = (x * 100.0).round() / 100.0;
    let value = if rounded > lo && rounded < hi {
        rounded
    } else {
        x
    };
    serde_json::Number::from_f64(value).map_or(Value::from(0), Value::Number)
}

const FONTS: &[&str] = &[
    "Inter",
    "Source Serif 4",
    "IBM Plex Sans",
    "Lora",
    "Work Sans",
    "Merriweather",
    "Manrope",
];
const NAME_WORDS: &[&str] = &[
    "North", "Bright", "Harbor", "Maple", "Cedar", "Summit", "Lumen", "Field", "Atlas", "Juniper",
];

fn string(rng: &mut Rng, obj: &Map<String, Value>, topics: &[String], key: Option<&str>) -> String {
    let key = key.unwrap_or("").to_ascii_lowercase();
    let pattern = obj.get("pattern").and_then(Value::as_str).unwrap_or("");
    let format = obj.get("format").and_then(Value::as_str).unwrap_or("");
    let hex_pattern = pattern.contains('#')
        && (pattern.contains("0-9a-fA-F")
            || pattern.contains("0-9A-Fa-f")
            || pattern.contains("0-9a-f"));
    let mut s = if hex_pattern
        || (pattern.is_empty() && (key.contains("color") || key.contains("colour")))
    {
        let digits = if pattern.contains("{3}") && !pattern.contains("{6}") {
            3
        } else {
            6
        };
        let v = rng.next_u64();
        let hex = format!("{v:016X}");
        format!("#{}", &hex[..digits])
    } else {
        match format {
            "email" => format!("{}@example.com", slug(rng, topics)),
            "uri" | "url" | "uri-reference" => format!("https://example.com/{}", slug(rng, topics)),
            "date-time" => format!(
                "2026-{:02}-{:02}T{:02}:{:02}:00Z",
                rng.range(1, 12),
                rng.range(1, 28),
                rng.range(0, 23),
                rng.range(0, 59)
            ),
            "date" => format!("2026-{:02}-{:02}", rng.range(1, 12), rng.range(1, 28)),
            "time" => format!("{:02}:{:02}:00Z", rng.range(0, 23), rng.range(0, 59)),
            "uuid" => {
                let (a, b) = (rng.next_u64(), rng.next_u64());
                format!(
                    "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
                    a >> 32,
                    (a >> 16) & 0xffff,
                    a & 0xfff,
                    b >> 52,
                    b & 0xffff_ffff_ffff
                )
            }
            _ if key.contains("font") => (*rng.pick(FONTS)).to_owned(),
            _ if key.contains("name") || key.contains("title") || key.contains("headline") => {
                format!(
                    "{} {}",
                    rng.pick(NAME_WORDS),
                    title_case(&phrase(rng, topics, 1))
                )
            }
            _ if [
                "description",
                "summary",
                "content",
                "text",
                "body",
                "reason",
                "explanation",
            ]
            .iter()
            .any(|k| key.contains(k)) =>
            {
                let topic = topic(rng, topics);
                sentence(rng, &topic)
            }
            _ => {
                let words = rng.range(2, 5) as usize;
                phrase(rng, topics, words)
            }
        }
    };
    let min = obj.get("minLength").and_then(Value::as_u64).unwrap_or(0) as usize;
    let max = obj
        .get("maxLength")
        .and_then(Value::as_u64)
        .map(|m| m as usize);
    while s.chars().count() < min {
        s.push_str(if s.is_empty() { "note" } else { " note" });
    }
    if let Some(max) = max
        && s.chars().count() > max
    {
        s = s
            .chars()
            .take(max)
            .collect::<String>()
            .trim_end()
            .to_owned();
        while s.chars().count() < min {
            s.push('x');
        }
    }
    s
}

fn topic(rng: &mut Rng, topics: &[String]) -> String {
    if topics.is_empty() {
        (*rng.pick(DEFAULT_TOPICS)).to_owned()
    } else {
        rng.pick(topics).clone()
    }
}

fn phrase(rng: &mut Rng, topics: &[String], words: usize) -> String {
    let mut out: Vec<String> = Vec::new();
    for i in 0..words.max(1) {
        let w = match (i, rng.range(0, 2)) {
            (0, _) => (*rng.pick(ADJECTIVES)).to_owned(),
            (_, 0) if !topics.is_empty() => rng.pick(topics).clone(),
            _ => (*rng.pick(NOUNS)).to_owned(),
        };
        out.push(w);
    }
    let mut s = out.join(" ");
    if let Some(first) = s.get(..1) {
        s = first.to_ascii_uppercase() + &s[1..];
    }
    s
}

fn title_case(s: &str) -> String {
    s.split(' ')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn slug(rng: &mut Rng, topics: &[String]) -> String {
    topic(rng, topics)
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>()
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prose_is_deterministic_readable_and_on_topic() {
        let a = prose(
            &mut Rng::new(7),
            "How should I price my bakery subscriptions?",
            80,
        );
        let b = prose(
            &mut Rng::new(7),
            "How should I price my bakery subscriptions?",
            80,
        );
        let c = prose(
            &mut Rng::new(8),
            "How should I price my bakery subscriptions?",
            80,
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(
            a.contains("bakery") || a.contains("subscriptions") || a.contains("price"),
            "{a}"
        );
        let n = count_tokens(&a);
        assert!((75..=80).contains(&n), "{n} tokens: {a}");
        assert!(!a.to_lowercase().contains("lorem"));
    }

    #[test]
    fn a_continuation_is_found_and_answered_from_the_canonical_text() {
        use keyvex_engine::provider::ChatMessage;
        let canonical = "A savings calculator adds up what a freelancer sets aside each month.";
        let asked = vec![ChatMessage::user("Describe a savings calculator.")];
        let sent = &canonical[..30];
        let prompt = |messages: &[ChatMessage]| -> Option<String> {
            let p = Prompt {
                model: "m",
                system: None,
                messages,
                schema: None,
            };
            let c = continuation(&p)?;
            assert_eq!(c.original.messages, &asked[..]);
            c.rest(canonical)
        };
        // A prefill: exactly the rest.
        let mut prefilled = asked.clone();
        prefilled.push(ChatMessage::assistant(sent));
        assert_eq!(prompt(&prefilled).unwrap(), &canonical[30..]);
        // The instruction: the rest, with the last words said again.
        let mut instructed = asked.clone();
        instructed.push(ChatMessage::assistant(sent));
        instructed.push(ChatMessage::user(
            keyvex_engine::router::CONTINUE_INSTRUCTION,
        ));
        let rest = prompt(&instructed).unwrap();
        assert!(rest.len() > canonical.len() - 30 + 8, "{rest:?}");
        assert!(canonical.ends_with(&rest));
        // A plain conversation is not a continuation.
        let p = Prompt {
            model: "m",
            system: None,
            messages: &asked,
            schema: None,
        };
        assert!(continuation(&p).is_none());
    }

    #[test]
    fn pieces_rejoin_and_prefixes_respect_the_limit() {
        let text = "Hello, world! {\"a\": [1, 2]} and more   spaces.\n\nNew paragraph.";
        let pieces = split_pieces(text);
        assert_eq!(pieces.concat(), text);
        for limit in 0..12 {
            let n = longest_prefix_within(&pieces, limit);
            assert!(count_tokens(&pieces[..n].concat()) <= limit);
        }
        let chunks = chunk(&mut Rng::new(1), &pieces);
        assert_eq!(chunks.concat(), text);
    }

    #[test]
    fn schema_values_validate() {
        let schema = json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 3, "maxLength": 40},
                "primaryColor": {"type": "string", "pattern": "^#[0-9a-fA-F]{6}$"},
                "tone": {"enum": ["warm", "bold", "calm"]},
                "score": {"type": "number", "minimum": 0, "maximum": 1},
                "count": {"type": "integer", "minimum": 3, "exclusiveMaximum": 5},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 5, "maxItems": 6},
                "site": {"type": "string", "format": "uri"},
                "maybe": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/step"}]},
                "steps": {"type": "array", "items": {"$ref": "#/$defs/step"}, "minItems": 1},
                "flag": {"type": ["boolean", "null"]}
            },
            "required": ["name", "primaryColor", "tone", "score", "count", "tags", "steps"],
            "additionalProperties": false,
            "$defs": {"step": {"type": "object", "properties": {
                "title": {"type": "string"}, "order": {"type": "integer", "minimum": 1}},
                "required": ["title", "order"], "additionalProperties": false}}
        });
        for seed in 0..50 {
            let value = from_schema(
                &mut Rng::new(seed),
                &schema,
                &schema,
                &topics("a coffee shop"),
                None,
                0,
            );
            assert!(
                jsonschema::is_valid(&schema, &value),
                "seed {seed}: {value}"
            );
        }
    }
}
