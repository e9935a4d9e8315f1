//! Style Master: palette, typography, layout and component styles, with hex and WCAG contrast
//! checks.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::Problems;
use crate::logic_architect::ToolLogic;
use crate::magic_spark::{BusinessContext, Concept};

/// WCAG 2 AA minimum contrast for normal-size text.
pub const MIN_CONTRAST: f64 = 4.5;

/// Optional brand direction from the business.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BrandHints {
    /// Existing brand colours as `#RRGGBB`.
    #[serde(default)]
    pub colors: Vec<String>,
    /// A few words: "calm, trustworthy", "bold and playful".
    #[serde(default)]
    pub mood: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StyleMasterInput {
    pub business: BusinessContext,
    pub concept: Concept,
    pub logic: ToolLogic,
    #[serde(default)]
    pub brand: Option<BrandHints>,
}

/// A `#RRGGBB` colour as the schema writes it.
const HEX: &str = r"^#[0-9A-Fa-f]{6}$";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Palette {
    #[schemars(regex(pattern = HEX))]
    pub primary: String,
    #[schemars(regex(pattern = HEX))]
    pub secondary: String,
    #[schemars(regex(pattern = HEX))]
    pub accent: String,
    #[schemars(regex(pattern = HEX))]
    pub background: String,
    #[schemars(regex(pattern = HEX))]
    pub surface: String,
    /// Body text; must reach 4.5:1 on background and surface.
    #[schemars(regex(pattern = HEX))]
    pub text: String,
    /// Secondary text; must reach 4.5:1 on background.
    #[schemars(regex(pattern = HEX))]
    pub muted_text: String,
    /// Text on primary-coloured fills; must reach 4.5:1 on primary.
    #[schemars(regex(pattern = HEX))]
    pub on_primary: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Typography {
    /// CSS font-family list, e.g. "Inter, system-ui, sans-serif".
    pub heading_font: String,
    pub body_font: String,
    #[schemars(range(min = 12, max = 24))]
    pub base_size_px: u32,
    /// Modular type scale ratio between heading levels.
    #[schemars(range(min = 1.05, max = 1.8))]
    pub scale: f64,
    #[schemars(range(min = 300, max = 900))]
    pub heading_weight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum LayoutMode {
    SingleColumn,
    TwoColumn,
    Wizard,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Layout {
    pub mode: LayoutMode,
    #[schemars(range(min = 320, max = 1600))]
    pub max_width_px: u32,
    #[schemars(range(min = 2, max = 64))]
    pub spacing_px: u32,
    #[schemars(range(max = 48))]
    pub radius_px: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Shadow {
    None,
    Sm,
    Md,
    Lg,
}

/// One component's look; `text` must reach 4.5:1 on `background`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStyle {
    #[schemars(regex(pattern = HEX))]
    pub background: String,
    #[schemars(regex(pattern = HEX))]
    pub text: String,
    #[schemars(regex(pattern = HEX))]
    pub border: String,
    #[schemars(range(max = 48))]
    pub radius_px: u32,
    pub shadow: Shadow,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Components {
    pub button: ComponentStyle,
    pub input: ComponentStyle,
    pub card: ComponentStyle,
    pub result: ComponentStyle,
}

/// Style Master's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolStyle {
    pub palette: Palette,
    pub typography: Typography,
    pub layout: Layout,
    pub components: Components,
}

/// Parses `#RRGGBB` (either case) into its channels.
pub fn parse_hex(s: &str) -> Option<[u8; 3]> {
    let hex = s.strip_prefix('#')?;
    if hex.len() != 6 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let channel = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).ok();
    Some([channel(0)?, channel(2)?, channel(4)?])
}

/// WCAG 2 relative luminance.
pub fn luminance([r, g, b]: [u8; 3]) -> f64 {
    let lin = |c: u8| {
        let c = f64::from(c) / 255.0;
        if c <= 0.04045 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    };
    0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b)
}

/// WCAG 2 contrast ratio between two colours (1.0 ..= 21.0).
pub fn contrast(a: [u8; 3], b: [u8; 3]) -> f64 {
    let (la, lb) = (luminance(a), luminance(b));
    let (hi, lo) = if la > lb { (la, lb) } else { (lb, la) };
    (hi + 0.05) / (lo + 0.05)
}

/// Checks hex colours in brand hints (part of input validation).
pub fn validate_brand(brand: &BrandHints) -> Result<(), String> {
    for (i, c) in brand.colors.iter().enumerate() {
        if parse_hex(c).is_none() {
            return Err(format!(
                "brand.colors[{i}]: {c:?} is not a #RRGGBB hex colour"
            ));
        }
    }
    Ok(())
}

/// Reports `fg` on `bg` when their contrast is below [`MIN_CONTRAST`]; unparsable colours are
/// reported elsewhere.
fn pair(p: &mut Problems, fg_path: String, fg: &str, bg_path: &str, bg: &str) {
    let (Some(f), Some(b)) = (parse_hex(fg), parse_hex(bg)) else {
        return;
    };
    let ratio = contrast(f, b);
    if ratio < MIN_CONTRAST {
        p.push(
            fg_path,
            format!("{fg} on {bg_path} {bg} has contrast {ratio:.2}:1, below the WCAG AA minimum {MIN_CONTRAST}:1; darken or lighten one of them"),
        );
    }
}

/// Checks beyond the schema; paths start at `style`.
pub fn validate(s: &ToolStyle) -> Problems {
    let mut p = Problems::new();
    let pal = &s.palette;
    let palette = [
        ("primary", &pal.primary),
        ("secondary", &pal.secondary),
        ("accent", &pal.accent),
        ("background", &pal.background),
        ("surface", &pal.surface),
        ("text", &pal.text),
        ("mutedText", &pal.muted_text),
        ("onPrimary", &pal.on_primary),
    ];
    for (name, value) in palette {
        if parse_hex(value).is_none() {
            p.push(
                format!("style.palette.{name}"),
                format!("{value:?} is not a #RRGGBB hex colour"),
            );
        }
    }
    pair(
        &mut p,
        "style.palette.text".into(),
        &pal.text,
        "background",
        &pal.background,
    );
    pair(
        &mut p,
        "style.palette.text".into(),
        &pal.text,
        "surface",
        &pal.surface,
    );
    pair(
        &mut p,
        "style.palette.mutedText".into(),
        &pal.muted_text,
        "background",
        &pal.background,
    );
    pair(
        &mut p,
        "style.palette.onPrimary".into(),
        &pal.on_primary,
        "primary",
        &pal.primary,
    );
    let c = &s.components;
    let components = [
        ("button", &c.button),
        ("input", &c.input),
        ("card", &c.card),
        ("result", &c.result),
    ];
    for (name, comp) in components {
        for (field, value) in [
            ("background", &comp.background),
            ("text", &comp.text),
            ("border", &comp.border),
        ] {
            if parse_hex(value).is_none() {
                p.push(
                    format!("style.components.{name}.{field}"),
                    format!("{value:?} is not a #RRGGBB hex colour"),
                );
            }
        }
        pair(
            &mut p,
            format!("style.components.{name}.text"),
            &comp.text,
            "its background",
            &comp.background,
        );
    }
    let t = &s.typography;
    if t.heading_font.trim().is_empty() {
        p.push("style.typography.headingFont", "must not be empty");
    }
    if t.body_font.trim().is_empty() {
        p.push("style.typography.bodyFont", "must not be empty");
    }
    if !(12..=24).contains(&t.base_size_px) {
        p.push(
            "style.typography.baseSizePx",
            format!("{} is outside 12..24", t.base_size_px),
        );
    }
    if !(1.05..=1.8).contains(&t.scale) {
        p.push(
            "style.typography.scale",
            format!("{} is outside 1.05..1.8", t.scale),
        );
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contrast_matches_wcag_reference_values() {
        let black = parse_hex("#000000").unwrap();
        let white = parse_hex("#FFFFFF").unwrap();
        assert!((contrast(black, white) - 21.0).abs() < 1e-9);
        assert!((contrast(white, white) - 1.0).abs() < 1e-9);
        // #767676 on white is the classic "just passes AA" grey (4.54:1).
        let grey = parse_hex("#767676").unwrap();
        assert!((contrast(grey, white) - 4.54).abs() < 0.01);
        assert_eq!(parse_hex("#12345"), None);
        assert_eq!(parse_hex("123456"), None);
        assert_eq!(parse_hex("#12345g"), None);
        assert_eq!(parse_hex("#a0B0c0"), Some([0xa0, 0xb0, 0xc0]));
    }
}
