//! Realistic, schema-valid example outputs for each agent, deterministic by seed.
//!
//! The provider simulator answers with these so the whole pipeline runs offline through the same
//! code path as real providers. Samples read what they can from the prompt (`hint`): the
//! business and industry, the concept's name and type, the logic JSON between `<logic>` tags and
//! any brand colours. So a simulated pipeline is coherent end to end: Content Crafter's sample
//! labels exactly the inputs and bands that Logic Architect's sample declared.

use serde_json::{Value, json};

use crate::Process;
use crate::content_crafter::{
    InputCopy, LeadField, LeadFieldKind, LeadForm, ResultMessage, ToolContent,
};
use crate::logic_architect::{
    self, Band, FormulaDef, InputDef, InputKind, ScoreDef, ScoreDisplay, SelectOption, ToolLogic,
};
use crate::magic_spark::{BusinessContext, Concept, MagicSparkOutput, ToolType};
use crate::output::process_for_schema;
use crate::style_master::{
    ComponentStyle, Components, Layout, LayoutMode, Palette, Shadow, ToolStyle, Typography,
    contrast, parse_hex,
};

/// splitmix64: tiny, fast and good enough to vary samples; no `rand` dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// `k` distinct indexes below `n`, in random order (partial Fisher–Yates).
    fn distinct(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        for i in 0..k.min(n) {
            let j = i + self.below(n - i);
            idx.swap(i, j);
        }
        idx.truncate(k.min(n));
        idx
    }
}

/// A sample output for the response schema called `schema_name`, or `None` when the name is not
/// one of the agents' schemas. `hint` is the user prompt, so samples can echo the business.
pub fn sample_output(schema_name: &str, seed: u64, hint: &str) -> Option<Value> {
    let process = process_for_schema(schema_name)?;
    let mut rng = Rng::new(seed);
    let value = match process {
        Process::MagicSpark => serde_json::to_value(spark(&mut rng, hint)),
        Process::LogicArchitect => {
            let tool_type =
                field(hint, "Type:").and_then(|t| serde_json::from_value(json!(t)).ok());
            serde_json::to_value(logic(&mut rng, tool_type))
        }
        Process::ContentCrafter => {
            let logic = section(hint, "logic")
                .and_then(|j| serde_json::from_str::<ToolLogic>(j).ok())
                .unwrap_or_else(|| logic(&mut rng, None));
            serde_json::to_value(content(&mut rng, hint, &logic))
        }
        Process::StyleMaster => serde_json::to_value(style(&mut rng, hint)),
    };
    value.ok()
}

/// A valid input for `process`, deterministic by seed (for tests, benches and load tests).
pub fn sample_input(process: Process, seed: u64) -> Value {
    let mut rng = Rng::new(seed.wrapping_mul(31).wrapping_add(7));
    let business = business(&mut rng);
    let business_value = serde_json::to_value(&business).unwrap_or(Value::Null);
    if process == Process::MagicSpark {
        return business_value;
    }
    let hint = format!(
        "Business: {}\nIndustry: {}",
        business.business_description, business.industry
    );
    let spark = spark(&mut rng, &hint);
    let concept = spark.concepts.into_iter().next();
    let tool_type = concept.as_ref().map(|c| c.tool_type);
    let concept = serde_json::to_value(concept).unwrap_or(Value::Null);
    if process == Process::LogicArchitect {
        return json!({ "business": business_value, "concept": concept });
    }
    let logic = serde_json::to_value(logic(&mut rng, tool_type)).unwrap_or(Value::Null);
    match process {
        Process::ContentCrafter => {
            json!({ "business": business_value, "concept": concept, "logic": logic })
        }
        _ => {
            let brand = if seed % 2 == 1 {
                json!({ "colors": [rng.pick(&["#1D4ED8", "#0F766E", "#B91C1C", "#7E22CE", "#FACC15"])], "mood": rng.pick(&["calm and trustworthy", "bold and energetic", "warm and friendly"]) })
            } else {
                Value::Null
            };
            json!({ "business": business_value, "concept": concept, "logic": logic, "brand": brand })
        }
    }
}

/// The text between `<tag>` and `</tag>`, trimmed.
fn section<'a>(hint: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = hint.find(&open)? + open.len();
    let end = start + hint[start..].find(&close)?;
    Some(hint[start..end].trim())
}

/// The rest of the first line starting with `label`, trimmed.
fn field<'a>(hint: &'a str, label: &str) -> Option<&'a str> {
    hint.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

fn title_case(s: &str) -> String {
    s.split_whitespace()
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

const BUSINESSES: [(&str, &str, &str); 5] = [
    (
        "A residential solar installer serving homeowners in Arizona",
        "Homeowners with high summer electricity bills",
        "solar energy",
    ),
    (
        "A bookkeeping firm for independent restaurants",
        "Restaurant owners with 1 to 3 locations",
        "accounting",
    ),
    (
        "A B2B SaaS that automates employee onboarding",
        "HR managers at companies with 50 to 500 staff",
        "HR software",
    ),
    (
        "A physiotherapy clinic specialising in running injuries",
        "Recreational runners training for races",
        "healthcare",
    ),
    (
        "A boutique agency running paid social campaigns for e-commerce brands",
        "Founders of direct-to-consumer stores",
        "digital marketing",
    ),
];

fn business(rng: &mut Rng) -> BusinessContext {
    let (description, audience, industry) = *rng.pick(&BUSINESSES);
    BusinessContext {
        business_description: description.to_owned(),
        target_audience: audience.to_owned(),
        industry: industry.to_owned(),
        constraints: (rng.below(2) == 0)
            .then(|| "No guaranteed outcomes; keep it under two minutes.".to_owned()),
    }
}

/// (type, name pattern, value proposition, key inputs, hook); `{i}` is the industry.
type ConceptTemplate = (
    ToolType,
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static str,
);

const CONCEPTS: [ConceptTemplate; 8] = [
    (
        ToolType::Calculator,
        "{i} Savings Calculator",
        "Shows in under a minute how much a typical customer saves per year, based on their own numbers.",
        &["current monthly spend", "team size", "hours spent per week"],
        "Email me the detailed savings breakdown.",
    ),
    (
        ToolType::Calculator,
        "{i} ROI Estimator",
        "Estimates the return on investment and payback period before the visitor commits to anything.",
        &["upfront budget", "expected monthly gain", "time horizon"],
        "Get a personalised ROI report with next steps.",
    ),
    (
        ToolType::Quiz,
        "Which {i} Plan Fits You?",
        "A five-question quiz that matches the visitor to the right package for their situation.",
        &["goals", "current setup", "budget range", "timeline"],
        "Send me my matched plan and a sample proposal.",
    ),
    (
        ToolType::Quiz,
        "{i} Readiness Quiz",
        "Tells visitors how ready they are to take the next step and what to fix first.",
        &["current practices", "tools in use", "team experience"],
        "Get the readiness checklist for your score.",
    ),
    (
        ToolType::Assessment,
        "{i} Maturity Assessment",
        "Scores the visitor's current practices against peers and highlights the biggest gaps.",
        &[
            "documented processes",
            "response time",
            "tooling",
            "repeat business",
        ],
        "Book a free review of your results with a specialist.",
    ),
    (
        ToolType::Assessment,
        "{i} Risk Check",
        "A short health check that flags the risks most often missed in this industry.",
        &["compliance steps", "backup routines", "staff training"],
        "Receive the full risk report with fixes ranked by impact.",
    ),
    (
        ToolType::Calculator,
        "{i} Cost-of-Waiting Calculator",
        "Puts a number on what delaying the decision costs each month.",
        &[
            "monthly cost today",
            "expected improvement",
            "months of delay",
        ],
        "See how fast you could start: get a tailored timeline.",
    ),
    (
        ToolType::Quiz,
        "{i} Myth or Fact Challenge",
        "A playful quiz that busts common myths and shows what actually drives results.",
        &["answers to six statements", "experience level"],
        "Unlock the expert guide that explains every answer.",
    ),
];

fn spark(rng: &mut Rng, hint: &str) -> MagicSparkOutput {
    let industry = field(hint, "Industry:").unwrap_or("Business");
    let industry = title_case(industry);
    let count = 3 + rng.below(3);
    let concepts = rng
        .distinct(CONCEPTS.len(), count)
        .into_iter()
        .map(|i| {
            let (tool_type, name, value, inputs, hook) = CONCEPTS[i];
            Concept {
                name: name.replace("{i}", &industry),
                tool_type,
                value_proposition: value.to_owned(),
                key_inputs: inputs.iter().map(|s| (*s).to_owned()).collect(),
                lead_capture_hook: hook.to_owned(),
            }
        })
        .collect();
    MagicSparkOutput { concepts }
}

/// A ranged input; `range` is (min, max, step).
fn ranged(
    name: &str,
    label: &str,
    kind: InputKind,
    unit: Option<&str>,
    (min, max, step): (f64, f64, f64),
    default: f64,
) -> InputDef {
    InputDef {
        name: name.to_owned(),
        label: label.to_owned(),
        kind,
        unit: unit.map(str::to_owned),
        min: Some(min),
        max: Some(max),
        step: Some(step),
        options: None,
        default,
    }
}

fn select(name: &str, label: &str, options: &[(&str, f64)], default_index: usize) -> InputDef {
    InputDef {
        name: name.to_owned(),
        label: label.to_owned(),
        kind: InputKind::Select,
        unit: None,
        min: None,
        max: None,
        step: None,
        options: Some(
            options
                .iter()
                .map(|(l, v)| SelectOption {
                    label: (*l).to_owned(),
                    value: *v,
                })
                .collect(),
        ),
        default: options.get(default_index).map(|o| o.1).unwrap_or(0.0),
    }
}

fn boolean(name: &str, label: &str, default: bool) -> InputDef {
    InputDef {
        name: name.to_owned(),
        label: label.to_owned(),
        kind: InputKind::Boolean,
        unit: None,
        min: None,
        max: None,
        step: None,
        options: None,
        default: if default { 1.0 } else { 0.0 },
    }
}

const QUIZ_QUESTIONS: [(&str, &str); 6] = [
    (
        "goalClarity",
        "How clear are your goals for the next 12 months?",
    ),
    ("currentSetup", "How would you describe your current setup?"),
    ("budgetFit", "How settled is your budget?"),
    ("timeline", "When do you want to see results?"),
    ("teamSupport", "How involved is your team?"),
    ("pastExperience", "Have you tried something similar before?"),
];

fn logic(rng: &mut Rng, tool_type: Option<ToolType>) -> ToolLogic {
    let tool_type = tool_type.unwrap_or(*rng.pick(&[
        ToolType::Calculator,
        ToolType::Quiz,
        ToolType::Assessment,
    ]));
    let mut logic = match tool_type {
        ToolType::Calculator => {
            let max_hours = *rng.pick(&[20.0, 40.0, 60.0]);
            let max_rate = *rng.pick(&[150.0, 250.0, 400.0]);
            ToolLogic {
                inputs: vec![
                    ranged(
                        "hoursPerWeek",
                        "Hours spent on the task each week",
                        InputKind::Number,
                        Some("hours/week"),
                        (1.0, max_hours, 1.0),
                        8.0,
                    ),
                    ranged(
                        "hourlyCost",
                        "Cost of one hour of staff time",
                        InputKind::Currency,
                        Some("$"),
                        (15.0, max_rate, 5.0),
                        45.0,
                    ),
                    ranged(
                        "automationShare",
                        "Share of the work that can be automated",
                        InputKind::Percentage,
                        Some("%"),
                        (10.0, 90.0, 5.0),
                        40.0,
                    ),
                    ranged(
                        "teamSize",
                        "People doing this work",
                        InputKind::Integer,
                        Some("people"),
                        (1.0, 25.0, 1.0),
                        3.0,
                    ),
                ],
                formulas: vec![FormulaDef {
                    name: "hoursSavedPerWeek".into(),
                    label: "Hours saved per week".into(),
                    expression: "hoursPerWeek * automationShare / 100 * teamSize".into(),
                    unit: Some("hours/week".into()),
                }],
                score: ScoreDef {
                    label: "Estimated annual savings".into(),
                    expression: "round(hoursSavedPerWeek * hourlyCost * 48)".into(),
                    unit: Some("$".into()),
                    display: ScoreDisplay::Currency,
                    higher_is_better: true,
                },
                bands: Vec::new(),
            }
        }
        ToolType::Quiz => {
            let n = 4 + rng.below(3);
            let options = [
                ("Not at all", 0.0),
                ("A little", 1.0),
                ("Mostly", 2.0),
                ("Completely", 3.0),
            ];
            let inputs: Vec<InputDef> = QUIZ_QUESTIONS
                .iter()
                .take(n)
                .map(|(name, label)| select(name, label, &options, rng.below(4)))
                .collect();
            let expression = inputs
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(" + ");
            ToolLogic {
                inputs,
                formulas: Vec::new(),
                score: ScoreDef {
                    label: "Readiness score".into(),
                    expression,
                    unit: Some("points".into()),
                    display: ScoreDisplay::Points,
                    higher_is_better: true,
                },
                bands: Vec::new(),
            }
        }
        ToolType::Assessment => ToolLogic {
            inputs: vec![
                boolean(
                    "documentedProcess",
                    "We have a written, shared process",
                    rng.below(2) == 0,
                ),
                boolean("usesCrm", "We track every lead in a CRM", false),
                select(
                    "responseTime",
                    "How fast do you answer a new enquiry?",
                    &[
                        ("Within an hour", 30.0),
                        ("Same day", 20.0),
                        ("Next day", 10.0),
                        ("Longer", 0.0),
                    ],
                    1,
                ),
                ranged(
                    "repeatRate",
                    "Customers who buy again",
                    InputKind::Percentage,
                    Some("%"),
                    (0.0, 100.0, 5.0),
                    30.0,
                ),
            ],
            formulas: vec![FormulaDef {
                name: "habitsScore".into(),
                label: "Operational habits".into(),
                expression: "documentedProcess * 20 + usesCrm * 15".into(),
                unit: Some("points".into()),
            }],
            score: ScoreDef {
                label: "Maturity score".into(),
                expression: "round(habitsScore + responseTime + repeatRate * 0.35)".into(),
                unit: Some("/100".into()),
                display: ScoreDisplay::Points,
                higher_is_better: true,
            },
            bands: Vec::new(),
        },
    };
    let (_, range) = logic_architect::validate(&logic);
    let (lo, hi) = range.map(|r| (r.min, r.max)).unwrap_or((0.0, 100.0));
    let names: &[(&str, &str)] = if rng.below(2) == 0 {
        &[
            ("low", "Just getting started"),
            ("moderate", "Solid foundation"),
            ("high", "Ahead of the pack"),
        ]
    } else {
        &[
            ("low", "Big opportunity"),
            ("developing", "Room to grow"),
            ("strong", "Strong position"),
            ("leading", "Best in class"),
        ]
    };
    logic.bands = bands(lo, hi, names);
    logic
}

/// Contiguous bands splitting `lo..=hi` evenly, on whole numbers when the range allows.
fn bands(lo: f64, hi: f64, names: &[(&str, &str)]) -> Vec<Band> {
    let n = names.len();
    let whole = hi - lo >= 2.0 * n as f64;
    let mut edges: Vec<f64> = (0..=n)
        .map(|k| lo + (hi - lo) * k as f64 / n as f64)
        .collect();
    if whole {
        edges = edges.into_iter().map(f64::round).collect();
        edges[0] = lo.floor();
        edges[n] = hi.ceil();
    }
    if hi <= lo {
        edges = (0..=n).map(|k| lo + k as f64).collect();
    }
    names
        .iter()
        .enumerate()
        .map(|(k, (id, label))| Band {
            id: (*id).to_owned(),
            label: (*label).to_owned(),
            min: edges[k],
            max: edges[k + 1],
        })
        .collect()
}

fn content(rng: &mut Rng, hint: &str, logic: &ToolLogic) -> ToolContent {
    let name = field(hint, "Name:").unwrap_or("Your Personal Score");
    let audience = field(hint, "Target audience:").unwrap_or("you");
    let inputs = logic
        .inputs
        .iter()
        .map(|i| InputCopy {
            name: i.name.clone(),
            label: i.label.clone(),
            help_text: match i.kind {
                InputKind::Select => "Pick the answer closest to your situation today.".to_owned(),
                InputKind::Boolean => {
                    "Answer yes only if this is true most of the time.".to_owned()
                }
                _ => format!(
                    "A rough estimate is fine{}.",
                    i.unit
                        .as_deref()
                        .map(|u| format!(" (in {u})"))
                        .unwrap_or_default()
                ),
            },
        })
        .collect();
    let last = logic.bands.len().saturating_sub(1);
    let result_messages = logic
        .bands
        .iter()
        .enumerate()
        .map(|(k, b)| ResultMessage {
            band_id: b.id.clone(),
            headline: b.label.clone(),
            message: if k == last {
                "You are already ahead of most of your peers. A short review could show where the next gains are hiding.".to_owned()
            } else if k == 0 {
                "There is a lot of room to improve, which is good news: the first steps usually bring the biggest wins.".to_owned()
            } else {
                "You have the basics in place. A few targeted changes would move you into the top group.".to_owned()
            },
        })
        .collect();
    let intros = [
        "Answer a few quick questions and get a personal result in under two minutes.",
        "Built for {a}: see where you stand and what to do next.",
    ];
    ToolContent {
        title: name.chars().take(80).collect(),
        subtitle: format!("A free tool for {}", audience.to_lowercase()),
        intro: rng.pick(&intros).replace("{a}", &audience.to_lowercase()),
        inputs,
        result_messages,
        call_to_action: rng.pick(&["Get my full report", "Talk to a specialist", "Send me my results"]).to_string(),
        lead_form: LeadForm {
            headline: "Where should we send your detailed results?".to_owned(),
            fields: vec![
                LeadField { name: "firstName".into(), label: "First name".into(), kind: LeadFieldKind::Text, required: true },
                LeadField { name: "email".into(), label: "Work email".into(), kind: LeadFieldKind::Email, required: true },
            ],
            submit_label: "Send my results".to_owned(),
            privacy_note: "We use your details only to send your results and one follow-up; unsubscribe any time.".to_owned(),
        },
    }
}

/// (primary, secondary, accent, background, surface, text, mutedText, onPrimary)
type PaletteRow = [&'static str; 8];

const PALETTES: [PaletteRow; 6] = [
    [
        "#1D4ED8", "#0F766E", "#F59E0B", "#FFFFFF", "#F8FAFC", "#0F172A", "#475569", "#FFFFFF",
    ],
    [
        "#166534", "#65A30D", "#EAB308", "#FFFFFF", "#F7FEE7", "#1C1917", "#57534E", "#FFFFFF",
    ],
    [
        "#7E22CE", "#DB2777", "#F97316", "#FFFFFF", "#FAF5FF", "#1E1B4B", "#4B5563", "#FFFFFF",
    ],
    [
        "#38BDF8", "#A78BFA", "#FBBF24", "#0F172A", "#1E293B", "#F8FAFC", "#CBD5E1", "#0F172A",
    ],
    [
        "#B45309", "#0E7490", "#DC2626", "#FFFBEB", "#FFFFFF", "#292524", "#57534E", "#FFFFFF",
    ],
    [
        "#0F766E", "#1E40AF", "#F43F5E", "#F0FDFA", "#FFFFFF", "#134E4A", "#115E59", "#FFFFFF",
    ],
];

const FONTS: [(&str, &str); 4] = [
    (
        "Inter, system-ui, sans-serif",
        "Inter, system-ui, sans-serif",
    ),
    (
        "\"DM Serif Display\", Georgia, serif",
        "\"DM Sans\", system-ui, sans-serif",
    ),
    (
        "Poppins, system-ui, sans-serif",
        "\"Open Sans\", system-ui, sans-serif",
    ),
    (
        "Merriweather, Georgia, serif",
        "\"Source Sans 3\", system-ui, sans-serif",
    ),
];

fn style(rng: &mut Rng, hint: &str) -> ToolStyle {
    let row = rng.pick(&PALETTES);
    let mut palette = Palette {
        primary: row[0].into(),
        secondary: row[1].into(),
        accent: row[2].into(),
        background: row[3].into(),
        surface: row[4].into(),
        text: row[5].into(),
        muted_text: row[6].into(),
        on_primary: row[7].into(),
    };
    // Use the first brand colour as primary when some text colour reads on it.
    let brand = field(hint, "Brand colours:").and_then(|list| {
        list.split(',')
            .map(str::trim)
            .find_map(|c| parse_hex(c).map(|rgb| (c, rgb)))
    });
    if let Some((hex, rgb)) = brand {
        let best = ["#FFFFFF", "#111827"]
            .into_iter()
            .filter_map(|t| parse_hex(t).map(|trgb| (t, contrast(rgb, trgb))))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((on, ratio)) = best
            && ratio >= crate::style_master::MIN_CONTRAST
        {
            palette.primary = hex.to_uppercase();
            palette.on_primary = on.to_owned();
        }
    }
    let (heading, body) = *rng.pick(&FONTS);
    let radius = *rng.pick(&[4u32, 8, 12, 16]);
    let shadow = *rng.pick(&[Shadow::None, Shadow::Sm, Shadow::Md]);
    let mode = match field(hint, "Type:") {
        Some("quiz") | Some("assessment") => LayoutMode::Wizard,
        _ => *rng.pick(&[LayoutMode::SingleColumn, LayoutMode::TwoColumn]),
    };
    let component = |bg: &str, text: &str, border: &str, shadow: Shadow| ComponentStyle {
        background: bg.to_owned(),
        text: text.to_owned(),
        border: border.to_owned(),
        radius_px: radius,
        shadow,
    };
    let components = Components {
        button: component(
            &palette.primary,
            &palette.on_primary,
            &palette.primary,
            Shadow::Sm,
        ),
        input: component(
            &palette.surface,
            &palette.text,
            &palette.muted_text,
            Shadow::None,
        ),
        card: component(&palette.surface, &palette.text, &palette.surface, shadow),
        result: component(
            &palette.background,
            &palette.text,
            &palette.accent,
            Shadow::Md,
        ),
    };
    ToolStyle {
        typography: Typography {
            heading_font: heading.to_owned(),
            body_font: body.to_owned(),
            base_size_px: *rng.pick(&[15u32, 16, 17, 18]),
            scale: *rng.pick(&[1.2, 1.25, 1.333]),
            heading_weight: *rng.pick(&[600u32, 700, 800]),
        },
        layout: Layout {
            mode,
            max_width_px: *rng.pick(&[640u32, 720, 960]),
            spacing_px: *rng.pick(&[8u32, 12, 16]),
            radius_px: radius,
        },
        components,
        palette,
    }
}
