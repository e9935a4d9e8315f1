//! Money: exact cost of an attempt from its usage and the catalog's prices.
//!
//! Prices are published in USD per million tokens with at most six decimals, so one token costs
//! a whole number of picodollars (1e-12 USD): `USD/MTok × 1e6 = pico-USD/token`. Every sum here is
//! integer arithmetic; nothing is rounded until it is displayed or written as micro-dollars.

use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign};

use serde::{Deserialize, Serialize};

use crate::stream::Usage;

/// An exact amount of money in picodollars (1e-12 USD). `u64` holds up to about $18 million.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Cost(pub u64);

impl Cost {
    pub const ZERO: Cost = Cost(0);
    const PICO_PER_MICRO: u64 = 1_000_000;

    pub fn from_micro_usd(micro: u64) -> Cost {
        Cost(micro.saturating_mul(Self::PICO_PER_MICRO))
    }

    pub fn pico_usd(self) -> u64 {
        self.0
    }

    /// Micro-dollars, rounded half up (the unit stored in DynamoDB's `costMicroUsd`).
    pub fn micro_usd(self) -> u64 {
        self.0.saturating_add(Self::PICO_PER_MICRO / 2) / Self::PICO_PER_MICRO
    }

    /// Dollars as a float, for display and JSON consumers only.
    pub fn usd(self) -> f64 {
        self.0 as f64 / 1e12
    }
}

impl Add for Cost {
    type Output = Cost;
    fn add(self, rhs: Cost) -> Cost {
        Cost(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign for Cost {
    fn add_assign(&mut self, rhs: Cost) {
        *self = *self + rhs;
    }
}

impl Sum for Cost {
    fn sum<I: Iterator<Item = Cost>>(iter: I) -> Cost {
        iter.fold(Cost::ZERO, Add::add)
    }
}

impl fmt::Display for Cost {
    /// `$0.004215` — six decimals (micro-dollar precision), enough to tell requests apart.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let micro = self.micro_usd();
        write!(f, "${}.{:06}", micro / 1_000_000, micro % 1_000_000)
    }
}

/// A per-token price in picodollars (numerically equal to the USD-per-MTok price × 1e6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Price(pub u64);

impl Price {
    /// Converts a published `USD per million tokens` figure. Fails when it is negative, not
    /// finite, or finer than a millionth of a dollar per MTok (which no provider publishes).
    pub fn from_usd_per_mtok(usd: f64) -> Result<Price, String> {
        if !usd.is_finite() || usd < 0.0 {
            return Err(format!(
                "{usd} is not a price (must be a finite number >= 0)"
            ));
        }
        let scaled = usd * 1e6;
        let rounded = scaled.round();
        if (scaled - rounded).abs() > 1e-6 * scaled.max(1.0) {
            return Err(format!("{usd} has more than six decimals"));
        }
        if rounded > u64::MAX as f64 {
            return Err(format!("{usd} is too large"));
        }
        Ok(Price(rounded as u64))
    }

    pub fn usd_per_mtok(self) -> f64 {
        self.0 as f64 / 1e6
    }

    fn times(self, tokens: u64) -> Cost {
        Cost(self.0.saturating_mul(tokens))
    }
}

/// The prices of one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pricing {
    pub input: Price,
    pub cached_input: Price,
    /// `None` where the provider does not charge for cache writes (OpenAI): those tokens then
    /// cost the plain input price.
    pub cache_write: Option<Price>,
    pub output: Price,
}

/// The cost of one attempt. `usage` is normalised (see [`Usage`]): uncached input, cache reads,
/// cache writes and output are each billed at their own price.
pub fn cost(usage: &Usage, pricing: &Pricing) -> Cost {
    pricing.input.times(usage.uncached_input())
        + pricing.cached_input.times(usage.cached_input)
        + pricing
            .cache_write
            .unwrap_or(pricing.input)
            .times(usage.cache_write)
        + pricing.output.times(usage.output)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pricing(input: f64, cached: f64, write: Option<f64>, output: f64) -> Pricing {
        Pricing {
            input: Price::from_usd_per_mtok(input).unwrap(),
            cached_input: Price::from_usd_per_mtok(cached).unwrap(),
            cache_write: write.map(|w| Price::from_usd_per_mtok(w).unwrap()),
            output: Price::from_usd_per_mtok(output).unwrap(),
        }
    }

    #[test]
    fn prices_convert_exactly() {
        assert_eq!(Price::from_usd_per_mtok(0.02).unwrap(), Price(20_000));
        assert_eq!(Price::from_usd_per_mtok(0.075).unwrap(), Price(75_000));
        assert_eq!(Price::from_usd_per_mtok(3.75).unwrap(), Price(3_750_000));
        assert!(Price::from_usd_per_mtok(-1.0).is_err());
        assert!(Price::from_usd_per_mtok(f64::NAN).is_err());
        assert!(Price::from_usd_per_mtok(0.123_456_7).is_err());
    }

    #[test]
    fn openai_cached_tokens_are_inside_the_prompt() {
        // gpt-5.4: $2.50 in, $0.25 cached, $15 out. prompt_tokens=1000 of which 400 cached.
        let p = pricing(2.5, 0.25, None, 15.0);
        let u = Usage {
            input: 1000,
            cached_input: 400,
            cache_write: 0,
            output: 200,
        };
        // 600*2.5 + 400*0.25 + 200*15 = 1500 + 100 + 3000 = 4600 micro-USD
        assert_eq!(cost(&u, &p), Cost::from_micro_usd(4600));
        assert_eq!(cost(&u, &p).to_string(), "$0.004600");
    }

    #[test]
    fn anthropic_cache_reads_and_writes_have_their_own_prices() {
        // claude-sonnet: $3 in, $0.30 read, $3.75 write, $15 out.
        // Wire: input_tokens=12, cache_read=2048, cache_creation=100 → normalised input 2160.
        let p = pricing(3.0, 0.3, Some(3.75), 15.0);
        let u = Usage {
            input: 2160,
            cached_input: 2048,
            cache_write: 100,
            output: 15,
        };
        // 12*3 + 2048*0.3 + 100*3.75 + 15*15 = 36 + 614.4 + 375 + 225 = 1250.4 micro-USD
        assert_eq!(cost(&u, &p), Cost(1_250_400_000));
        assert_eq!(cost(&u, &p).micro_usd(), 1250);
    }

    #[test]
    fn tiny_prices_stay_exact() {
        let p = pricing(0.2, 0.02, None, 1.25);
        let u = Usage {
            input: 1,
            cached_input: 1,
            cache_write: 0,
            output: 1,
        };
        assert_eq!(cost(&u, &p), Cost(20_000 + 1_250_000));
    }
}
