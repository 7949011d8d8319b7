//! The SAS emoji table ([spec: SAS method `emoji`](https://spec.matrix.org/v1.19/client-server-api/#sas-method-emoji)),
//! read from the specification's own `sas-emoji.json` (EM-02, EM-03).

use std::sync::OnceLock;

use serde::Deserialize;

const TABLE_JSON: &str = include_str!("../data/sas-emoji.json");

/// One of the 64 SAS emoji.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Emoji {
    /// Index 0..=63 into the table: what both sides must agree on.
    pub index: u8,
    /// The emoji itself (may contain U+FE0F).
    pub symbol: &'static str,
    /// The English description from the spec.
    pub description: &'static str,
}

#[derive(Deserialize)]
struct Entry {
    number: u8,
    emoji: String,
    description: String,
    #[serde(default)]
    translated_descriptions: std::collections::BTreeMap<String, Option<String>>,
}

struct Table {
    entries: Vec<(Emoji, std::collections::BTreeMap<String, Option<String>>)>,
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        // The JSON is compiled in and checked by the tests below, so a failure here is a build defect.
        let raw: Vec<Entry> = serde_json::from_str(TABLE_JSON).expect("sas-emoji.json is valid");
        let entries = raw
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                assert_eq!(usize::from(e.number), i, "sas-emoji.json is ordered by number");
                let emoji = Emoji {
                    index: e.number,
                    symbol: Box::leak(e.emoji.into_boxed_str()),
                    description: Box::leak(e.description.into_boxed_str()),
                };
                (emoji, e.translated_descriptions)
            })
            .collect();
        Table { entries }
    })
}

/// The emoji at `index` (taken modulo 64, since indices are 6-bit values).
pub fn emoji(index: u8) -> Emoji {
    table().entries[usize::from(index & 63)].0.clone()
}

/// The description of emoji `index` in language `lang` (e.g. `de`, `pt_BR`), if the spec has a
/// translation for it (EM-03; some entries are untranslated).
pub fn translated_description(index: u8, lang: &str) -> Option<&'static str> {
    table().entries[usize::from(index & 63)].1.get(lang)?.as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_spec_listing() {
        // VECTORS.md V11 spot checks, including the VS-16 entries (EM-02).
        assert_eq!(emoji(0).description, "Dog");
        assert_eq!(emoji(0).symbol, "\u{1F436}");
        assert_eq!(emoji(21).symbol, "\u{2601}\u{FE0F}");
        assert_eq!(emoji(38).symbol, "\u{231B}");
        assert_eq!(emoji(63).description, "Pin");
        assert_eq!(emoji(53).description, "Aeroplane");
        assert_eq!(translated_description(0, "de"), Some("Hund"));
        assert_eq!(translated_description(0, "szl"), None);
        assert_eq!(translated_description(0, "xx"), None);
        let with_vs16: Vec<u8> = (0..64).filter(|&i| emoji(i).symbol.contains('\u{FE0F}')).collect();
        assert_eq!(with_vs16, [21, 29, 37, 43, 45, 49, 53]);
    }
}
