//! Logic Architect: the tool's inputs, formulas, score and result bands, and their validation.
//!
//! Every input is numeric to the formulas (a boolean is 0/1, a select option carries a numeric
//! `value`, e.g. quiz points), so one small expression language covers calculators, quizzes and
//! assessments alike.

use std::collections::{HashMap, HashSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::Problems;
use crate::formula::{Expr, FUNCTIONS};
use crate::magic_spark::{BusinessContext, Concept};

/// The chosen concept plus the business it is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogicArchitectInput {
    pub business: BusinessContext,
    pub concept: Concept,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    Number,
    Integer,
    Currency,
    Percentage,
    Select,
    Boolean,
}

impl InputKind {
    /// Kinds entered as a number within `min..max`.
    pub fn is_ranged(self) -> bool {
        matches!(
            self,
            InputKind::Number | InputKind::Integer | InputKind::Currency | InputKind::Percentage
        )
    }
}

/// One choice of a `select` input; `value` is what formulas see.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SelectOption {
    pub label: String,
    pub value: f64,
}

/// One thing the visitor enters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InputDef {
    /// Identifier used in formulas: letters, digits and `_`, starting with a letter.
    #[schemars(regex(pattern = r"^[A-Za-z][A-Za-z0-9_]{0,39}$"))]
    pub name: String,
    pub label: String,
    pub kind: InputKind,
    /// Unit shown next to the field (`$`, `%`, `hours/week`), or null.
    pub unit: Option<String>,
    /// Required for number, integer, currency and percentage; null for select and boolean.
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub step: Option<f64>,
    /// Required (2 or more) for select; null otherwise.
    pub options: Option<Vec<SelectOption>>,
    /// Within min..max; for select one of the option values; for boolean 0 or 1.
    pub default: f64,
}

/// A named intermediate value. It may use inputs and formulas declared before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FormulaDef {
    #[schemars(regex(pattern = r"^[A-Za-z][A-Za-z0-9_]{0,39}$"))]
    pub name: String,
    pub label: String,
    /// Uses + - * / ( ), numbers, declared names, min(a,b,…), max(a,b,…), round(x[,digits]).
    pub expression: String,
    pub unit: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ScoreDisplay {
    Number,
    Currency,
    Percentage,
    Points,
}

/// The headline result the bands classify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScoreDef {
    pub label: String,
    pub expression: String,
    pub unit: Option<String>,
    pub display: ScoreDisplay,
    pub higher_is_better: bool,
}

/// A result band: `min <= score < max` (the last band also includes its `max`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Band {
    #[schemars(regex(pattern = r"^[A-Za-z][A-Za-z0-9_]{0,39}$"))]
    pub id: String,
    pub label: String,
    pub min: f64,
    pub max: f64,
}

/// Logic Architect's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolLogic {
    #[schemars(length(min = 1, max = 12))]
    pub inputs: Vec<InputDef>,
    #[schemars(length(max = 12))]
    pub formulas: Vec<FormulaDef>,
    pub score: ScoreDef,
    /// Sorted by `min`, contiguous, covering every score the inputs can produce.
    #[schemars(length(min = 2, max = 6))]
    pub bands: Vec<Band>,
}

/// Evaluating the score at every corner of the input box is capped so a hostile output cannot
/// make validation slow; 12 two-valued inputs is 4096 points.
const MAX_POINTS: usize = 8192;

pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 40
}

fn num(x: f64) -> String {
    // Integers print without a trailing `.0` so messages read like the model's own JSON.
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

impl InputDef {
    /// The values worth trying when estimating the score range: range ends, every option, 0/1.
    fn candidate_values(&self) -> Vec<f64> {
        let mut v = match self.kind {
            InputKind::Boolean => vec![0.0, 1.0],
            InputKind::Select => self.options.iter().flatten().map(|o| o.value).collect(),
            _ => [self.min, self.max].into_iter().flatten().collect(),
        };
        v.retain(|x| x.is_finite());
        v.sort_by(f64::total_cmp);
        v.dedup();
        if v.is_empty() {
            v.push(self.default);
        }
        v
    }
}

/// The range the score can take, estimated at the corners of the input box (every combination
/// of range ends, option values and 0/1). Exact for scores monotone in each input, which covers
/// calculators (sums, products, ratios of positive ranges) and additive quiz scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreRange {
    pub min: f64,
    pub max: f64,
}

/// Validates `logic` and, when the formulas are sound, returns the score range too.
pub fn validate(logic: &ToolLogic) -> (Problems, Option<ScoreRange>) {
    let mut p = Problems::new();
    let mut declared: Vec<&str> = Vec::new();
    let mut seen = HashSet::new();

    for (i, input) in logic.inputs.iter().enumerate() {
        let at = format!("logic.inputs[{i}]");
        check_name(&mut p, &format!("{at}.name"), &input.name, &mut seen);
        declared.push(&input.name);
        validate_input(&mut p, &at, input);
    }

    let mut parsed: Vec<(String, Expr)> = Vec::new();
    for (i, f) in logic.formulas.iter().enumerate() {
        let at = format!("logic.formulas[{i}]");
        check_name(&mut p, &format!("{at}.name"), &f.name, &mut seen);
        if let Some(expr) = check_expression(
            &mut p,
            &format!("{at}.expression"),
            &f.expression,
            &declared,
            &logic.formulas[i..],
        ) {
            parsed.push((f.name.clone(), expr));
        }
        declared.push(&f.name);
    }
    let score = check_expression(
        &mut p,
        "logic.score.expression",
        &logic.score.expression,
        &declared,
        &[],
    );
    if logic.score.label.trim().is_empty() {
        p.push("logic.score.label", "must not be empty");
    }

    let range = match score {
        Some(score) if parsed.len() == logic.formulas.len() => {
            score_range(&mut p, logic, &parsed, &score)
        }
        _ => None,
    };
    validate_bands(&mut p, &logic.bands, range);
    (p, range)
}

fn check_name<'a>(p: &mut Problems, at: &str, name: &'a str, seen: &mut HashSet<&'a str>) {
    if !is_identifier(name) {
        p.push(
            at,
            format!(
                "{name:?} is not an identifier (a letter, then letters, digits or _; at most 40)"
            ),
        );
    } else if FUNCTIONS.contains(&name) {
        p.push(
            at,
            format!("{name:?} is a function name; choose another name"),
        );
    }
    if !seen.insert(name) {
        p.push(
            at,
            format!("{name:?} is declared twice; input and formula names must be unique"),
        );
    }
}

fn check_expression(
    p: &mut Problems,
    at: &str,
    text: &str,
    declared: &[&str],
    later_formulas: &[FormulaDef],
) -> Option<Expr> {
    let expr = match Expr::parse(text) {
        Ok(e) => e,
        Err(e) => {
            p.push(at, format!("cannot parse {text:?}: {e}"));
            return None;
        }
    };
    let mut ok = true;
    for name in expr.references() {
        if declared.contains(&name) {
            continue;
        }
        ok = false;
        if later_formulas.iter().any(|f| f.name == name) {
            p.push(at, format!("uses `{name}` before it is declared; formulas may only use inputs and earlier formulas"));
        } else {
            p.push(
                at,
                format!(
                    "uses `{name}`, which is not a declared input or formula (declared: {})",
                    declared.join(", ")
                ),
            );
        }
    }
    ok.then_some(expr)
}

fn validate_input(p: &mut Problems, at: &str, input: &InputDef) {
    if input.label.trim().is_empty() {
        p.push(format!("{at}.label"), "must not be empty");
    }
    let d = input.default;
    if input.kind.is_ranged() {
        let (Some(min), Some(max)) = (input.min, input.max) else {
            p.push(
                at.to_owned(),
                format!("a {:?} input needs both min and max", input.kind).to_lowercase(),
            );
            return;
        };
        if min >= max {
            p.push(
                format!("{at}.min"),
                format!("min {} must be below max {}", num(min), num(max)),
            );
        }
        if let Some(step) = input.step
            && step <= 0.0
        {
            p.push(
                format!("{at}.step"),
                format!("step {} must be positive", num(step)),
            );
        }
        if input.options.as_ref().is_some_and(|o| !o.is_empty()) {
            p.push(
                format!("{at}.options"),
                "only select inputs have options; use null",
            );
        }
        if d < min || d > max {
            p.push(
                format!("{at}.default"),
                format!("{} is outside min..max {}..{}", num(d), num(min), num(max)),
            );
        }
        if input.kind == InputKind::Integer && d.fract() != 0.0 {
            p.push(
                format!("{at}.default"),
                format!("{} is not a whole number", num(d)),
            );
        }
        return;
    }
    match input.kind {
        InputKind::Boolean => {
            if d != 0.0 && d != 1.0 {
                p.push(
                    format!("{at}.default"),
                    format!("{} must be 0 or 1 for a boolean", num(d)),
                );
            }
        }
        _ => {
            let options = input.options.as_deref().unwrap_or_default();
            if options.len() < 2 {
                p.push(
                    format!("{at}.options"),
                    format!("a select needs at least 2 options, got {}", options.len()),
                );
            }
            let mut labels = HashSet::new();
            for (j, o) in options.iter().enumerate() {
                if !labels.insert(o.label.trim().to_lowercase()) {
                    p.push(
                        format!("{at}.options[{j}].label"),
                        format!("{:?} repeats an earlier option", o.label),
                    );
                }
            }
            if !options.is_empty() && !options.iter().any(|o| o.value == d) {
                let values: Vec<String> = options.iter().map(|o| num(o.value)).collect();
                p.push(
                    format!("{at}.default"),
                    format!(
                        "{} is not one of the option values {}",
                        num(d),
                        values.join(", ")
                    ),
                );
            }
        }
    }
}

fn score_range(
    p: &mut Problems,
    logic: &ToolLogic,
    formulas: &[(String, Expr)],
    score: &Expr,
) -> Option<ScoreRange> {
    let candidates: Vec<Vec<f64>> = logic
        .inputs
        .iter()
        .map(InputDef::candidate_values)
        .collect();
    let total = candidates
        .iter()
        .try_fold(1usize, |acc, c| acc.checked_mul(c.len()));
    let Some(total) = total.filter(|t| *t <= MAX_POINTS) else {
        p.push("logic.inputs", format!("too many input combinations to check the score range (limit {MAX_POINTS}); use fewer inputs or options"));
        return None;
    };
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    let mut index = vec![0usize; candidates.len()];
    for _ in 0..total {
        let mut vars: HashMap<&str, f64> = logic
            .inputs
            .iter()
            .zip(&candidates)
            .zip(&index)
            .map(|((input, values), i)| (input.name.as_str(), values[*i]))
            .collect();
        let mut failed = None;
        for (name, expr) in formulas {
            match expr.eval(&vars) {
                Ok(v) => {
                    vars.insert(name, v);
                }
                Err(e) => {
                    failed = Some((
                        format!(
                            "logic.formulas[{}].expression",
                            formulas.iter().position(|(n, _)| n == name).unwrap_or(0)
                        ),
                        e,
                    ));
                    break;
                }
            }
        }
        let result = match failed {
            Some(f) => Err(f),
            None => score
                .eval(&vars)
                .map_err(|e| ("logic.score.expression".to_owned(), e)),
        };
        match result {
            Ok(v) => {
                lo = lo.min(v);
                hi = hi.max(v);
            }
            Err((at, e)) => {
                let point: Vec<String> = logic
                    .inputs
                    .iter()
                    .map(|i| {
                        format!(
                            "{}={}",
                            i.name,
                            num(vars.get(i.name.as_str()).copied().unwrap_or(f64::NAN))
                        )
                    })
                    .collect();
                p.push(
                    at,
                    format!(
                        "{e} when {}; adjust the ranges or guard with max(x, 1)",
                        point.join(", ")
                    ),
                );
                return None;
            }
        }
        // Odometer over the candidate values.
        for (slot, values) in index.iter_mut().zip(&candidates) {
            *slot += 1;
            if *slot < values.len() {
                break;
            }
            *slot = 0;
        }
    }
    Some(ScoreRange { min: lo, max: hi })
}

fn validate_bands(p: &mut Problems, bands: &[Band], range: Option<ScoreRange>) {
    if bands.is_empty() {
        p.push("logic.bands", "at least one band is required");
        return;
    }
    let mut ids = HashSet::new();
    for (i, b) in bands.iter().enumerate() {
        let at = format!("logic.bands[{i}]");
        if !is_identifier(&b.id) {
            p.push(
                format!("{at}.id"),
                format!("{:?} is not an identifier", b.id),
            );
        }
        if !ids.insert(b.id.as_str()) {
            p.push(
                format!("{at}.id"),
                format!(
                    "{:?} is used by an earlier band; band ids must be unique",
                    b.id
                ),
            );
        }
        if b.label.trim().is_empty() {
            p.push(format!("{at}.label"), "must not be empty");
        }
        // JSON has no NaN, so `>=` is the full negation of `<` here.
        if b.min >= b.max {
            p.push(
                at.clone(),
                format!("min {} must be below max {}", num(b.min), num(b.max)),
            );
        }
    }
    for (i, pair) in bands.windows(2).enumerate() {
        let (a, b) = (&pair[0], &pair[1]);
        let at = format!("logic.bands[{}]", i + 1);
        if b.min < a.min {
            p.push(
                format!("{at}.min"),
                format!(
                    "bands must be sorted by min: {} comes after {}",
                    num(b.min),
                    num(a.min)
                ),
            );
        } else if b.min > a.max {
            p.push(
                format!("{at}.min"),
                format!(
                    "gap: the previous band ends at {} but this one starts at {}; make them equal",
                    num(a.max),
                    num(b.min)
                ),
            );
        } else if b.min < a.max {
            p.push(format!("{at}.min"), format!("overlap: this band starts at {} but the previous one ends at {}; make them equal", num(b.min), num(a.max)));
        }
    }
    if let Some(r) = range {
        let tol = 1e-9 * (1.0 + r.min.abs().max(r.max.abs()));
        let (first, last) = (&bands[0], &bands[bands.len() - 1]);
        if first.min > r.min + tol {
            p.push(
                "logic.bands[0].min",
                format!(
                    "{} leaves scores from {} uncovered; the score can reach {}..{}",
                    num(first.min),
                    num(r.min),
                    num(r.min),
                    num(r.max)
                ),
            );
        }
        if last.max < r.max - tol {
            p.push(
                format!("logic.bands[{}].max", bands.len() - 1),
                format!(
                    "{} leaves scores up to {} uncovered; the score can reach {}..{}",
                    num(last.max),
                    num(r.max),
                    num(r.min),
                    num(r.max)
                ),
            );
        }
    }
}
