//! Seeded, realistic request bodies: a small corpus of businesses, and the input of every route
//! built from it.
//!
//! Magic Spark and the pipeline take a business straight from the corpus. Logic Architect,
//! Content Crafter and Style Master need a concept (and logic) a previous stage produced; those
//! come from `agents::samples::sample_input`, which builds a consistent chain from a seed, with
//! the business replaced by a corpus entry so every route sees the same variety.

use agents::Process;
use serde_json::{Value, json};

/// One business: what a Keyvex customer types into the first form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Business {
    pub description: &'static str,
    pub audience: &'static str,
    pub industry: &'static str,
    pub constraints: Option<&'static str>,
}

const fn b(
    description: &'static str,
    audience: &'static str,
    industry: &'static str,
    constraints: Option<&'static str>,
) -> Business {
    Business {
        description,
        audience,
        industry,
        constraints,
    }
}

/// The corpus. Varied in length and domain so prompt sizes (and so cost) vary as in production.
pub const CORPUS: &[Business] = &[
    b(
        "A residential solar installer serving homeowners across Arizona and New Mexico",
        "homeowners with summer electricity bills over $250",
        "renewable energy",
        Some("must mention federal tax credits carefully"),
    ),
    b(
        "A boutique accounting firm that does bookkeeping and taxes for independent restaurants",
        "restaurant owners with 1-3 locations",
        "accounting",
        None,
    ),
    b(
        "An online Spanish tutoring marketplace matching learners with native-speaking teachers",
        "working adults preparing for travel or relocation",
        "education",
        None,
    ),
    b(
        "A B2B SaaS that automates accounts-payable approvals for mid-market companies",
        "finance controllers at companies with 200-2000 employees",
        "fintech",
        Some("no ROI promises above 30%"),
    ),
    b(
        "A dog-training studio offering puppy classes and behavioural coaching",
        "first-time dog owners in the suburbs",
        "pet services",
        None,
    ),
    b(
        "A commercial cleaning company for medical and dental offices",
        "practice managers responsible for compliance",
        "facility services",
        Some("must reference infection-control standards"),
    ),
    b(
        "A specialty coffee roaster selling subscriptions direct to consumers",
        "home espresso enthusiasts",
        "food and beverage",
        None,
    ),
    b(
        "An independent insurance broker focused on small-business liability coverage",
        "owners of contracting and trades businesses",
        "insurance",
        Some("no quotes or binding language"),
    ),
    b(
        "A physiotherapy clinic specialising in running injuries",
        "amateur runners training for half and full marathons",
        "healthcare",
        Some("no diagnosis; suggest seeing a clinician"),
    ),
    b(
        "A wedding photography studio working across the Pacific Northwest",
        "engaged couples planning a wedding 6-18 months out",
        "photography",
        None,
    ),
    b(
        "A managed IT provider for law firms with strict confidentiality needs",
        "managing partners of firms with 10-80 lawyers",
        "IT services",
        None,
    ),
    b(
        "A home-renovation contractor doing kitchens and bathrooms",
        "homeowners with a $30k-$120k renovation budget",
        "construction",
        None,
    ),
    b(
        "A nonprofit that runs coding bootcamps for people changing careers",
        "adults over 30 considering a move into software",
        "nonprofit education",
        None,
    ),
    b(
        "An e-commerce brand of refillable, plastic-free cleaning products",
        "eco-conscious households",
        "consumer goods",
        None,
    ),
    b(
        "A mortgage brokerage helping first-time buyers compare lenders",
        "renters aged 25-40 saving for a first home",
        "financial services",
        Some("must include a not-financial-advice note"),
    ),
    b(
        "A cybersecurity firm offering penetration tests and SOC 2 readiness",
        "CTOs of seed to Series B startups",
        "cybersecurity",
        None,
    ),
    b(
        "A yoga and pilates studio with hybrid online classes",
        "busy professionals who want short sessions",
        "fitness",
        None,
    ),
    b(
        "A craft brewery with a taproom and regional distribution",
        "bar and restaurant buyers",
        "beverages",
        None,
    ),
    b(
        "A senior home-care agency providing companionship and personal care",
        "adult children arranging care for a parent",
        "home care",
        Some("tone must be warm, never alarming"),
    ),
    b(
        "A logistics startup offering same-day delivery for local retailers",
        "independent shop owners competing with online giants",
        "logistics",
        None,
    ),
    b(
        "A language-learning app for kids aged 5-10",
        "parents who limit screen time",
        "edtech",
        None,
    ),
    b(
        "An architecture studio designing energy-efficient small homes",
        "owners of rural land planning a new build",
        "architecture",
        None,
    ),
    b(
        "A payroll service for agencies that employ seasonal workers",
        "HR leads at staffing agencies",
        "HR services",
        None,
    ),
    b(
        "A veterinary clinic with an emergency night service",
        "pet owners within 30 minutes' drive",
        "veterinary",
        None,
    ),
];

/// The business of request `seed`.
pub fn business(seed: u64) -> Business {
    let i = usize::try_from(seed % CORPUS.len() as u64).unwrap_or(0);
    CORPUS[i]
}

/// The business as the API's `BusinessContext` JSON.
pub fn business_json(seed: u64) -> Value {
    let b = business(seed);
    let mut v = json!({
        "businessDescription": b.description,
        "targetAudience": b.audience,
        "industry": b.industry,
    });
    if let Some(c) = b.constraints {
        v["constraints"] = json!(c);
    }
    v
}

/// The body of `POST /v1/agents/{process}` for request `seed`.
pub fn agent_body(process: Process, seed: u64) -> Value {
    let input = match process {
        Process::MagicSpark => business_json(seed),
        _ => {
            let mut input = agents::samples::sample_input(process, seed);
            if input.get("business").is_some() {
                input["business"] = business_json(seed);
            }
            input
        }
    };
    json!({ "input": input })
}

/// The body of `POST /v1/pipelines/tool` for request `seed`.
pub fn pipeline_body(seed: u64) -> Value {
    json!({ "business": business_json(seed) })
}

/// The body of a streaming `POST /v1/chat/completions` on `model` for request `seed`.
pub fn chat_body(model: &str, seed: u64) -> Value {
    let b = business(seed);
    json!({
        "model": model,
        "stream": true,
        "stream_options": { "include_usage": true },
        "max_completion_tokens": 400,
        "messages": [
            { "role": "system", "content": "You are a marketing strategist who writes concise, concrete answers." },
            { "role": "user", "content": format!(
                "Business: {}\nAudience: {}\nIndustry: {}\nSuggest three lead-capture ideas and say why each fits this audience.",
                b.description, b.audience, b.industry
            ) },
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_corpus_is_large_enough_and_every_agent_body_has_an_input() {
        assert!(CORPUS.len() >= 20);
        for p in Process::ALL {
            let body = agent_body(p, 3);
            assert!(body["input"].is_object(), "{p:?}: {body}");
        }
        assert_eq!(
            agent_body(Process::LogicArchitect, 3)["input"]["business"],
            business_json(3)
        );
    }
}
